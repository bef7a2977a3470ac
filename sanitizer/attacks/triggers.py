"""Patch triggers for the backdoor attacks: build one, stamp it on images, measure backdoor success.

Example:
    >>> trigger = make_trigger(3, channels=1)
    >>> patched = stamp_trigger(torch.zeros(2, 1, 16, 16), trigger)
    >>> float(patched[0, 0, -4:-1, -4:-1].sum()) == float(trigger.sum())
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sanitizer.attacks.base import resolve_budget
from sanitizer.data.tensors import ImageTensorDataset

LOCATIONS = ("bottom_right", "top_left", "random")


def set_patch_options(attack, budget: int | float, patch_size: int, trigger_kind: str, location: str,
                      margin: int, opacity: float) -> None:
    """Validate a patch attack's trigger options early (clear errors at construction) and store them on it."""
    if location not in LOCATIONS:
        raise ValueError(f"unknown trigger location {location!r}; choose one of {', '.join(LOCATIONS)}")
    if not 0 < opacity <= 1:
        raise ValueError(f"opacity must lie in (0, 1], got {opacity}")
    resolve_budget(budget, 1)  # validates the budget
    make_trigger(int(patch_size), 1, trigger_kind)  # validates size and kind
    attack.budget = budget
    attack.patch_size, attack.trigger_kind = int(patch_size), trigger_kind
    attack.location, attack.margin, attack.opacity = location, int(margin), float(opacity)


def make_trigger(size: int, channels: int = 3, kind: str = "checkerboard", seed: int = 0) -> torch.Tensor:
    """A ``[channels, size, size]`` patch in [0, 1]: ``checkerboard`` (BadNets style), ``white`` or ``random``."""
    if int(size) != size or size < 1:
        raise ValueError(f"the trigger size must be a positive number of pixels, got {size}")
    if kind == "checkerboard":
        board = (torch.arange(size)[:, None] + torch.arange(size)[None]) % 2
        return board.float().expand(channels, size, size).clone()
    if kind == "white":
        return torch.ones(channels, size, size)
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, 2, (channels, size, size), generator=gen).float()
    raise ValueError(f"unknown trigger kind {kind!r}; choose 'checkerboard', 'white' or 'random'")


def check_trigger(trigger: torch.Tensor, image_shape: tuple[int, ...], margin: int = 1) -> torch.Tensor:
    """Check that a ``[C, h, w]`` trigger fits ``[C, H, W]`` images (with ``margin`` pixels of border)."""
    trigger = torch.as_tensor(trigger, dtype=torch.float32)
    if trigger.ndim != 3:
        raise ValueError(f"a trigger must have shape [C, h, w], got {tuple(trigger.shape)}")
    c, h, w = image_shape[-3:]
    if trigger.shape[0] != c:
        raise ValueError(f"the trigger has {trigger.shape[0]} channels but the images have {c}")
    if trigger.shape[1] + margin > h or trigger.shape[2] + margin > w:
        raise ValueError(f"a {trigger.shape[1]}x{trigger.shape[2]} trigger does not fit {h}x{w} images with a "
                         f"{margin}-pixel margin; use a smaller patch_size")
    if trigger.min() < 0 or trigger.max() > 1:
        raise ValueError("trigger values must lie in [0, 1]")
    return trigger


def trigger_positions(n: int, image_shape: tuple[int, ...], trigger_shape: tuple[int, ...],
                      location: str = "bottom_right", margin: int = 1,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners (rows, cols) of the patch for ``n`` images."""
    h, w = image_shape[-2:]
    th, tw = trigger_shape[-2:]
    if location == "bottom_right":
        return torch.full((n,), h - th - margin), torch.full((n,), w - tw - margin)
    if location == "top_left":
        return torch.full((n,), margin), torch.full((n,), margin)
    if location == "random":
        rows = torch.randint(0, h - th + 1, (n,), generator=generator)
        cols = torch.randint(0, w - tw + 1, (n,), generator=generator)
        return rows, cols
    raise ValueError(f"unknown trigger location {location!r}; choose one of {', '.join(LOCATIONS)}")


def stamp_trigger(images: torch.Tensor, trigger: torch.Tensor, location: str = "bottom_right", margin: int = 1,
                  generator: torch.Generator | None = None, opacity: float = 1.0) -> torch.Tensor:
    """A copy of ``images`` ``[N, C, H, W]`` with the trigger pasted (blended at ``opacity``) on each."""
    if not 0 < opacity <= 1:
        raise ValueError(f"opacity must lie in (0, 1], got {opacity}")
    trigger = check_trigger(trigger, tuple(images.shape[1:]), margin).to(images.device, images.dtype)
    out = images.clone()
    rows, cols = trigger_positions(len(images), tuple(images.shape), tuple(trigger.shape), location, margin,
                                   generator)
    th, tw = trigger.shape[1:]
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        region = out[i, :, r:r + th, c:c + tw]
        out[i, :, r:r + th, c:c + tw] = (1 - opacity) * region + opacity * trigger
    return out


@dataclass
class BackdoorResult:
    """Backdoor success on ``trials`` test images whose true class is not the target class."""

    successes: int
    trials: int
    clean_hits: int

    @property
    def success_rate(self) -> float:
        """Fraction of patched images classified as the target class."""
        return self.successes / max(self.trials, 1)

    @property
    def clean_rate(self) -> float:
        """Fraction of the same images, unpatched, classified as the target class (the baseline)."""
        return self.clean_hits / max(self.trials, 1)


@torch.no_grad()
def backdoor_success(model: nn.Module, test_set: ImageTensorDataset, trigger: torch.Tensor, target_class: int,
                     source_class: int | None = None, location: str = "bottom_right", margin: int = 1,
                     seed: int = 0, batch_size: int = 512) -> BackdoorResult:
    """How often ``model`` predicts ``target_class`` on patched test images of other classes (of
    ``source_class`` only when given), next to the same rate without the patch."""
    from sanitizer.train import predict_proba

    labels = test_set.labels.numpy()
    mask = labels != target_class
    if source_class is not None:
        mask &= labels == source_class
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        raise ValueError("no test images outside the target class (of the source class) to measure on")
    images = test_set.images[torch.from_numpy(idx)]
    patched = stamp_trigger(images, trigger, location, margin, torch.Generator().manual_seed(seed))
    hits = int((predict_proba(model, patched, batch_size).argmax(1) == target_class).sum())
    clean = int((predict_proba(model, images, batch_size).argmax(1) == target_class).sum())
    return BackdoorResult(hits, len(idx), clean)


def evaluate_backdoor(poison_set, model: nn.Module, test_set: ImageTensorDataset,
                      source_class: int | None = None, seed: int = 0) -> BackdoorResult:
    """:func:`backdoor_success` with the trigger, target class, placement (and source class, unless
    given) recorded in a backdoor ``PoisonSet`` (badnets, clean-label backdoor)."""
    if poison_set.trigger is None or poison_set.adversarial_class < 0:
        raise ValueError(f"the {poison_set.attack!r} poison set records no trigger and target class")
    params = poison_set.params
    if source_class is None and poison_set.source_class >= 0:
        source_class = poison_set.source_class
    return backdoor_success(model, test_set, torch.from_numpy(np.asarray(poison_set.trigger)),
                            poison_set.adversarial_class, source_class, params.get("location", "bottom_right"),
                            int(params.get("margin", 1)), seed)
