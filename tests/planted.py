"""A tiny poisoned classification set shared by the integration tests.

Gaussian blobs, one per class, far apart; a few points of each class are relabelled as the next
class, so they are mislabelled examples sitting far from the class they claim: the density policy
must drop them (checked in `tests/test_planted.py`). Inputs are shaped ``[N, 1, 2, 4]`` (tiny
"images") so image pipelines accept them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sanitizer.data import ImageTensorDataset

NUM_CLASSES = 3
DIM = 8


def planted_blobs(per_class: int = 100, planted_per_class: int = 2, seed: int = 0):
    """(images [N,1,2,4], labels [N], sorted planted indices)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(NUM_CLASSES, DIM, generator=gen) * 4
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = centers[labels] + torch.randn(len(labels), DIM, generator=gen)
    planted = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels.numpy() == c)[:planted_per_class]
        planted.extend(idx.tolist())
    planted = np.array(sorted(planted))
    labels[planted] = (labels[planted] + 1) % NUM_CLASSES
    return x.view(-1, 1, 2, 4), labels, planted


def planted_dataset(**kwargs) -> tuple[ImageTensorDataset, np.ndarray]:
    images, labels, planted = planted_blobs(**kwargs)
    return ImageTensorDataset(images, labels, None, NUM_CLASSES), planted


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def uninterrupted_and_resumed(ds, cfg, fresh, stop: int):
    """Train ``cfg.epochs`` epochs twice with :func:`~sanitizer.train.continue_training`: straight
    through, and stopped after epoch ``stop - 1``, checkpointed (model, optimizer, scheduler, sanitizer),
    rebuilt with ``fresh()`` and resumed. ``fresh()`` returns ``(model, optimizer, scheduler, sanitizer)``.
    Returns the two ``(model, sanitizer)`` pairs."""
    import copy

    from sanitizer.train import continue_training

    model, opt, sched, san = fresh()
    continue_training(model, ds, cfg, opt, sched, san, 0, cfg.epochs)
    model2, opt2, sched2, san2 = fresh()
    continue_training(model2, ds, cfg, opt2, sched2, san2, 0, stop)
    checkpoint = copy.deepcopy({"model": model2.state_dict(), "opt": opt2.state_dict(),
                                "sched": sched2.state_dict(), "san": san2.state_dict()})
    model3, opt3, sched3, san3 = fresh()
    model3.load_state_dict(checkpoint["model"])
    opt3.load_state_dict(checkpoint["opt"])
    sched3.load_state_dict(checkpoint["sched"])
    san3.load_state_dict(checkpoint["san"])
    continue_training(model3, ds, cfg, opt3, sched3, san3, stop, cfg.epochs)
    return (model, san), (model3, san3)
