"""CIFAR-10 from the standard torchvision folder layout, without torchvision's md5 check.

The batches are Python pickles; we read them with a restricted unpickler that only builds plain
containers and numpy arrays, so a tampered file cannot execute code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from sanitizer.data.tensors import ImageTensorDataset

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILES = ["test_batch"]
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("copyreg", "_reconstructor"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _SafeUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
    return data, labels


def _find_batches_dir(root: Path) -> Path:
    for candidate in (root, root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").exists():
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 batches under {root}: expected data_batch_1..5 and test_batch in "
        f"{root}/cifar-10-batches-py (the torchvision layout). Pass --data-root pointing at that folder."
    )


def load_cifar10(root: str | Path, train: bool = True) -> ImageTensorDataset:
    """Load CIFAR-10 as an :class:`ImageTensorDataset` of floats in [0, 1].

    Example:
        >>> train = load_cifar10("../shared/data/cifar10", train=True)  # doctest: +SKIP
        >>> len(train)  # doctest: +SKIP
        50000
    """
    folder = _find_batches_dir(Path(root))
    parts = [_read_batch(folder / name) for name in (_TRAIN_FILES if train else _TEST_FILES)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageTensorDataset(torch.from_numpy(images).float().div_(255), torch.from_numpy(labels), None, 10)
