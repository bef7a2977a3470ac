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


def planted_images(n: int = 240, seed: int = 0) -> tuple[ImageTensorDataset, np.ndarray]:
    """Two-class 8×8 images; six examples of class 0 look like class 1 (isolated in their class)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand(n, 1, 8, 8, generator=gen) * 0.3
    x[y == 1] += 0.6
    planted = torch.tensor([0, 2, 4, 6, 8, 10])
    x[planted] += 0.6  # class-0 label, class-1 look
    return ImageTensorDataset(x.clamp(0, 1), y, num_classes=2), planted.numpy()


def uninterrupted_and_resumed(ds, cfg, stop: int, **sanitizer_options):
    """Train ``cfg.epochs`` epochs twice with :func:`~sanitizer.train.continue_training` (a small CompactCNN,
    SGD with momentum, a step scheduler, a Sanitizer with ``sanitizer_options``): straight through, and
    stopped after epoch ``stop - 1``, checkpointed (model, optimizer, scheduler, sanitizer), rebuilt and
    resumed. Returns the two ``(model, sanitizer)`` pairs."""
    import copy

    from sanitizer import Sanitizer
    from sanitizer.models import CompactCNN
    from sanitizer.train import continue_training

    def fresh():
        torch.manual_seed(0)
        model = CompactCNN(1, 2, width=4)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 3)
        return model, opt, sched, Sanitizer(model, ds, **sanitizer_options)

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


def last_layer_rows(separation: float, flip_rate: float, seed: int = 0, classes: int = 10, per_class: int = 60,
                    dim: int = 16):
    """Explicit last-layer gradient rows (softmax error ⊗ [features; 1]) of a model that predicts the true
    class, for Gaussian feature clusters ``separation`` apart, with ``flip_rate`` of the labels flipped."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * separation
    true = np.repeat(np.arange(classes), per_class)
    features = np.maximum(centers[true] + rng.normal(size=(len(true), dim)), 0).astype(np.float32)
    labels = true.copy()
    flipped = rng.random(len(true)) < flip_rate
    labels[flipped] = (true[flipped] + rng.integers(1, classes, flipped.sum())) % classes
    probs = np.full((len(true), classes), 0.02)
    probs[np.arange(len(true)), true] = 1 - 0.02 * (classes - 1)
    error = (probs - np.eye(classes)[labels]).astype(np.float32)
    h1 = np.concatenate([features, np.ones((len(true), 1), np.float32)], 1)
    return (error[:, :, None] * h1[:, None, :]).reshape(len(true), -1), labels, flipped
