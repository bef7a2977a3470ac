"""A small, deterministic training loop for the demo, the attacks' surrogates and the benchmarks.

Users bring their own loops; this one exists so that every experiment in the package trains the
same way (SGD + Nesterov, step decays, batched flip/crop augmentation) and can host a sanitizer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sanitizer.augment import flip_crop
from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.embeddings import ImageLayout, model_device
from sanitizer.errors import SanitizerError
from sanitizer.progress import log, progress
from sanitizer.sampler import KeepSampler


@dataclass
class TrainConfig:
    """Recipe of a training run.

    ``schedule="step"``: lr drops ×0.1 at the ``milestones`` (fractions of ``epochs``).
    ``schedule="onecycle"``: lr rises linearly to ``lr`` over the first 15 % of the epochs, then falls
    linearly towards 0 (evaluated at each epoch's midpoint; short from-scratch runs train best this way).
    """

    epochs: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = True
    crop_padding: int = 4
    milestones: tuple[float, ...] = (0.375, 0.625, 0.875)
    seed: int = 0
    schedule: str = "step"
    # CPU image batches in channels-last layout: ~1.6x faster steps of the bundled CNNs on one thread. Augmented
    # batches (flip_crop) come out channels-last already, so this changes runs without augmentation only (the
    # same seed still gives the same weights, not those of the other layout)
    channels_last: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    seconds: float
    epoch_seconds: list[float] = field(default_factory=list)
    final_loss: float = float("nan")


def train_classifier(
    model: nn.Module,
    train_set: ImageTensorDataset,
    config: TrainConfig,
    sanitizer=None,
    start_epoch: int = 0,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place on ``train_set`` (images in [0, 1]), optionally under a sanitizer.

    With a sanitizer, ``sanitizer.start_epoch(epoch)`` runs before every epoch and only kept
    indices are visited. ``start_epoch`` > 0 resumes a run (the optimizer state is rebuilt from the
    schedule, so resume from a prefix only with this same function and a saved optimizer state).
    """
    device = model_device(model)
    torch.manual_seed(config.seed)
    optimizer, scheduler = make_optimizer(model, config)
    return continue_training(model, train_set, config, optimizer, scheduler, sanitizer, start_epoch,
                             config.epochs, on_epoch_end, desc, device)


def make_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """SGD (+ Nesterov) and the per-epoch lr scheduler that ``config`` describes."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    if config.schedule == "step":
        milestones = [int(round(m * config.epochs)) for m in config.milestones]
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)
    if config.schedule == "onecycle":
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: onecycle_factor(e, config.epochs))
    raise SanitizerError(f"unknown schedule {config.schedule!r}: choose 'step' or 'onecycle'")


def onecycle_factor(epoch: int, epochs: int, peak: float = 0.15) -> float:
    """lr multiplier of ``epoch``: linear warm-up to 1 at ``peak`` of training, then linear decay to 0."""
    t = (epoch + 0.5) / max(epochs, 1)
    return t / peak if t < peak else max(0.0, (1 - t) / (1 - peak))


def epoch_sampler(train_set, seed: int, sanitizer=None) -> KeepSampler:
    """The shuffling sampler of :func:`continue_training`: the sanitizer's sampler over its kept
    examples, or without one a :class:`~sanitizer.sampler.KeepSampler` over every index. Both shuffle
    epoch ``e`` with ``(seed, e)`` the same way, so a run without a sanitizer visits the examples in
    the order a run with a ``policy="none"`` sanitizer (which keeps everything) does."""
    if sanitizer is not None:
        return sanitizer.sampler(shuffle=True, seed=seed)
    everything = np.ones(len(train_set), dtype=bool)
    return KeepSampler(lambda: everything, shuffle=True, seed=seed)


class EpochCheckpoint:
    """The state of a :func:`continue_training` run after each epoch (model, optimizer, scheduler, sanitizer and
    the caller's ``extra`` dict of plain values), so that a killed run resumes at its next epoch and ends
    where the uninterrupted run would have (every epoch's order and augmentation follow ``(seed, epoch)``).

    Saved with ``torch.save`` atomically and read with ``weights_only=True``; a file saved under another
    ``key`` (another run) is ignored. The caller deletes it (:meth:`remove`) once the run's result is safe.

    Example:
        >>> trace = {}
        >>> ckpt = EpochCheckpoint("runs/victim.pt", key="set0/density", extra=trace)   # doctest: +SKIP
        >>> continue_training(model, data, cfg, opt, sched, san, 0, cfg.epochs, checkpoint=ckpt)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, key: str, extra: dict | None = None):
        self.path, self.key = Path(path), str(key)
        self.extra = extra if extra is not None else {}
        self.resumed_at: int | None = None  # the epoch a resumed run continued from

    def restore(self, model, optimizer, scheduler, sanitizer) -> tuple[int, float] | None:
        """Load the saved state into the given objects: ``(next epoch, seconds already spent)``, or None."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("key") != self.key:
            return None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if sanitizer is not None:
            sanitizer.load_state_dict(state["sanitizer"])
        for name, value in state["extra"].items():  # dicts in place: the caller's hooks hold them
            if isinstance(self.extra.get(name), dict):
                self.extra[name].update(value)
            else:
                self.extra[name] = value
        self.resumed_at = int(state["epoch"]) + 1
        return self.resumed_at, float(state["seconds"])

    def save(self, epoch: int, model, optimizer, scheduler, sanitizer, seconds: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"key": self.key, "epoch": int(epoch), "seconds": float(seconds), "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "sanitizer": sanitizer.state_dict() if sanitizer is not None else None, "extra": dict(self.extra)}
        partial = self.path.with_name(f"{self.path.stem}.partial{os.getpid()}{self.path.suffix}")
        torch.save(state, partial)
        os.replace(partial, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def continue_training(model, train_set, config, optimizer, scheduler, sanitizer, start_epoch, end_epoch,
                      on_epoch_end=None, desc="train", device=None, on_batch=None,
                      batch_transform=None, checkpoint: EpochCheckpoint | None = None) -> TrainResult:
    """Run epochs ``[start_epoch, end_epoch)`` with a given optimizer and scheduler (for branching runs).

    ``on_batch(epoch, indices, logits, labels)`` sees every training step's (detached) logits, keyed by
    dataset index: what a defense can harvest from the training pass without an extra pass.
    ``batch_transform(x, generator)`` runs on every (augmented) batch, e.g. fresh random noise.
    ``checkpoint``: saved after every epoch and resumed from when it holds this run (:class:`EpochCheckpoint`);
    the result's ``seconds`` then include the time spent before the resume.
    """
    device = device or model_device(model)
    gen = torch.Generator().manual_seed(config.seed)
    result = TrainResult(0.0)
    prior_seconds = 0.0
    resumed = checkpoint.restore(model, optimizer, scheduler, sanitizer) if checkpoint is not None else None
    if resumed is not None:
        start_epoch, prior_seconds = max(start_epoch, resumed[0]), resumed[1]
        log(f"[{desc}] resumed at epoch {start_epoch} from {checkpoint.path}")
    sampler = epoch_sampler(train_set, config.seed, sanitizer)
    run = ImageLayout(device, config.channels_last)
    t_start = time.perf_counter()
    bar = progress(range(start_epoch, end_epoch), desc=desc)
    for epoch in bar:
        t0 = time.perf_counter()
        if sanitizer is not None:
            sanitizer.start_epoch(epoch)  # runs a round when one is due, then moves its samplers to `epoch`
        sampler.set_epoch(epoch)
        order = torch.as_tensor(list(sampler), dtype=torch.long)
        gen.manual_seed(config.seed * 104_729 + epoch)
        model.train()
        losses = []
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            x = train_set.images[idx]
            y = train_set.labels[idx]
            if config.augment:
                x = flip_crop(x, config.crop_padding, gen)
            if batch_transform is not None:
                x = batch_transform(x, gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = run(model, x)
            loss = F.cross_entropy(logits, y)
            if on_batch is not None:
                on_batch(epoch, idx, logits.detach(), y)
            if not torch.isfinite(loss):
                raise SanitizerError(f"the training loss became {loss.item()} at epoch {epoch}; "
                                     "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
        result.epoch_seconds.append(time.perf_counter() - t0)
        result.final_loss = float(np.mean(losses)) if losses else float("nan")
        bar.set_postfix(loss=f"{result.final_loss:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        if checkpoint is not None:
            spent = prior_seconds + time.perf_counter() - t_start
            checkpoint.save(epoch, model, optimizer, scheduler, sanitizer, spent)
    result.seconds = prior_seconds + time.perf_counter() - t_start
    return result


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Softmax probabilities ``[N, C]`` in eval mode (the model's modes are restored)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    run = ImageLayout(device)
    out = [torch.softmax(run(model, images[i:i + batch_size].to(device)), 1).cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, dataset: ImageTensorDataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``dataset``."""
    probs = predict_proba(model, dataset.images, batch_size)
    return float((probs.argmax(1) == dataset.labels).float().mean())
