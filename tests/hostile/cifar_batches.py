"""Tiny CIFAR-10 batch files for the reader's hostile-input tests (the reader is patched to expect 4 images
per batch, so a whole folder is a few kilobytes)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def cifar_batch(n: int = 4, data=None, labels=None, **extra) -> dict:
    """One batch dict as the CIFAR-10 pickles hold it (random pixels unless ``data`` is given)."""
    data = np.random.default_rng(0).integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data
    return {"batch_label": "test", "data": data, "labels": list(np.arange(n) % 10) if labels is None else labels,
            **extra}


def cifar_folder(tmp: Path, first=None, protocol: int = 2) -> Path:
    """A cifar-10-batches-py folder of 4-image batches; ``first`` replaces data_batch_1 (an object to
    pickle, or raw bytes)."""
    folder = tmp / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        content = cifar_batch(labels=[int(v) for v in (np.arange(4) + i) % 10]) if i or first is None else first
        raw = content if isinstance(content, bytes) else pickle.dumps(content, protocol=protocol)
        (folder / name).write_bytes(raw)
    return folder
