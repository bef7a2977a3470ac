"""A dataset view that overlays poisoned images (and optionally labels) on a base dataset."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sanitizer.data.tensors import ImageTensorDataset


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
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if len(idx) != len(poisoned_images):
            raise ValueError(f"{len(idx)} poison indices but {len(poisoned_images)} poisoned images")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(base)):
            raise IndexError(f"poison indices must lie in [0, {len(base)})")
        if len(torch.unique(idx)) != len(idx):
            raise ValueError("poison indices contain duplicates")
        if poisoned_images.shape[1:] != base.images.shape[1:]:
            raise ValueError(
                f"poisoned images have shape {tuple(poisoned_images.shape[1:])}, "
                f"base images {tuple(base.images.shape[1:])}"
            )
        images = base.images.clone()
        images[idx] = poisoned_images.to(images.dtype)
        labels = base.labels.clone()
        if poisoned_labels is not None:
            labels[idx] = torch.as_tensor(poisoned_labels, dtype=torch.long)
        super().__init__(images, labels, base.transform, base.num_classes)
        self.poison_indices = idx
        self.is_poison = torch.zeros(len(base), dtype=torch.bool)
        self.is_poison[idx] = True
