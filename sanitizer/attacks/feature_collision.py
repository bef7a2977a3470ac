"""Feature collision, "poison frogs" (Shafahi et al., 2018): each poison starts from a base image of the
adversarial class and moves until its features collide with the target's, while staying close to the
base image:  ``‖φ(x) − φ(t)‖² + β‖x − b‖²``.

Optimised by forward-backward splitting: a gradient step on the feature term, then the proximal step
of the image term, ``x ← (x + λβ b) / (1 + λβ)``. A step that raises a poison's objective is undone and
that poison's step size halved (as in the reference implementation). Options: a watermark of the
target blended into the bases at ``watermark`` opacity (0.3 in the paper), and an L∞ bound ``eps``
around the original base (how the transfer benchmark bounds it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from sanitizer.attacks._util import (
    as_models,
    check_positive_int,
    class_pool,
    eval_mode,
    feature_fn,
    freeze,
    module_device,
    resolve_single_target,
    unfreeze,
)
from sanitizer.attacks.base import (
    Attack,
    PoisonSet,
    ThreatModel,
    check_budget,
    check_eps,
    project_linf,
    quantize,
    register_attack,
    resolve_budget,
)
from sanitizer.attacks.bullseye_polytope import BASE_SELECTIONS, choose_bases
from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.progress import progress


@register_attack("feature_collision")
class FeatureCollision(Attack):
    """Poison-frogs feature collision, vectorised over the poisons (each has its own objective).

    ``beta`` defaults to ``beta0 · (feature dim / input dim)²`` as in the paper (β0 = 0.25).

    Example:
        >>> attack = FeatureCollision(budget=1, watermark=0.3)
        >>> poisons = attack.craft(train_set, surrogate=feature_net, test_set=test_set,
        ...                        target_index=17, adversarial_class=3)  # doctest: +SKIP
    """

    threat_model = ThreatModel("targeted", clean_label=True, setting="transfer",
                               summary="poison features collide with the target's (Shafahi et al. 2018)")
    loss_description = "Mean objective over the poisons at every iteration of the last craft."

    def __init__(self, budget: int | float = 1, iterations: int = 1000, lr: float = 0.01, beta0: float = 0.25,
                 beta: float | None = None, watermark: float = 0.0, eps: float | None = None,
                 base_selection: str = "random", decay: float = 0.5) -> None:
        if base_selection not in BASE_SELECTIONS:
            raise ValueError(f"unknown base_selection {base_selection!r}; choose 'random' or 'closest'")
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark is an opacity in [0, 1), got {watermark}")
        if not lr > 0 or not 0 < decay < 1:
            raise ValueError(f"lr must be > 0 and decay in (0, 1); got lr={lr}, decay={decay}")
        if beta is not None and beta < 0 or beta0 < 0:
            raise ValueError("beta and beta0 must be >= 0")
        self.budget = budget
        resolve_budget(budget, 1)  # validates the budget early
        self.iterations = check_positive_int(iterations, "iterations")
        self.lr, self.beta0, self.beta, self.watermark = float(lr), float(beta0), beta, float(watermark)
        self.eps = None if eps is None else check_eps(eps)
        self.base_selection, self.decay = base_selection, float(decay)

    def craft(self, train_set: ImageTensorDataset, *, surrogate=None, test_set=None, target_index=None,
              adversarial_class: int | None = None, source_class: int | None = None, seed: int = 0,
              feature_extractor: Callable | Sequence[Callable] | None = None, **kw) -> PoisonSet:
        nets = as_models(feature_extractor if feature_extractor is not None else surrogate, self.name)
        if len(nets) != 1:
            raise ValueError("feature collision uses one feature extractor; pass a single surrogate")
        net = nets[0]
        phi = feature_fn(net, self.name)
        target, target_label, target_index, adv = resolve_single_target(
            test_set, target_index, adversarial_class, seed, self.name)
        pool = class_pool(train_set, adv)
        budget = check_budget(resolve_budget(self.budget, len(train_set)), len(pool), f"adversarial class {adv}")
        device = module_device(net)
        saved = freeze(nets)
        try:
            with eval_mode(nets):
                bases = choose_bases(train_set, pool, budget, self.base_selection, seed, phi, target, device)
                original = train_set.images[torch.from_numpy(bases)].to(device)
                t = target.to(device)
                with torch.no_grad():
                    t_feat = phi(t[None]).flatten(1)
                beta = self.beta if self.beta is not None else \
                    self.beta0 * (t_feat.shape[1] / t.numel()) ** 2
                poisons, seconds = self._optimise(phi, original, t, t_feat, beta)
        finally:
            unfreeze(nets, saved)
        return PoisonSet(self.name, bases, poisons.cpu().numpy(), np.full(budget, adv),
                         target_images=target[None].numpy(), target_labels=np.array([target_label]),
                         target_indices=np.array([int(target_index)]), adversarial_class=adv,
                         params={**self.params(), "beta_used": beta, "seed": seed, "seconds": seconds,
                                 "loss_initial": self._history[0], "loss_final": self._history[-1]})

    def _objective(self, phi, x, base, t_feat, beta) -> torch.Tensor:
        """Per-poison objective ``‖φ(x) − φ(t)‖² + β‖x − b‖²``, shape [P]."""
        feat = (phi(x).flatten(1) - t_feat).pow(2).sum(1)
        return feat + beta * (x - base).flatten(1).pow(2).sum(1)

    def _constrain(self, x: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        if self.eps is not None:
            x = torch.min(torch.max(x, original - self.eps), original + self.eps)
        return x.clamp(0, 1)

    def _optimise(self, phi, original, target, t_feat, beta) -> tuple[torch.Tensor, float]:
        # Watermarked bases are the anchors of the proximal term (and the starting points).
        base = self._constrain((1 - self.watermark) * original + self.watermark * target, original)
        x = base.clone()
        lr = torch.full((len(x), 1, 1, 1), self.lr, device=x.device)
        with torch.no_grad():
            objective = self._objective(phi, x, base, t_feat, beta)
        self._history = [float(objective.mean())]
        t0 = time.perf_counter()
        for _ in progress(range(self.iterations), desc=self.name):
            x.requires_grad_(True)
            feat_loss = (phi(x).flatten(1) - t_feat).pow(2).sum()
            (grad,) = torch.autograd.grad(feat_loss, x)
            with torch.no_grad():
                x = x.detach()
                step = x - lr * grad                                    # forward (gradient) step
                step = (step + lr * beta * base) / (1 + lr * beta)      # backward (proximal) step
                step = self._constrain(step, original)
                new_objective = self._objective(phi, step, base, t_feat, beta)
                better = new_objective <= objective
                keep = better[:, None, None, None]
                x = torch.where(keep, step, x)
                objective = torch.where(better, new_objective, objective)
                lr = torch.where(keep, lr, lr * self.decay)
            self._history.append(float(objective.mean()))
        if self.eps is not None:
            poisons = project_linf(x, original, self.eps)
        else:
            poisons = quantize(x)
        return poisons, time.perf_counter() - t0
