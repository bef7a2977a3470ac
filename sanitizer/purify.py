"""Purifications of image tensors: JPEG round trips and bounded random noise.

They remove much of a small crafted perturbation while leaving the image recognisable, which is why
JPEG compression of the training set is a strong baseline against gradient-matching poisons
(PureGen, NeurIPS 2024: quality 25 → 0 % attack success at −4.8 points of accuracy).

Example:
    >>> x = torch.rand(4, 3, 32, 32)
    >>> jpeg_compress(x, quality=75).shape
    torch.Size([4, 3, 32, 32])
"""

from __future__ import annotations

import torch
from torchvision.io import decode_jpeg, encode_jpeg

from sanitizer.errors import SanitizerError


def jpeg_compress(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG-encode and decode every image of ``[N, C, H, W]`` in [0, 1] (C = 1 or 3); returns floats in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise SanitizerError(f"jpeg_compress expects images [N, 1 or 3, H, W] in [0, 1], got {tuple(images.shape)}")
    if not 1 <= int(quality) <= 100:
        raise SanitizerError(f"JPEG quality must be in [1, 100], got {quality}")
    as_bytes = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    out = torch.empty(images.shape, dtype=torch.float32)
    for i, image in enumerate(as_bytes):
        out[i] = decode_jpeg(encode_jpeg(image, quality=int(quality))).float() / 255
    return out


def uniform_noise(images: torch.Tensor, eps: float, seed: int = 0) -> torch.Tensor:
    """``images`` plus i.i.d. uniform noise in [−eps, eps], clipped to [0, 1] (a fixed draw per ``seed``)."""
    gen = torch.Generator().manual_seed(int(seed))
    noise = (torch.rand(images.shape, generator=gen) * 2 - 1) * float(eps)
    return (images.detach().cpu() + noise).clamp(0, 1)
