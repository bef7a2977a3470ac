"""Datasets for the demo, tests and benchmarks (CIFAR-10, scikit-learn digits), loaders for your own images
(``.npz`` arrays, an image folder) and poisoned views."""

from sanitizer.data.cifar10 import CIFAR10_CLASSES, load_cifar10
from sanitizer.data.digits import load_digits_split
from sanitizer.data.tensors import (
    ImageTensorDataset,
    check_pixels,
    holdout_split,
    images_from_array,
    load_image_folder,
    load_npz,
    subset_by_class,
)
from sanitizer.data.views import PoisonedDataset, PoisonedView, PoisonIndexError

__all__ = [
    "CIFAR10_CLASSES",
    "ImageTensorDataset",
    "PoisonIndexError",
    "PoisonedDataset",
    "PoisonedView",
    "check_pixels",
    "holdout_split",
    "images_from_array",
    "load_cifar10",
    "load_digits_split",
    "load_image_folder",
    "load_npz",
    "subset_by_class",
]
