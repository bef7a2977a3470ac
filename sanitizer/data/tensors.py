"""An in-memory image dataset with optional augmentation, the common currency of this package."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset


class ImageTensorDataset(Dataset):
    """Images in [0, 1] as a float tensor ``[N, C, H, W]`` plus integer labels.

    Yields ``(image, label, index)`` so that training code and the sanitizer can always tell which
    original example a batch element is.

    Example:
        >>> ds = ImageTensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10) % 2)
        >>> x, y, i = ds[3]
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.float()
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.num_classes = int(num_classes if num_classes is not None else int(self.labels.max()) + 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index]), index

    def without_transform(self) -> ImageTensorDataset:
        """The same examples with no augmentation (what the sanitizer should embed)."""
        return ImageTensorDataset(self.images, self.labels, None, self.num_classes)

    def with_transform(self, transform: Callable | None) -> ImageTensorDataset:
        return ImageTensorDataset(self.images, self.labels, transform, self.num_classes)


def subset_by_class(
    dataset: ImageTensorDataset, per_class: int, seed: int = 0, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Indices of a class-balanced random subset with ``per_class`` examples of every class."""
    rng = np.random.default_rng(seed)
    labels = dataset.labels.numpy()
    excluded = np.zeros(len(labels), dtype=bool)
    if exclude is not None:
        excluded[exclude] = True
    chosen = []
    for c in range(dataset.num_classes):
        pool = np.flatnonzero((labels == c) & ~excluded)
        if len(pool) < per_class:
            raise ValueError(f"class {c} has only {len(pool)} examples, {per_class} requested")
        chosen.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(chosen))
