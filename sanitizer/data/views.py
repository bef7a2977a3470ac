"""Dataset views that overlay poisoned images (and optionally labels) on a base dataset: a fast one for
:class:`ImageTensorDataset` and one for any map-style dataset yielding ``(image tensor, label, ...)``."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from sanitizer.data.tensors import PIXEL_TOLERANCE, ImageTensorDataset, integer_array
from sanitizer.errors import SanitizerError


class PoisonIndexError(SanitizerError, IndexError):
    """A poison index outside the dataset (both a :class:`SanitizerError` and an ``IndexError``)."""


def map_dataset_length(dataset, purpose: str = "poisons can only be applied to") -> int:
    """``len(dataset)`` for a map-style dataset; a clear error for an IterableDataset or an unsized one."""
    if isinstance(dataset, IterableDataset):
        raise SanitizerError(f"{purpose} a map-style dataset (with __getitem__ and __len__), got an "
                             f"IterableDataset ({type(dataset).__name__}); materialise it first")
    try:
        return len(dataset)
    except TypeError:
        raise SanitizerError(f"{purpose} a sized, indexable dataset; {type(dataset).__name__} has no "
                             "__len__") from None


def dataset_num_classes(dataset) -> int | None:
    """The number of classes of ``dataset`` when it says so: ``num_classes``, ``classes`` (torchvision),
    the labels of a TensorDataset (largest + 1); looks through ``Subset``-like wrappers. None otherwise."""
    for _ in range(8):
        value = getattr(dataset, "num_classes", None)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        classes = getattr(dataset, "classes", None)
        if isinstance(classes, (Sequence, dict)) and not isinstance(classes, str):
            return len(classes)
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
            labels = dataset.tensors[1]
            if labels.ndim == 1 and len(labels) and not labels.is_floating_point():
                return int(labels.max()) + 1
            return None
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            return None
        dataset = inner
    return None


def _check_overlay(n: int, indices, poisoned_images: torch.Tensor) -> torch.Tensor:
    """The poison indices as a long tensor: integers, unique, one per image, inside a dataset of ``n``."""
    idx = torch.from_numpy(integer_array(indices, "poison indices"))
    if len(idx) != len(poisoned_images):
        raise SanitizerError(f"{len(idx)} poison indices but {len(poisoned_images)} poisoned images")
    if len(idx) and int(idx.max()) >= n:
        raise PoisonIndexError(f"poison index {int(idx.max())} is outside a dataset of {n} examples; were the "
                               "poisons crafted on another (larger) training set?")
    if len(torch.unique(idx)) != len(idx):
        raise SanitizerError("poison indices contain duplicates")
    return idx


def _check_shape(poisoned_images: torch.Tensor, item_shape) -> None:
    if len(poisoned_images) and tuple(poisoned_images.shape[1:]) != tuple(item_shape):
        raise SanitizerError(f"poisoned images have shape {tuple(poisoned_images.shape[1:])}, the dataset's images "
                             f"{tuple(item_shape)}; craft the poisons on images of this size and channels")


class PoisonedView(ImageTensorDataset):
    """``base`` with ``images[indices]`` replaced by ``poisoned_images`` (and labels if given).

    The base dataset is not modified; indices keep their meaning, so a dropped index can be
    compared against ``poison_indices`` directly.

    Example:
        >>> base = ImageTensorDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]))
        >>> view = PoisonedView(base, [2], torch.ones(1, 1, 2, 2))
        >>> float(view[2][0].sum()), view.is_poison.tolist()
        (4.0, [False, False, True, False])
    """

    def __init__(
        self,
        base: ImageTensorDataset,
        indices: Sequence[int] | torch.Tensor,
        poisoned_images: torch.Tensor,
        poisoned_labels: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        idx = _check_overlay(len(base), indices, poisoned_images)
        _check_shape(poisoned_images, base.images.shape[1:])
        images = base.images.clone()
        images[idx] = poisoned_images.to(images.dtype)
        labels = base.labels.clone()
        if poisoned_labels is not None:
            labels[idx] = torch.as_tensor(poisoned_labels, dtype=torch.long)
        super().__init__(images, labels, base.transform, base.num_classes)
        self.poison_indices = idx
        self.is_poison = torch.zeros(len(base), dtype=torch.bool)
        self.is_poison[idx] = True


def _label_like(example, value: int):
    """``value`` in the type the dataset uses for labels (int, a 0-d tensor of its dtype, a numpy scalar)."""
    if isinstance(example, torch.Tensor):
        return torch.tensor(value, dtype=example.dtype)
    if isinstance(example, np.generic):
        return example.dtype.type(value)
    return int(value)


class PoisonedDataset(Dataset):
    """Any map-style dataset yielding ``(image tensor, label, ...)`` with the items at ``indices`` replaced.

    A poisoned index yields ``(poisoned image, poisoned label, *the rest of the original item)``; every
    other index yields the original item unchanged (the base dataset is not modified). ``transform``
    (optional) is applied to each poisoned image when read: the poisons are plain images in [0, 1], so
    give it whatever the dataset's own transform does after ``ToTensor`` (e.g. its ``Normalize``).
    ``poison_indices`` and ``is_poison`` say which items are poisons, as on :class:`PoisonedView`;
    ``num_classes`` is what the base declares (None when it does not).

    Example:
        >>> base = TensorDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]))
        >>> view = PoisonedDataset(base, [2], torch.ones(1, 1, 2, 2), [0])
        >>> float(view[2][0].sum()), int(view[2][1]), view.is_poison.tolist()
        (4.0, 0, [False, False, True, False])
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int] | torch.Tensor,
        poisoned_images: torch.Tensor,
        poisoned_labels: Sequence[int] | torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        n = map_dataset_length(base)
        idx = _check_overlay(n, indices, poisoned_images)
        labels = torch.from_numpy(integer_array(poisoned_labels, "poison labels"))
        if len(labels) != len(idx):
            raise SanitizerError(f"{len(idx)} poison indices but {len(labels)} poison labels")
        self.base, self.transform, self.poison_indices = base, transform, idx
        self.num_classes = dataset_num_classes(base)  # None when the base does not say
        self.is_poison = torch.zeros(n, dtype=torch.bool)
        self.is_poison[idx] = True
        self._rows = {int(i): row for row, i in enumerate(idx.tolist())}
        self._labels = labels.tolist()
        self._item_len, self._label_example = 2, 0
        self.images = poisoned_images
        if len(idx):
            self.images = self._probe(int(idx[0]), poisoned_images)

    def _probe(self, index: int, poisoned_images: torch.Tensor) -> torch.Tensor:
        """Check one original item's form against the poisons; return the poisons in the items' dtype."""
        item = self.base[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise SanitizerError(f"dataset items must be (image, label, ...) tuples; item {index} is a "
                                 f"{type(item).__name__}")
        image, label = item[0], item[1]
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            kind = f"a {image.dtype} tensor" if isinstance(image, torch.Tensor) else f"a {type(image).__name__}"
            raise SanitizerError(f"item {index}'s image is {kind}; poisons need float image tensors in [0, 1] "
                                 "(give the dataset a torchvision.transforms.ToTensor() transform)")
        if isinstance(label, (torch.Tensor, np.ndarray)) and label.ndim != 0:
            raise SanitizerError(f"item {index}'s label has shape {tuple(label.shape)}; poisons need class-index "
                                 "labels (an int or a 0-d tensor), not one-hot vectors")
        _check_shape(poisoned_images, image.shape)
        if self.transform is None and (image.min() < -PIXEL_TOLERANCE or image.max() > 1 + PIXEL_TOLERANCE):
            warnings.warn(f"the dataset's images are not in [0, 1] (item {index} spans {float(image.min()):.3g} to "
                          f"{float(image.max()):.3g}: normalised?) but the poisons are; pass transform= (e.g. the "
                          "dataset's Normalize) so that they match", stacklevel=3)
        self._item_len, self._label_example = len(item), label
        return poisoned_images.to(image.dtype)

    def __len__(self) -> int:
        return len(self.is_poison)

    def __getitem__(self, index):
        i = operator.index(index)
        row = self._rows.get(i + len(self) if i < 0 else i)
        if row is None:
            return self.base[index]
        image = self.images[row]
        if self.transform is not None:
            image = self.transform(image)
        label = _label_like(self._label_example, self._labels[row])
        if self._item_len == 2:
            return image, label
        return (image, label, *self.base[index][2:])
