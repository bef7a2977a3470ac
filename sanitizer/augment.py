"""Batched tensor augmentations (flip + shift), fast enough to run inside the training loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flip_crop(images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding, per example, on a batch [B, C, H, W]."""
    b, _, h, w = images.shape
    flip = torch.rand(b, generator=generator, device="cpu") < 0.5
    out = torch.where(flip.to(images.device)[:, None, None, None], images.flip(3), images)
    if padding <= 0:
        return out
    padded = F.pad(out, (padding,) * 4)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).to(images.device)  # [B, H]
    cols = (dx[:, None] + torch.arange(w)[None]).to(images.device)  # [B, W]
    idx_b = torch.arange(b, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
