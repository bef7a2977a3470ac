"""Adversarial poisons (Fowl et al., 2021, "Adversarial Examples Make Strong Poisons"): every released
image is replaced by a class-targeted adversarial example towards class ``(y + 1) mod C`` of a surrogate
trained on clean data. A victim trained on the released data learns the perturbations' features instead
of the images' and generalises poorly to clean test data (an indiscriminate availability attack).

Also home of :func:`pgd_linf`, the batched L∞ PGD used by the other attacks.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from sanitizer.attacks._util import as_models, check_positive_int, eval_mode, freeze, module_device, unfreeze
from sanitizer.attacks.base import (
    Attack,
    PoisonSet,
    ThreatModel,
    check_eps,
    project_linf,
    register_attack,
    resolve_budget,
)
from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.progress import progress


def pgd_linf(models, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int, step_size: float,
             targeted: bool, random_start: bool = False, generator: torch.Generator | None = None,
             batch_size: int = 256, desc: str = "pgd") -> tuple[torch.Tensor, list[float]]:
    """L∞ PGD on a batch of images against one model or an ensemble (losses averaged).

    ``targeted``: minimise the cross-entropy towards ``labels``; otherwise maximise it for ``labels``.
    Returns the perturbed images (quantised to 8 bits, inside the bound) and the mean loss per step
    (the loss being minimised: CE towards the target, or minus CE for the untargeted attack).
    """
    nets = as_models(models, "pgd")
    device = module_device(nets[0])
    history = np.zeros(steps)
    out = []
    saved = freeze(nets)
    try:
        with eval_mode(nets):
            for start in progress(range(0, len(images), batch_size), desc=desc):
                base = images[start:start + batch_size].to(device)
                y = labels[start:start + batch_size].to(device)
                x = base.clone()
                if random_start:
                    noise = (torch.rand(base.shape, generator=generator) * 2 - 1) * eps
                    x = (base + noise.to(device)).clamp(0, 1)
                for step in range(steps):
                    x.requires_grad_(True)
                    loss = torch.stack([F.cross_entropy(n(x), y) for n in nets]).mean()
                    loss = loss if targeted else -loss
                    (grad,) = torch.autograd.grad(loss, x)
                    with torch.no_grad():
                        x = x.detach() - step_size * grad.sign()
                        x = torch.min(torch.max(x, base - eps), base + eps).clamp_(0, 1)
                    history[step] += float(loss.detach()) * len(base)
                out.append(project_linf(x, base, eps).cpu())
    finally:
        unfreeze(nets, saved)
    return torch.cat(out), list(history / max(len(images), 1))


def release_indices(train_set: ImageTensorDataset, fraction: float, seed: int) -> np.ndarray:
    """Every index (``fraction`` = 1), or a random ``fraction`` of them."""
    if fraction == 1:
        return np.arange(len(train_set))
    n = resolve_budget(float(fraction), len(train_set))
    return np.sort(np.random.default_rng(seed).choice(len(train_set), n, replace=False))


@register_attack("adversarial_poisons")
class AdversarialPoisons(Attack):
    """Class-targeted PGD towards ``(y + 1) mod C`` on every released image, within ``eps`` in L∞.

    Example:
        >>> poisons = AdversarialPoisons(eps=8/255, steps=100).craft(train_set, surrogate=model)  # doctest: +SKIP
    """

    threat_model = ThreatModel("indiscriminate", clean_label=True, setting="from-scratch",
                               summary="class-targeted adversarial examples as poisons (Fowl et al. 2021)")
    loss_description = "Mean cross-entropy towards the shifted class at every PGD step of the last craft."

    def __init__(self, eps: float = 8 / 255, steps: int = 100, step_size: float | None = None,
                 fraction: float = 1.0, random_start: bool = False, batch_size: int = 256) -> None:
        self.eps = check_eps(eps)
        self.steps = check_positive_int(steps, "steps")
        # Madry et al.'s rule: the steps together can cross the ball 2.5 times.
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        self.fraction, self.random_start = float(fraction), bool(random_start)
        self.batch_size = check_positive_int(batch_size, "batch_size")

    def craft(self, train_set: ImageTensorDataset, *, surrogate=None, test_set=None, target_index=None,
              adversarial_class=None, source_class=None, seed: int = 0, **kw) -> PoisonSet:
        nets = as_models(surrogate, self.name)
        indices = release_indices(train_set, self.fraction, seed)
        idx = torch.from_numpy(indices)
        labels = train_set.labels[idx]
        shifted = (labels + 1) % train_set.num_classes
        t0 = time.perf_counter()
        images, self._history = pgd_linf(nets, train_set.images[idx],
                                         shifted, self.eps, self.steps, self.step_size, targeted=True,
                                         random_start=self.random_start,
                                         generator=torch.Generator().manual_seed(seed),
                                         batch_size=self.batch_size, desc=self.name)
        return PoisonSet(self.name, indices, images.numpy(), labels.numpy(),
                         params={**self.params(), "seed": seed, "seconds": time.perf_counter() - t0,
                                 "loss_initial": self._history[0], "loss_final": self._history[-1]})
