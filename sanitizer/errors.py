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


# Without an explicit ``num_classes``, a label at or above this is refused: it would make the sanitizer
# size per-class tables for that many classes (label 10**9 asked deep k-NN for hundreds of GiB).
MAX_IMPLICIT_CLASSES = 1_000_000


def check_labels(labels: torch.Tensor | np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Labels as int64 numpy, checked to be 1-D integers in ``[0, num_classes)``.

    Integer-valued floats (``1.0``) are accepted; ``1.7``, NaN, strings, complex numbers and scalars are
    refused. Without ``num_classes`` a label of :data:`MAX_IMPLICIT_CLASSES` or more is refused.
    """
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim == 0:
        raise SanitizerError(f"labels must be a 1-D sequence of class indices, got the scalar {arr.item()!r}")
    if arr.ndim != 1:
        raise SanitizerError(f"labels must be 1-D class indices, got shape {arr.shape}")
    if arr.dtype == object:  # e.g. a list mixing ints and floats: let numpy find the common type
        arr = np.asarray(arr.tolist())
    if num_classes is not None:
        num_classes = check_positive_int(num_classes, "num_classes")
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        if arr.dtype.kind in "US":
            raise SanitizerError("labels must be integer class indices, got strings; map class names to indices "
                                 "first (e.g. np.unique(names, return_inverse=True)[1])")
        raise SanitizerError(f"labels must be integer class indices, got dtype {arr.dtype}")
    if not arr.size:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        wrong = ~np.isfinite(arr) | (np.mod(arr, 1) != 0)
        if wrong.any():
            bad = int(np.flatnonzero(wrong)[0])
            raise SanitizerError(
                f"label {str(arr[bad])} at index {bad} is not an integer class index (a cast would truncate it); "
                "labels must be whole numbers such as 0, 1, 2"
            )
    if arr.min() < 0:
        bad = int(np.argmin(arr))
        raise SanitizerError(f"label {int(arr[bad])} at index {bad} is negative; labels must be class indices >= 0")
    limit = num_classes if num_classes is not None else MAX_IMPLICIT_CLASSES
    if arr.max() >= limit:  # compared before the int64 cast, so uint64 and huge floats cannot wrap around
        bad = int(np.argmax(arr))
        if num_classes is not None:
            raise SanitizerError(
                f"label {int(arr[bad])} at index {bad} is out of range for {num_classes} classes; "
                "check the label mapping or pass the right num_classes"
            )
        raise SanitizerError(
            f"label {int(arr[bad])} at index {bad} would mean {int(arr[bad]) + 1} classes; labels are class "
            "indices 0..C-1. Remap them (np.unique(labels, return_inverse=True)[1]) or, if there really are "
            "that many classes, pass num_classes= explicitly"
        )
    return arr.astype(np.int64)


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
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out).all(axis=1)  # after the cast: 1e300 becomes inf in float32
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise SanitizerError(
            f"{len(bad)} embeddings contain NaN or inf or exceed float32's range (first at row {int(bad[0])}): "
            "the model's loss diverged or the inputs are corrupt. Lower the learning rate or check the data "
            "before sanitizing."
        )
    return out


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int, refusing floats like 1.5, bools, NaN and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if not (isinstance(value, float) and value.is_integer()):
            raise SanitizerError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise SanitizerError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_flag(value, name: str) -> bool:
    """A yes/no option: True/False (numpy bools too). ``"false"`` would be truthy, so strings are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise SanitizerError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_seed(value, name: str = "seed") -> int:
    """A seed as an int: any integer (negative ones too), refusing strings, bools and floats like 1.5."""
    return check_positive_int(value, name, minimum=-(2**63))


def check_threshold(value, name: str = "threshold") -> float:
    """A finite, positive float (a NaN threshold silently drops nothing)."""
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise SanitizerError(f"{name} must be a number, got {value!r}") from exc
    if not np.isfinite(value) or value <= 0:
        raise SanitizerError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_fraction(value, name: str, high: float = 1.0, zero_ok: bool = False) -> float:
    """A number in ``(0, high]`` (``[0, high]`` with ``zero_ok``), refusing NaN, strings and bools."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SanitizerError(f"{name} must be a number, got {value!r}")
    value = float(value)
    low_ok = value >= 0 if zero_ok else value > 0
    if not (low_ok and value <= high):  # also False for NaN
        raise SanitizerError(f"{name} must lie in {'[' if zero_ok else '('}0, {high:g}], got {value}")
    return value
