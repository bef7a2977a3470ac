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

import io

import numpy as np
import torch
from PIL import Image

from sanitizer.errors import SanitizerError


def jpeg_compress(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG-encode and decode every image of ``[N, C, H, W]`` in [0, 1] (C = 1 or 3); returns floats in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise SanitizerError(f"jpeg_compress expects images [N, 1 or 3, H, W] in [0, 1], got {tuple(images.shape)}")
    if not 1 <= int(quality) <= 100:
        raise SanitizerError(f"JPEG quality must be in [1, 100], got {quality}")
    as_bytes = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.empty(as_bytes.shape, dtype=np.uint8)
    for i, image in enumerate(as_bytes):
        buffer = io.BytesIO()
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, "JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(buffer))
        out[i] = decoded[:, :, None] if decoded.ndim == 2 else decoded
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255


def uniform_noise(images: torch.Tensor, eps: float, seed: int = 0) -> torch.Tensor:
    """``images`` plus i.i.d. uniform noise in [−eps, eps], clipped to [0, 1] (a fixed draw per ``seed``)."""
    gen = torch.Generator().manual_seed(int(seed))
    noise = (torch.rand(images.shape, generator=gen) * 2 - 1) * float(eps)
    return (images.detach().cpu() + noise).clamp(0, 1)


def bernoulli_noise(images: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``images`` ± ``eps`` per pixel with a fair coin (Friendly Noise's random noise); not clipped."""
    signs = (torch.rand(images.shape, generator=generator) < 0.5).to(images.device, images.dtype) * 2 - 1
    return images + signs * float(eps)


def friendly_noise(model: torch.nn.Module, images: torch.Tensor, *, eps: float = 16 / 255, steps: int = 30,
                   lr: float = 100.0, mu: float = 1.0, batch_size: int = 128, seed: int = 0) -> torch.Tensor:
    """Per-example "friendly" noise (Liu, Yu, Mirzasoleiman, NeurIPS 2022): as large as possible within
    ``eps`` while leaving ``model``'s output distribution unchanged.

    Per batch, minimise KL(model(x + n) ‖ model(x)) − mu · mean(n²) over n with SGD (Nesterov,
    momentum 0.9, lr ×0.1 at 1/2 and 3/4 of ``steps``), n clipped to [−eps, eps], started from uniform
    noise in ±8/255. Returns the noise ``[N, C, H, W]`` (add it to the images once; the paper then adds
    fresh ±8/255 Bernoulli noise to every training batch). Costs ``steps`` forward-backward passes over
    the data, which is why the paper measures about 3× the training time.
    """
    import torch.nn.functional as F

    from sanitizer.embeddings import ImageLayout, model_device
    from sanitizer.progress import progress

    device = model_device(model)
    run = ImageLayout(device)  # channels-last CPU batches: ~1.7x faster convolutions, the same noise to rounding
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(int(seed))
    out = torch.empty(images.shape, dtype=torch.float32)
    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for start in progress(range(0, len(images), batch_size), desc="friendly noise", unit="batch"):
            x = images[start:start + batch_size].to(device)
            with torch.no_grad():
                reference = F.log_softmax(run(model, x), 1)
            init = (torch.rand(x.shape, generator=gen) * 2 - 1) * (8 / 255)
            noise = init.to(device).requires_grad_(True)
            opt = torch.optim.SGD([noise], lr=lr, momentum=0.9, nesterov=True)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [steps // 2, steps * 3 // 4], 0.1)
            for _ in range(steps):
                clipped = noise.clamp(-eps, eps)
                log_p = F.log_softmax(run(model, (x + clipped).clamp(0, 1)), 1)
                kl = F.kl_div(log_p, reference, reduction="batchmean", log_target=True)
                loss = kl - mu * clipped.pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            out[start:start + len(x)] = noise.detach().clamp(-eps, eps).cpu()
    finally:
        for p, flag in zip(model.parameters(), saved):
            p.requires_grad_(flag)
        model.train(was_training)
    return out
