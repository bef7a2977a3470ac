"""Datasets for the demo, tests and benchmarks: CIFAR-10, scikit-learn digits, poisoned views."""

from sanitizer.data.cifar10 import CIFAR10_CLASSES, load_cifar10
from sanitizer.data.digits import load_digits_split
from sanitizer.data.tensors import ImageTensorDataset, subset_by_class
from sanitizer.data.views import PoisonedView

__all__ = [
    "CIFAR10_CLASSES",
    "ImageTensorDataset",
    "PoisonedView",
    "load_cifar10",
    "load_digits_split",
    "subset_by_class",
]
