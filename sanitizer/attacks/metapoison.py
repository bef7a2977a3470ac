"""MetaPoison (Huang et al., NeurIPS 2020): poisons crafted by differentiating through training.

Each craft step unrolls ``unroll`` (K = 2) SGD steps of every surrogate in a staggered ensemble
(snapshots taken at different epochs of training) on the poisons plus a random clean batch,
using ``torch.func.functional_call`` so the updated weights stay a function of the poisons. The
outer loss is the Carlini–Wagner margin of the target under the unrolled weights,

    max( max_{j ≠ adv} z_j(target) − z_adv(target), −κ ),

averaged over the ensemble and minimised with Adam for about 60 steps. Perturbations are
additive within ε = 8/255, optionally after a smooth per-poison colour remapping (a coarse
colour lookup grid, trilinearly interpolated, each entry within ``color_eps``, ReColorAdv-style).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sanitizer.attacks._util import as_models
from sanitizer.attacks.base import Attack, PoisonSet, ThreatModel, check_eps, project_linf, register_attack
from sanitizer.attacks.gradient_matching import (
    PIXEL_SCALE,
    _positive,
    differentiable_augment,
    random_poisons,
    resolve_target,
)
from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.embeddings import model_device
from sanitizer.models import make_model
from sanitizer.progress import progress
from sanitizer.train import TrainConfig, train_classifier


def cw_margin(logits: torch.Tensor, adv: int, kappa: float = 0.0) -> torch.Tensor:
    """Carlini–Wagner margin towards class ``adv`` (negative once ``adv`` wins), floored at −κ, averaged."""
    others = logits.clone()
    others[:, adv] = float("-inf")
    return torch.clamp(others.max(1).values - logits[:, adv], min=-kappa).mean()


def apply_color(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Shift each RGB pixel by an offset read (trilinearly) from a per-image colour grid ``[N, 3, G, G, G]``."""
    coords = images.permute(0, 2, 3, 1)[:, None] * 2 - 1  # [N, 1, H, W, 3], (r, g, b) in [-1, 1]
    # grid_sample reads (x, y, z) as (W, H, D): index the grid's last axis by r, then g, then b.
    offsets = F.grid_sample(grid, coords, mode="bilinear", padding_mode="border", align_corners=True)
    return (images + offsets[:, :, 0]).clamp(0, 1)


def staggered_surrogates(train_set: ImageTensorDataset, count: int = 4, epochs: int = 20, arch: str = "cnn",
                         width: int | None = None, model: nn.Module | None = None, seed: int = 0,
                         config: TrainConfig | None = None) -> list[nn.Module]:
    """Snapshots of one training run at ``count`` evenly staggered epochs (the last at ``epochs``).

    Example:
        >>> ensemble = staggered_surrogates(train_set, count=4, epochs=20)  # doctest: +SKIP
        >>> make_attack("metapoison").craft(train_set, surrogate=ensemble, test_set=test_set)  # doctest: +SKIP
    """
    if model is None:
        torch.manual_seed(seed)
        model = make_model(arch, train_set.num_classes, train_set.images.shape[1], width)
    config = config or TrainConfig(epochs=epochs, seed=seed)
    marks = {max(1, int(round(config.epochs * (i + 1) / count))) for i in range(count)}
    snapshots: list[nn.Module] = []

    def keep(epoch: int, m: nn.Module) -> None:
        if epoch + 1 in marks:
            snapshots.append(copy.deepcopy(m).eval())

    train_classifier(model, train_set, config, on_epoch_end=keep, desc="staggered surrogates")
    return snapshots


@register_attack("metapoison")
class MetaPoison(Attack):
    """MetaPoison: unrolled-training poisons against a staggered surrogate ensemble, clean label, targeted.

    Args:
        eps: L∞ bound of the additive part (8/255). budget: count or fraction of the training set.
        steps: Adam craft steps (60); lr: Adam step in units of 1/4 pixel range.
        unroll: K unrolled SGD steps; inner_lr: their learning rate; clean_batch: clean examples
            mixed into every unrolled batch.
        kappa: CW margin floor; augment/shift/flip: augmentation inside the unrolled steps.
        color: add the smooth colour perturbation (RGB only), ``color_eps`` per grid entry,
            ``color_grid`` entries per axis, ``color_smooth`` weight of its smoothness penalty.

    Example:
        >>> ensemble = staggered_surrogates(train_set, count=4, epochs=20)  # doctest: +SKIP
        >>> poisons = make_attack("metapoison").craft(train_set, surrogate=ensemble, test_set=test_set,
        ...                                           target_index=7, adversarial_class=3)  # doctest: +SKIP
    """

    threat_model = ThreatModel("targeted", clean_label=True, setting="from-scratch",
                               summary="poisons optimised through K unrolled training steps of a staggered "
                                       "ensemble (Huang et al. 2020)")

    def __init__(self, eps: float = 8 / 255, budget: int | float = 0.01, steps: int = 60, lr: float = 0.1,
                 unroll: int = 2, inner_lr: float = 0.1, clean_batch: int = 64, kappa: float = 0.0,
                 augment: bool = True, shift: int = 4, flip: bool = True, color: bool = False,
                 color_eps: float = 0.04, color_grid: int = 4, color_smooth: float = 0.05) -> None:
        self.eps = check_eps(eps)
        self.budget = budget
        self.steps = _positive(steps, "steps")
        self.lr = float(lr)
        self.unroll = _positive(unroll, "unroll")
        self.inner_lr = float(inner_lr)
        if int(clean_batch) != clean_batch or clean_batch < 0:
            raise ValueError(f"clean_batch must be an integer ≥ 0, got {clean_batch}")
        self.clean_batch = int(clean_batch)
        self.kappa = float(kappa)
        self.augment, self.shift, self.flip = bool(augment), int(shift), bool(flip)
        self.color = bool(color)
        self.color_eps = float(color_eps)
        self.color_grid = _positive(color_grid, "color_grid")
        self.color_smooth = float(color_smooth)

    def craft(self, train_set: ImageTensorDataset, *, surrogate=None, test_set: ImageTensorDataset | None = None,
              target_index: int | Sequence[int] | None = None, adversarial_class: int | None = None,
              seed: int = 0, **kw) -> PoisonSet:
        """Craft poisons so that ``test_set[target_index]`` is classified as ``adversarial_class``.

        ``surrogate`` is a model or, as in the paper, a staggered ensemble (:func:`staggered_surrogates`).
        """
        t0 = time.perf_counter()
        models = as_models(surrogate, self.name)
        target_images, target_labels, target_indices, adv = resolve_target(
            test_set, target_index, adversarial_class, seed, self.name)
        indices = random_poisons(train_set, adv, self.budget, seed)
        if self.color and train_set.images.shape[1] != 3:
            raise ValueError("color=True needs RGB images (3 channels)")
        device = model_device(models[0])
        idx = torch.from_numpy(indices)
        bases = train_set.images[idx].to(device)
        labels = train_set.labels[idx].to(device)
        targets = target_images.to(device)
        clean_pool = torch.from_numpy(np.setdiff1d(np.arange(len(train_set)), indices))

        gen = torch.Generator().manual_seed(int(seed) * 1000 + 1)
        init = (torch.rand(bases.shape, generator=gen) * 2 - 1).to(device) * self.eps
        delta = ((bases + init).clamp(0, 1) - bases).div(PIXEL_SCALE).requires_grad_(True)
        variables = [delta]
        grid = None
        if self.color:
            g = self.color_grid
            grid = torch.zeros(len(bases), 3, g, g, g, device=device, requires_grad=True)
            variables.append(grid)
        optimizer = torch.optim.Adam(variables, lr=self.lr)
        history = []
        bar = progress(range(self.steps), desc=self.name)
        for _ in bar:
            optimizer.zero_grad(set_to_none=True)
            poisoned = self._poisoned(bases, delta, grid)
            loss = 0.0
            for model in models:
                pick = clean_pool[torch.randint(len(clean_pool), (self.clean_batch,), generator=gen)]
                loss = loss + self._unrolled_loss(model, poisoned, labels, train_set.images[pick].to(device),
                                                  train_set.labels[pick].to(device), targets, adv, gen)
            loss = loss / len(models)
            total = loss + (self.color_smooth * _smoothness(grid) if grid is not None else 0.0)
            # Differentiate the poison variables only: backward() would also leave .grad on the surrogates.
            for var, g in zip(variables, torch.autograd.grad(total, variables)):
                var.grad = g
            optimizer.step()
            with torch.no_grad():
                d = delta.mul(PIXEL_SCALE).clamp_(-self.eps, self.eps)
                delta.copy_(((bases + d).clamp_(0, 1) - bases) / PIXEL_SCALE)
                if grid is not None:
                    grid.clamp_(-self.color_eps, self.color_eps)
            history.append(float(loss.detach()))
            bar.set_postfix(loss=f"{history[-1]:.3f}")

        with torch.no_grad():
            colored = apply_color(bases, grid) if grid is not None else bases
            final = project_linf(colored + delta * PIXEL_SCALE, colored, self.eps)
        params = {**self.params(), "seed": seed, "budget_count": len(indices), "ensemble": len(models),
                  "loss_history": history, "craft_seconds": time.perf_counter() - t0,
                  "total_bound": self.eps + (self.color_eps if self.color else 0.0)}
        return PoisonSet(attack=self.name, indices=indices, images=final.cpu().numpy(), labels=labels.cpu().numpy(),
                         target_images=target_images.numpy(), target_labels=target_labels.numpy(),
                         target_indices=target_indices, adversarial_class=adv, params=params)

    def _poisoned(self, bases, delta, grid):
        colored = apply_color(bases, grid) if grid is not None else bases
        return (colored + delta * PIXEL_SCALE).clamp(0, 1)

    def _unrolled_loss(self, model, poisoned, labels, clean_x, clean_y, targets, adv, gen) -> torch.Tensor:
        """CW margin of the targets after K functional SGD steps on poisons + a clean batch."""
        params = {k: v for k, v in model.named_parameters() if v.requires_grad}
        frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
        buffers = {k: v.clone() for k, v in model.named_buffers()}  # BN updates land on the copies
        x = torch.cat([poisoned, clean_x])
        y = torch.cat([labels, clean_y])
        was_training = model.training
        try:
            model.train()
            for _ in range(self.unroll):
                xb = differentiable_augment(x, self.shift, self.flip, gen) if self.augment else x
                logits = functional_call(model, ({**frozen, **params}, buffers), (xb,))
                grads = torch.autograd.grad(F.cross_entropy(logits, y), list(params.values()), create_graph=True)
                params = {k: p - self.inner_lr * g for (k, p), g in zip(params.items(), grads)}
            model.eval()
            logits = functional_call(model, ({**frozen, **params}, buffers), (targets,))
        finally:
            model.train(was_training)
        return cw_margin(logits, adv, self.kappa)


def _smoothness(grid: torch.Tensor) -> torch.Tensor:
    """Squared differences between neighbouring colour-grid entries (keeps the colour map smooth)."""
    return sum((grid.diff(dim=d) ** 2).mean() for d in (2, 3, 4))
