"""Bullseye Polytope (Aghakhani et al., 2021): clean-label targeted poisons whose *mean* feature vector
sits on the target's feature vector ("bullseye"), so that the target falls inside the poisons' polytope
and a victim fine-tuned on them labels it with the poisons' (adversarial) class.

Loss, averaged over an ensemble of feature extractors (and dropout draws when they have dropout):
``‖mean_j φ(x_j) − φ(t)‖ / ‖φ(t)‖``. The ``transfer`` variant uses the penultimate features; the
``end2end`` variant averages that loss over the outputs of several blocks of each network.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from sanitizer.attacks._util import (
    as_models,
    check_positive_int,
    class_pool,
    eval_mode,
    feature_fn,
    freeze,
    has_dropout,
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
    register_attack,
    resolve_budget,
)
from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.progress import progress

VARIANTS = ("transfer", "end2end")
BASE_SELECTIONS = ("random", "closest")


def default_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks whose outputs the end-to-end variant matches: the parameterised children of
    the model's longest ``nn.Sequential`` (the conv blocks of CompactCNN, the residual blocks of ResNet)."""
    best: tuple[int, str, nn.Sequential] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            blocks = [c for c in module.children() if any(True for _ in c.parameters())]
            if len(blocks) >= 2 and (best is None or len(blocks) > best[0]):
                best = (len(blocks), name, module)
    if best is None:
        raise ValueError(f"could not find the blocks of {type(model).__name__} for the end2end variant; "
                         "pass blocks=[module names]")
    _, prefix, seq = best
    return [f"{prefix}.{child}" if prefix else child for child, c in seq.named_children()
            if any(True for _ in c.parameters())]


def choose_bases(train_set: ImageTensorDataset, pool: np.ndarray, budget: int, selection: str, seed: int,
                 phi: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 target: torch.Tensor | None = None, device: torch.device | None = None,
                 batch_size: int = 256) -> np.ndarray:
    """``budget`` base indices from ``pool``: at random with ``seed``, or the closest to the target in φ."""
    if selection == "random":
        return np.sort(np.random.default_rng(seed).choice(pool, budget, replace=False))
    with torch.no_grad():
        t = phi(target[None].to(device)).flatten(1)
        dists = []
        for start in range(0, len(pool), batch_size):
            x = train_set.images[torch.from_numpy(pool[start:start + batch_size])].to(device)
            dists.append((phi(x).flatten(1) - t).norm(dim=1).cpu())
    order = torch.cat(dists).argsort()[:budget].numpy()
    return np.sort(pool[order])


class _BlockFeatures:
    """Collects the outputs of named blocks of a model during one forward pass."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"{type(model).__name__} has no modules named {missing}; "
                             f"choose from {list(modules)[1:12]}...")
        self.model, self.outputs = model, []
        self.handles = [modules[n].register_forward_hook(self._hook) for n in names]

    def _hook(self, module, inputs, output) -> None:
        self.outputs.append(output.flatten(1))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.outputs = []
        forward = getattr(self.model, "penultimate", self.model)
        forward(x)
        return self.outputs

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@register_attack("bullseye_polytope")
class BullseyePolytope(Attack):
    """Bullseye Polytope poisons from the adversarial class, bounded in L∞ by ``eps``.

    Example:
        >>> attack = BullseyePolytope(budget=5, eps=8/255, iterations=800)
        >>> poisons = attack.craft(train_set, surrogate=feature_net, test_set=test_set,
        ...                        target_index=17, adversarial_class=3, seed=0)  # doctest: +SKIP
        >>> attack.loss_history[0] > attack.loss_history[-1]  # doctest: +SKIP
        True
    """

    threat_model = ThreatModel("targeted", clean_label=True, setting="transfer",
                               summary="mean poison feature on the target feature (Aghakhani et al. 2021)")
    loss_description = "The objective at every iteration of the last craft."

    def __init__(self, budget: int | float = 5, eps: float = 8 / 255, iterations: int = 800, lr: float = 0.04,
                 variant: str = "transfer", base_selection: str = "random", dropout_draws: int = 1,
                 blocks: Sequence[str] | None = None) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose 'transfer' or 'end2end'")
        if base_selection not in BASE_SELECTIONS:
            raise ValueError(f"unknown base_selection {base_selection!r}; choose 'random' or 'closest'")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.budget = budget
        resolve_budget(budget, 1)  # validates the budget early
        self.eps = check_eps(eps)
        self.iterations = check_positive_int(iterations, "iterations")
        self.lr, self.variant, self.base_selection = float(lr), variant, base_selection
        self.dropout_draws = check_positive_int(dropout_draws, "dropout_draws")
        self.blocks = list(blocks) if blocks is not None else None

    def craft(self, train_set: ImageTensorDataset, *, surrogate=None, test_set=None, target_index=None,
              adversarial_class: int | None = None, source_class: int | None = None, seed: int = 0,
              feature_extractor: Callable | Sequence[Callable] | None = None, **kw) -> PoisonSet:
        nets = as_models(feature_extractor if feature_extractor is not None else surrogate, self.name)
        target, target_label, target_index, adv = resolve_single_target(
            test_set, target_index, adversarial_class, seed, self.name)
        pool = class_pool(train_set, adv)
        budget = check_budget(resolve_budget(self.budget, len(train_set)), len(pool), f"adversarial class {adv}")
        device = module_device(nets[0])
        if self.variant == "end2end":
            if not all(isinstance(n, nn.Module) for n in nets):
                raise ValueError("the end2end variant needs nn.Module surrogates (their blocks are hooked)")
            extractors = [_BlockFeatures(n, self.blocks or default_blocks(n)) for n in nets]
        else:
            extractors = [(lambda f: (lambda x: [f(x).flatten(1)]))(feature_fn(n, self.name)) for n in nets]
        saved = freeze(nets)
        try:
            with eval_mode(nets):
                bases = choose_bases(train_set, pool, budget, self.base_selection, seed,
                                     feature_fn(nets[0], self.name), target, device)
                with torch.no_grad():
                    target_feats = [[f.detach() for f in ext(target[None].to(device))] for ext in extractors]
            base = train_set.images[torch.from_numpy(bases)].to(device)
            cuda = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # seeded dropout draws, caller's RNG untouched
                torch.manual_seed(seed)
                poisons, seconds = self._optimise(base, extractors, target_feats, nets)
        finally:
            unfreeze(nets, saved)
            for ext in extractors:
                if isinstance(ext, _BlockFeatures):
                    ext.close()
        return PoisonSet(self.name, bases, poisons.cpu().numpy(), np.full(budget, adv),
                         target_images=target[None].numpy(), target_labels=np.array([target_label]),
                         target_indices=np.array([int(target_index)]), adversarial_class=adv,
                         params={**self.params(), "seed": seed, "seconds": seconds,
                                 "loss_initial": self._history[0], "loss_final": self._history[-1]})

    def _loss(self, x: torch.Tensor, extractors, target_feats, draws: int) -> torch.Tensor:
        terms = []
        for ext, t_feats in zip(extractors, target_feats):
            for _ in range(draws):
                for f, t in zip(ext(x), t_feats):
                    terms.append((f.mean(0) - t[0]).norm() / t[0].norm().clamp_min(1e-12))
        return torch.stack(terms).mean()

    def _optimise(self, base: torch.Tensor, extractors, target_feats, nets) -> tuple[torch.Tensor, float]:
        # Nets with dropout craft with dropout on (each draw a different sub-network), as in the paper.
        dropout = any(has_dropout(n) for n in nets)
        draws = self.dropout_draws if dropout else 1
        x = base.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=self.lr)
        self._history = []
        t0 = time.perf_counter()
        with eval_mode(nets, dropout=dropout):
            for _ in progress(range(self.iterations), desc=self.name):
                loss = self._loss(x, extractors, target_feats, draws)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # project onto the eps ball and the image box
                    x.copy_(torch.min(torch.max(x, base - self.eps), base + self.eps).clamp_(0, 1))
                self._history.append(float(loss.detach()))
        poisons = project_linf(x.detach(), base, self.eps)
        with torch.no_grad(), eval_mode(nets):
            self._history.append(float(self._loss(poisons, extractors, target_feats, 1)))
        return poisons, time.perf_counter() - t0
