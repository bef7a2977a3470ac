"""Provable certificate by partition aggregation (after Deep Partition Aggregation, Levine & Feizi 2021).

The training set is split into k parts by a hash of each example's bytes (so the split depends
neither on the order of the data nor on the other examples); one model is trained per part, each
sanitized within its own part; the prediction is the plurality vote, ties going to the smaller
class index. Inserting or removing one training example changes one part, hence at most one vote,
so a prediction whose vote count n_c beats every other class c' by

    gap = n_c − max_{c' ≠ c} (n_{c'} + [c' < c])

cannot change under ⌊gap / 2⌋ insertions or removals: its certified radius. Modifying an example
counts as one removal plus one insertion. The guarantee assumes each part's training is a
deterministic function of that part's examples (fixed seeds; deterministic kernels).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from sanitizer.certificate.audit import dataset_fingerprint
from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.embeddings import iterate_batches
from sanitizer.progress import progress
from sanitizer.stats import mix_seed
from sanitizer.train import TrainConfig, predict_proba, train_classifier

HASH_RULE = "sha256 of each example's float32 bytes (C order, labels excluded), first 8 bytes as an integer, mod k"


def example_digests(images: torch.Tensor) -> list[bytes]:
    """SHA-256 digest of each example's float32 bytes."""
    arr = images.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return [hashlib.sha256(row.tobytes()).digest() for row in arr.reshape(len(arr), -1)]


def part_of(digest: bytes, k: int) -> int:
    """The part (of ``k``) of an example with SHA-256 ``digest`` (see :data:`HASH_RULE`)."""
    return int.from_bytes(digest[:8], "big") % k


def hash_partition(images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(part [N], order [N])``: the part of every example and a hash order (for order-independent training).

    Example:
        >>> part, order = hash_partition(torch.rand(10, 1, 4, 4), k=3)
        >>> sorted(set(part.tolist())) <= [0, 1, 2]
        True
    """
    if k < 1:
        raise ValueError(f"the number of partitions must be >= 1, got {k}")
    digests = example_digests(images)
    part = np.array([part_of(d, k) for d in digests], dtype=np.int64)
    order = np.array(sorted(range(len(digests)), key=lambda i: digests[i]), dtype=np.int64)
    return part, order


def dataset_part_sizes(dataset, k: int, batch_size: int = 1024) -> list[int]:
    """How many examples of ``dataset`` fall in each of the ``k`` hash parts (batch by batch, for verify)."""
    sizes = [0] * k
    for x, _y in iterate_batches(dataset, batch_size):
        for d in example_digests(torch.as_tensor(x)):
            sizes[part_of(d, k)] += 1
    return sizes


def certify_votes(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plurality predictions (ties to the smaller class) and certified radii from vote counts ``[N, C]``.

    Example:
        >>> certify_votes(np.array([[5, 0, 0], [2, 2, 1], [1, 3, 1]]))
        (array([0, 0, 1]), array([2, 0, 0]))
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] < 2:
        raise ValueError(f"vote counts must have shape [N, C] with C >= 2, got {counts.shape}")
    pred = counts.argmax(1)  # numpy's argmax returns the first maximum: ties go to the smaller index
    classes = np.arange(counts.shape[1])
    rival = counts + (classes[None, :] < pred[:, None])  # a smaller class wins ties, so it needs one vote less
    rival[np.arange(len(pred)), pred] = np.iinfo(np.int64).min
    gap = counts[np.arange(len(pred)), pred] - rival.max(1)
    return pred, np.maximum(gap, 0) // 2


def certified_accuracy(pred: np.ndarray, radius: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
    """Fraction of test examples predicted correctly with radius ≥ r, for r = 0 … max radius."""
    correct = np.asarray(pred) == np.asarray(labels)
    top = int(radius.max()) if len(radius) else 0
    return [{"radius": r, "accuracy": float((correct & (radius >= r)).mean()) if len(pred) else 0.0}
            for r in range(top + 1)]


def train_partitions(
    model_factory: Callable[[], nn.Module],
    train_set: ImageTensorDataset,
    k: int,
    config: TrainConfig,
    sanitizer_options: dict[str, Any] | None = None,
    sanitize: bool = True,
) -> tuple[list[nn.Module], dict[str, Any]]:
    """Train one model per hash part (sanitized within its part unless ``sanitize=False``)."""
    from sanitizer.core import Sanitizer

    part, order = hash_partition(train_set.images, k)
    models, sizes, dropped = [], [], []
    for p in progress(range(k), desc="partitions"):
        members = order[part[order] == p]  # hash order, so the model does not depend on dataset order
        sizes.append(int(len(members)))
        torch.manual_seed(mix_seed(config.seed, p))
        model = model_factory()
        if len(members) == 0:
            models.append(None)
            dropped.append(0)
            continue
        subset = ImageTensorDataset(train_set.images[members], train_set.labels[members], None,
                                    train_set.num_classes)
        sanitizer = None
        if sanitize:
            sanitizer = Sanitizer(model, subset, num_classes=train_set.num_classes, seed=config.seed,
                                  **(sanitizer_options or {}))
        train_classifier(model, subset, config, sanitizer=sanitizer, desc=f"part {p}")
        models.append(model)
        dropped.append(int(len(sanitizer.dropped)) if sanitizer is not None else 0)
    return models, {"part_sizes": sizes, "dropped_per_part": dropped}


def part_predictions(models: list[nn.Module | None], images: torch.Tensor) -> list[np.ndarray | None]:
    """Each part model's predicted classes on ``images`` (None for a part without examples)."""
    return [None if model is None else predict_proba(model, images).argmax(1).numpy() for model in models]


def vote_counts(models: list[nn.Module | None], images: torch.Tensor, num_classes: int,
                predictions: list[np.ndarray | None] | None = None) -> np.ndarray:
    """Votes ``[N, C]`` of the part models on ``images`` (a part without examples abstains)."""
    counts = np.zeros((len(images), num_classes), dtype=np.int64)
    for votes in predictions if predictions is not None else part_predictions(models, images):
        if votes is not None:
            counts[np.arange(len(images)), votes] += 1
    return counts


def partition_certificate(
    model_factory: Callable[[], nn.Module],
    train_set: ImageTensorDataset,
    test_set: ImageTensorDataset,
    k: int,
    config: TrainConfig,
    sanitizer_options: dict[str, Any] | None = None,
    sanitize: bool = True,
) -> dict[str, Any]:
    """The certificate's ``partition`` section: per test example its prediction and certified radius,
    and the certified accuracy at each radius.

    Example:
        >>> section = partition_certificate(lambda: CompactCNN(1, 10, 8), train, test, k=5,
        ...                                 config=TrainConfig(epochs=4))  # doctest: +SKIP
        >>> section["certified_accuracy"][:2]  # doctest: +SKIP
    """
    models, info = train_partitions(model_factory, train_set, k, config, sanitizer_options, sanitize)
    predictions = part_predictions(models, test_set.images)
    counts = vote_counts(models, test_set.images, train_set.num_classes, predictions)
    pred, radius = certify_votes(counts)
    labels = test_set.labels.numpy()
    return {
        "partitions": int(k),
        "hash": HASH_RULE,
        "sanitized_within_parts": bool(sanitize),
        **info,
        "part_accuracies": [None if p is None or not len(labels) else float((p == labels).mean())
                            for p in predictions],
        "train_config": config.to_dict(),
        "train_fingerprint": dataset_fingerprint(train_set)["fingerprint"],
        "test_fingerprint": dataset_fingerprint(test_set)["fingerprint"],
        "test_size": int(len(labels)),
        "clean_accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "certified_accuracy": certified_accuracy(pred, radius, labels),
        "votes": counts.tolist(),
        "radii": [int(r) for r in radius],
        "predictions": [int(p) for p in pred],
        "guarantee": "For each test example, inserting or removing at most its radius r of training examples "
                     "(a modification counts as two) cannot change the plurality prediction, provided each "
                     "part's training is a deterministic function of its examples.",
    }
