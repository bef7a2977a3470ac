"""Input checks shared by the embedder, the policies and the sanitizer: clear errors, nothing silent."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset


class SanitizerError(ValueError):
    """Bad input to the sanitizer; the message names the problem and the fix."""


def check_map_dataset(dataset: Dataset) -> int:
    """Return ``len(dataset)``, refusing datasets the sanitizer cannot index."""
    if isinstance(dataset, IterableDataset):
        raise SanitizerError(
            "the sanitizer needs a map-style dataset (with __getitem__ and __len__) so it can drop "
            "examples by index; got an IterableDataset. Materialise it or wrap it in a map-style Dataset."
        )
    try:
        return len(dataset)
    except TypeError as exc:
        raise SanitizerError("the dataset has no __len__; the sanitizer needs a sized, indexable dataset") from exc


def check_labels(labels: torch.Tensor | np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Labels as int64 numpy, checked to be 1-D integers in ``[0, num_classes)``."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise SanitizerError(f"labels must be 1-D class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise SanitizerError("labels must be integer class indices, got non-integer values")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise SanitizerError(f"label {int(arr.min())} is negative; labels must be class indices >= 0")
    if num_classes is not None and arr.size and arr.max() >= num_classes:
        bad = int(np.flatnonzero(arr >= num_classes)[0])
        raise SanitizerError(
            f"label {int(arr[bad])} at index {bad} is out of range for {num_classes} classes; "
            "check the label mapping or pass the right num_classes"
        )
    return arr


def check_embeddings(embeddings: torch.Tensor | np.ndarray, n: int | None = None) -> np.ndarray:
    """Embeddings as float32 C-contiguous numpy ``[N, D]``, finite."""
    arr = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    if arr.ndim != 2:
        raise SanitizerError(f"embeddings must have shape [N, D], got {arr.shape}")
    if arr.shape[1] == 0:
        raise SanitizerError(f"embeddings have no coordinates (shape {arr.shape}); check the embedding kind")
    if np.iscomplexobj(arr):
        raise SanitizerError("embeddings are complex; pass real values (e.g. torch.view_as_real(x).flatten(1))")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise SanitizerError(f"embeddings must be numbers, got dtype {arr.dtype}")
    if n is not None and arr.shape[0] != n:
        raise SanitizerError(f"{arr.shape[0]} embeddings but {n} labels; they must match one to one")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise SanitizerError(
            f"{len(bad)} embeddings contain NaN or inf (first at row {int(bad[0])}): the model's loss "
            "diverged or the inputs are corrupt. Lower the learning rate or check the data before sanitizing."
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int, refusing floats like 1.5, bools, NaN and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if not (isinstance(value, float) and value.is_integer()):
            raise SanitizerError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise SanitizerError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_threshold(value, name: str = "threshold") -> float:
    """A finite, positive float (a NaN threshold silently drops nothing)."""
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise SanitizerError(f"{name} must be a number, got {value!r}") from exc
    if not np.isfinite(value) or value <= 0:
        raise SanitizerError(f"{name} must be a finite number > 0, got {value}")
    return value
