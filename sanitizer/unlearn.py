"""Unlearning: undo what the model learned from examples a round flagged.

Dropping an example stops its *future* gradient; what it already taught the model stays. Poisons
learned abnormally fast (from-scratch gradient matching, backdoors) have done most of their work by
the time they stand out, so the ``unlearn`` action also reverses it, in the spirit of Anti-Backdoor
Learning's gradient ascent (Li et al., NeurIPS 2021). For gradient matching the reason is direct:
the poisons are crafted so that their training gradient points along the gradient that moves the
target into the adversarial class, so undoing their fit moves the target back.

How, and why this way:

- Plain ascent on the cross-entropy stalls exactly where it is needed (a well-learned example has a
  saturated softmax and a vanishing gradient), so the flagged examples are trained towards the
  *uniform* prediction instead (cross-entropy against 1/C for every class): its logit gradient
  p − 1/C does not vanish, points down the learned class, and its minimum is the model knowing
  nothing about them.
- Each step also trains on a batch of *kept* examples with their labels (the "retain" term of
  machine unlearning), and the gradient norm is clipped: unlearning a handful of examples with
  unclipped steps moves the logits by lr·‖h‖² and can wreck a small model (measured on digits:
  test accuracy 0.92 → 0.66 after one example).
- A batch stops being trained once its loss on its own labels reaches chance, ln(C), and the whole
  pass stops when their mean does, or after ``max_passes``. Flagged examples the model has not
  learned (loss already above chance, e.g. mislabelled ones) are left alone: nothing to undo.
- BatchNorm statistics are left alone (eval mode) and the user's optimizer is not touched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sanitizer.embeddings import _call, _EvalMode, _logits_of, _to_device, iterate_batches, model_device
from sanitizer.errors import SanitizerError, check_positive_int, check_threshold

UNLEARN_OPTIONS = ("lr", "max_passes", "max_grad_norm")  # what a user sets; the sanitizer passes the rest


def check_unlearn_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``Sanitizer(unlearn_options=...)`` checked when the sanitizer is built, not at the first round that
    unlearns: only :data:`UNLEARN_OPTIONS`, a positive finite ``lr`` and ``max_grad_norm``, ``max_passes`` >= 1."""
    unknown = sorted(set(options) - set(UNLEARN_OPTIONS))
    if unknown:
        raise SanitizerError(f"unknown unlearn option(s) {unknown}; the options are {', '.join(UNLEARN_OPTIONS)}")
    out = dict(options)
    for name in ("lr", "max_grad_norm"):
        if name in out:
            out[name] = check_threshold(out[name], f"unlearn_options[{name!r}]")
    if "max_passes" in out:
        out["max_passes"] = check_positive_int(out["max_passes"], "unlearn_options['max_passes']")
    return out


def unlearn(model: nn.Module, dataset: Dataset, indices: np.ndarray, num_classes: int, *,
            retain: np.ndarray | None = None, lr: float = 0.01, max_passes: int = 5, batch_size: int = 128,
            max_grad_norm: float = 1.0, collate_fn=None, seed: int = 0) -> dict[str, Any]:
    """Train the learned ones among ``dataset[indices]`` towards the uniform prediction (with a batch of
    ``retain`` examples on their labels at every step) until their loss reaches ln(num_classes).

    Returns a record: examples flagged, learned (and so unlearned), passes, steps, their mean loss
    before and after, the retained examples' mean loss before and after (when ``retain`` is given),
    seconds.

    Example:
        >>> record = unlearn(model, train_set_without_augmentation, flagged, num_classes=10,
        ...                  retain=kept_indices)  # doctest: +SKIP
        >>> record["loss_after"] >= math.log(10) * 0.9  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    chance = math.log(max(num_classes, 2))
    record: dict[str, Any] = {"examples": int(len(indices)), "learned": 0, "passes": 0, "steps": 0,
                              "loss_before": None, "loss_after": None, "retain_loss_before": None,
                              "retain_loss_after": None, "seconds": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]
    if len(indices) == 0 or not params:
        return record
    device = model_device(model)
    rng = np.random.default_rng(seed)
    retain = np.asarray(retain if retain is not None else [], dtype=np.int64)
    probe = rng.choice(retain, min(len(retain), 1024), replace=False) if len(retain) else retain
    optimizer = torch.optim.SGD(params, lr=lr)
    with _EvalMode(model):
        losses = _losses(model, dataset, indices, batch_size, collate_fn, device)
        learned = np.asarray(indices)[losses < chance]
        record["learned"] = int(len(learned))
        if not len(learned):
            record["seconds"] = time.perf_counter() - t0
            return record
        record["loss_before"] = float(losses[losses < chance].mean())
        if len(probe):
            record["retain_loss_before"] = float(_losses(model, dataset, probe, batch_size, collate_fn, device).mean())
        while record["passes"] < max_passes:
            record["passes"] += 1
            total = 0.0
            for x, y in iterate_batches(dataset, batch_size, learned, collate_fn=collate_fn):
                x, y = _to_device(x, device), y.to(device)
                log_p = F.log_softmax(_logits_of(_call(model, x)), 1)
                own = F.nll_loss(log_p, y)
                total += own.item() * len(y)
                if own.item() >= chance:  # this batch is already at chance: do not push it further
                    continue
                loss = (-log_p.mean(1)).mean()  # cross-entropy against the uniform prediction
                if len(retain):
                    loss = loss + _retain_loss(model, dataset, rng.choice(retain, min(len(retain), len(y))),
                                               collate_fn, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                record["steps"] += 1
            if total / len(learned) >= chance:
                break
        record["loss_after"] = float(_losses(model, dataset, learned, batch_size, collate_fn, device).mean())
        if len(probe):
            record["retain_loss_after"] = float(_losses(model, dataset, probe, batch_size, collate_fn, device).mean())
    optimizer.zero_grad(set_to_none=True)
    record["seconds"] = time.perf_counter() - t0
    return record


def _retain_loss(model, dataset, rows, collate_fn, device) -> torch.Tensor:
    x, y = next(iterate_batches(dataset, len(rows), rows, collate_fn=collate_fn))
    return F.cross_entropy(_logits_of(_call(model, _to_device(x, device))), y.to(device))


@torch.no_grad()
def _losses(model, dataset, indices, batch_size, collate_fn, device) -> np.ndarray:
    out = [F.cross_entropy(_logits_of(_call(model, _to_device(x, device))), y.to(device), reduction="none").cpu()
           for x, y in iterate_batches(dataset, batch_size, indices, collate_fn=collate_fn)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
