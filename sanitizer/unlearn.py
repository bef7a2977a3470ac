"""Unlearning: undo what the model learned from examples a round flagged (gradient ascent).

Dropping an example stops its *future* gradient; what it already taught the model stays. Poisons
learned abnormally fast (from-scratch gradient matching, backdoors) have done most of their work by
the time they stand out, so the ``unlearn`` action also reverses it, in the spirit of Anti-Backdoor
Learning's gradient ascent (Li et al., NeurIPS 2021). For gradient matching the reason is direct:
the poisons are crafted so that their training gradient points along the gradient that moves the
target into the adversarial class, so undoing their fit moves the target back.

Plain ascent on the cross-entropy stalls exactly where it is needed: a well-learned example has a
saturated softmax and a vanishing gradient. So the flagged examples are instead trained towards the
*uniform* prediction (cross-entropy against 1/C for every class). Its logit gradient p − 1/C does not
vanish, points the same way as the ascent (down the learned class), and it cannot run away: its
minimum is the model knowing nothing about them. It stops once their mean loss on their own labels
reaches chance, ln(C), or after ``max_passes`` passes. Flagged examples the model has not learned
(loss already above chance, e.g. mislabelled ones) are left alone: there is nothing to undo.
BatchNorm statistics are left alone (eval mode) and the user's optimizer is not touched.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sanitizer.embeddings import _call, _EvalMode, _logits_of, _to_device, iterate_batches, model_device


def unlearn(model: nn.Module, dataset: Dataset, indices: np.ndarray, num_classes: int, *, lr: float = 0.01,
            max_passes: int = 5, batch_size: int = 128, collate_fn=None) -> dict[str, Any]:
    """Train ``dataset[indices]`` towards the uniform prediction until their mean cross-entropy on their
    labels reaches ln(num_classes) (chance), or for ``max_passes`` passes.

    Only the flagged examples the model has learned (loss below chance) are trained. Returns a record:
    examples flagged, learned (and unlearned), passes run, their mean loss before and after, seconds.

    Example:
        >>> record = unlearn(model, train_set_without_augmentation, flagged, num_classes=10)  # doctest: +SKIP
        >>> record["loss_after"] >= math.log(10)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    chance = math.log(max(num_classes, 2))
    params = [p for p in model.parameters() if p.requires_grad]
    if len(indices) == 0 or not params:
        return {"examples": int(len(indices)), "learned": 0, "passes": 0, "loss_before": None,
                "loss_after": None, "seconds": 0.0}
    device = model_device(model)
    optimizer = torch.optim.SGD(params, lr=lr)
    passes = 0
    with _EvalMode(model):
        losses = _losses(model, dataset, indices, batch_size, collate_fn, device)
        learned = np.asarray(indices)[losses < chance]
        before = float(losses[losses < chance].mean()) if len(learned) else None
        after = before
        while len(learned) and passes < max_passes:
            passes += 1
            total, count = 0.0, 0
            for x, y in iterate_batches(dataset, batch_size, learned, collate_fn=collate_fn):
                x, y = _to_device(x, device), y.to(device)
                log_p = F.log_softmax(_logits_of(_call(model, x)), 1)
                own = F.nll_loss(log_p, y)
                total, count = total + own.item() * len(y), count + len(y)
                optimizer.zero_grad(set_to_none=True)
                (-log_p.mean(1)).mean().backward()  # cross-entropy against the uniform prediction
                optimizer.step()
            if total / count >= chance:
                break
        if len(learned):
            after = float(_losses(model, dataset, learned, batch_size, collate_fn, device).mean())
    optimizer.zero_grad(set_to_none=True)
    return {"examples": int(len(indices)), "learned": int(len(learned)), "passes": passes,
            "loss_before": before, "loss_after": after, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def _losses(model, dataset, indices, batch_size, collate_fn, device) -> np.ndarray:
    out = [F.cross_entropy(_logits_of(_call(model, _to_device(x, device))), y.to(device), reduction="none").cpu()
           for x, y in iterate_batches(dataset, batch_size, indices, collate_fn=collate_fn)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
