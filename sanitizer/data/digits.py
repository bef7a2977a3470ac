"""scikit-learn's 8x8 digits (ships with scikit-learn, no download) as a small image dataset."""

from __future__ import annotations

import numpy as np
import torch

from sanitizer.data.tensors import ImageTensorDataset


def load_digits_split(
    test_fraction: float = 0.25, seed: int = 0, upscale: int = 16
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Train and test splits of the digits, grayscale ``[N, 1, upscale, upscale]`` in [0, 1].

    Upscaling 8x8 to 16x16 (bilinear) gives convolutional models room to work.

    Example:
        >>> train, test = load_digits_split()
        >>> train.images.shape[1:]
        torch.Size([1, 16, 16])
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if upscale != 8:
        images = torch.nn.functional.interpolate(images, size=(upscale, upscale), mode="bilinear",
                                                 align_corners=False).clamp_(0, 1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    return (
        ImageTensorDataset(images[train_idx], labels[train_idx], None, 10),
        ImageTensorDataset(images[test_idx], labels[test_idx], None, 10),
    )
