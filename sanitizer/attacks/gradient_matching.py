"""Gradient matching ("Witches' Brew", Geiping et al., ICLR 2021): clean-label targeted poisoning.

The attacker perturbs a few training images of the adversarial class, within an L∞ ball, so that
the gradient of the training loss on those poisons points where the gradient of the target
image's loss towards the adversarial class points. A victim that trains on the poisons then
descends the target's adversarial loss without ever seeing the target.

Objective (per poison batch, summed over surrogates):

    1 − cos( ∇θ L(f(target), adversarial class),  ∇θ Σ_i L(f(aug(x_i + δ_i)), y_i) )

over every parameter that requires grad, minimised with signed Adam (the gradient's sign goes to
Adam), lr drops ×0.1 at 3/8, 5/8 and 7/8 of the steps, R random restarts keeping the lowest loss,
and a differentiable flip + shift augmentation of the poisons at every step.

The engine (:class:`GradientMatcher`, :func:`craft_perturbations`) is shared with the adaptive
and sleeper-agent attacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sanitizer.attacks._util import as_models, eval_mode
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
from sanitizer.embeddings import model_device
from sanitizer.models import CompactCNN, make_model
from sanitizer.progress import progress
from sanitizer.train import TrainConfig, predict_proba, train_classifier

# δ is optimised in units of a quarter of the pixel range (about the per-channel std of natural
# images), the normalised space the paper works in, so lr=0.1 moves pixels by ~0.025 per step.
PIXEL_SCALE = 0.25
MILESTONES = (3 / 8, 5 / 8, 7 / 8)


# --------------------------------------------------------------------------------------------
# Target choice and poison selection
# --------------------------------------------------------------------------------------------

def resolve_target(
    test_set: ImageTensorDataset | None,
    target_index: int | Sequence[int] | None,
    adversarial_class: int | None,
    seed: int,
    attack: str,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
    """``(target_images [T,C,H,W], true labels [T], target indices, adversarial class)``.

    A missing ``target_index`` is drawn from ``test_set`` with ``seed``; a missing
    ``adversarial_class`` is drawn among the classes other than the target's.
    """
    if test_set is None:
        raise ValueError(f"{attack} needs test_set=... (the dataset the target image comes from) "
                         "and optionally target_index=...")
    rng = np.random.default_rng([seed, 17])
    if target_index is None:
        indices = np.array([int(rng.integers(len(test_set)))])
    else:
        indices = np.atleast_1d(np.asarray(target_index, dtype=np.int64))
    bad = indices[(indices < 0) | (indices >= len(test_set))]
    if len(bad):
        raise IndexError(f"target_index={int(bad[0])} is outside test_set (it has {len(test_set)} images; "
                         f"use an index in [0, {len(test_set)}))")
    labels = test_set.labels[torch.from_numpy(indices)]
    num_classes = test_set.num_classes
    if adversarial_class is None:
        true = int(labels[0])
        adversarial_class = int(rng.choice([c for c in range(num_classes) if c != true]))
    if not 0 <= int(adversarial_class) < num_classes:
        raise ValueError(f"adversarial_class={adversarial_class} is not a class; choose one in [0, {num_classes})")
    if (labels == int(adversarial_class)).any():
        raise ValueError(f"the target already belongs to adversarial_class={adversarial_class}; "
                         "choose another class or another target")
    return test_set.images[torch.from_numpy(indices)].clone(), labels.clone(), indices, int(adversarial_class)


def random_poisons(train_set: ImageTensorDataset, cls: int, budget: int | float, seed: int) -> np.ndarray:
    """``budget`` random training indices of class ``cls`` (sorted), drawn with ``seed``."""
    pool = np.flatnonzero(train_set.labels.numpy() == cls)
    count = check_budget(resolve_budget(budget, len(train_set)), len(pool), f"class {cls}")
    return np.sort(np.random.default_rng([seed, 23]).choice(pool, count, replace=False))


# --------------------------------------------------------------------------------------------
# The matching objective
# --------------------------------------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters gradients are matched over: those with ``requires_grad=True``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"the surrogate {type(model).__name__} has no parameter with requires_grad=True; "
                         "gradient matching needs the parameters the victim trains")
    return params


def parameter_gradient(model: nn.Module, params: list[torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                       create_graph: bool = False) -> list[torch.Tensor]:
    """∇θ of the mean cross-entropy of ``(images, labels)`` over ``params``."""
    loss = F.cross_entropy(model(images), labels)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def cosine_distance(grads: list[torch.Tensor], target: list[torch.Tensor], target_norm: torch.Tensor) -> torch.Tensor:
    """1 − cos between two gradients given as lists of tensors (one per parameter)."""
    dot = sum((g * t).sum() for g, t in zip(grads, target))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads) + 1e-20)
    return 1 - dot / (norm * target_norm + 1e-20)


class GradientMatcher:
    """The target gradient(s) of a surrogate ensemble and the matching loss of a poison batch.

    Models run in eval mode (BatchNorm uses running statistics) while crafting.

    Example:
        >>> matcher = GradientMatcher([model], target_images, torch.tensor([adv]))  # doctest: +SKIP
        >>> loss = matcher.loss(poisoned_batch, poison_labels)  # doctest: +SKIP
    """

    def __init__(self, models: Sequence[nn.Module], target_images: torch.Tensor, target_labels: torch.Tensor,
                 batch_size: int = 256) -> None:
        self.models = list(models)
        self.params = [trainable_parameters(m) for m in self.models]
        self.set_target(target_images, target_labels, batch_size)

    def set_target(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> None:
        """Compute (or recompute, after retraining) the target gradient of every model."""
        self.target, self.target_norm = [], []
        for model, params in zip(self.models, self.params):
            device = model_device(model)
            total = [torch.zeros_like(p) for p in params]
            with eval_mode([model]):
                for start in range(0, len(images), batch_size):
                    x = images[start:start + batch_size].to(device)
                    y = labels[start:start + batch_size].to(device)
                    grads = parameter_gradient(model, params, x, y)
                    for acc, g in zip(total, grads):
                        acc += g.detach() * (len(x) / len(images))
            self.target.append(total)
            self.target_norm.append(torch.sqrt(sum(g.pow(2).sum() for g in total)))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Matching loss of a poison batch, averaged over the ensemble (differentiable in ``images``)."""
        total = 0.0
        with eval_mode(self.models):
            for model, params, target, norm in zip(self.models, self.params, self.target, self.target_norm):
                device = model_device(model)
                grads = parameter_gradient(model, params, images.to(device), labels.to(device), create_graph=True)
                total = total + cosine_distance(grads, target, norm).to(images.device)
        return total / len(self.models)


# --------------------------------------------------------------------------------------------
# Differentiable augmentation and the crafting loop
# --------------------------------------------------------------------------------------------

def differentiable_augment(images: torch.Tensor, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and ±``shift`` px translation (zero fill), differentiable in ``images``."""
    b, _, h, w = images.shape
    out = images
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(images.device)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    if shift > 0:
        padded = F.pad(out, (shift,) * 4)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator).to(images.device)
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator).to(images.device)
        rows = dy[:, None] + torch.arange(h, device=images.device)[None]
        cols = dx[:, None] + torch.arange(w, device=images.device)[None]
        idx = torch.arange(b, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return out


# objective(augmented batch, un-augmented batch, labels, slice of the poisons) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, slice], torch.Tensor]


def craft_perturbations(
    bases: torch.Tensor,
    labels: torch.Tensor,
    objective: LossFn,
    *,
    eps: float,
    steps: int,
    lr: float,
    restarts: int,
    augment: bool,
    shift: int,
    flip: bool,
    batch_size: int,
    seed: int,
    desc: str = "craft",
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, list[float], list[list[float]]]:
    """Minimise ``objective(augmented, poisoned, labels, batch_slice)`` over L∞-bounded perturbations.

    Signed Adam, lr ×0.1 at 3/8, 5/8, 7/8 of ``steps``, ``restarts`` random starts; poisons are
    processed in batches of ``batch_size`` (each batch is matched on its own, as in the paper).
    ``on_step(step, delta)`` runs after every step (the sleeper agent retrains there).
    Returns the best ``delta`` (not yet quantised), the final loss of every restart and the loss
    history of every restart.
    """
    device = bases.device
    n = len(bases)
    best_delta, best_loss = None, float("inf")
    finals, histories = [], []
    milestones = sorted({max(1, int(round(m * steps))) for m in MILESTONES})
    for restart in range(restarts):
        gen = torch.Generator().manual_seed(int(seed) * 1000 + restart)
        init = (torch.rand(bases.shape, generator=gen) * 2 - 1).to(device) * eps
        delta = ((bases + init).clamp(0, 1) - bases).div(PIXEL_SCALE).requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)
        history = []
        bar = progress(range(steps), desc=f"{desc} restart {restart + 1}/{restarts}")
        for step in bar:
            grad = torch.zeros_like(delta)
            total = 0.0
            for start in range(0, n, batch_size):
                sl = slice(start, min(n, start + batch_size))
                x = bases[sl] + delta[sl] * PIXEL_SCALE
                x_aug = differentiable_augment(x, shift, flip, gen) if augment else x
                loss = objective(x_aug, x, labels[sl], sl)
                grad += torch.autograd.grad(loss, delta)[0]
                total += float(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            delta.grad = grad.sign()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                d = delta.mul(PIXEL_SCALE).clamp_(-eps, eps)
                d = (bases + d).clamp_(0, 1) - bases
                delta.copy_(d / PIXEL_SCALE)
            history.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
            if on_step is not None:
                on_step(step, delta.detach() * PIXEL_SCALE)
        final = evaluate_objective(bases, labels, delta.detach() * PIXEL_SCALE, objective, batch_size)
        finals.append(final)
        histories.append(history)
        if final < best_loss:
            best_loss, best_delta = final, delta.detach() * PIXEL_SCALE
    return best_delta, finals, histories


def evaluate_objective(bases: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, objective: LossFn,
                       batch_size: int) -> float:
    """The objective of perturbations ``delta`` without augmentation, summed over poison batches."""
    total = 0.0
    for start in range(0, len(bases), batch_size):
        sl = slice(start, min(len(bases), start + batch_size))
        x = (bases[sl] + delta[sl]).detach().requires_grad_(True)  # the objective differentiates params
        total += float(objective(x, x, labels[sl], sl).detach())
    return total


# --------------------------------------------------------------------------------------------
# The attack
# --------------------------------------------------------------------------------------------

@register_attack("gradient_matching")
class GradientMatching(Attack):
    """Witches' Brew gradient matching, clean label, targeted, from scratch (also works for transfer).

    Args:
        eps: L∞ bound in [0, 1] pixel units (16/255 by default).
        budget: number of poisons, or a fraction of the training set (0.01 = 1%).
        steps, lr, restarts: signed-Adam schedule (250, 0.1 in units of 1/4 pixel range, 8).
        augment, shift, flip: differentiable augmentation of the poisons while crafting.
        batch_size: poisons per matching batch (vectorised; lower it if memory is short).

    Example:
        >>> surrogate = train_surrogate(train_set, epochs=20)  # doctest: +SKIP
        >>> attack = make_attack("gradient_matching", eps=16/255, budget=0.01)  # doctest: +SKIP
        >>> poisons = attack.craft(train_set, surrogate=surrogate, test_set=test_set, target_index=7,
        ...                        adversarial_class=3, seed=0)  # doctest: +SKIP
        >>> poisoned_train = poisons.apply(train_set)  # doctest: +SKIP
    """

    threat_model = ThreatModel("targeted", clean_label=True, setting="both",
                               summary="Witches' Brew: poisons whose gradient matches the target's adversarial "
                                       "gradient (Geiping et al. 2021)")

    def __init__(self, eps: float = 16 / 255, budget: int | float = 0.01, steps: int = 250, lr: float = 0.1,
                 restarts: int = 8, augment: bool = True, shift: int = 4, flip: bool = True,
                 batch_size: int = 512) -> None:
        self.eps = check_eps(eps)
        self.budget = budget
        self.steps = _positive(steps, "steps")
        self.lr = float(lr)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.restarts = _positive(restarts, "restarts")
        self.augment = bool(augment)
        self.shift = int(shift)
        if self.shift < 0:
            raise ValueError(f"shift must be ≥ 0 pixels, got {shift}")
        self.flip = bool(flip)
        self.batch_size = _positive(batch_size, "batch_size")

    def craft(self, train_set: ImageTensorDataset, *, surrogate=None, test_set: ImageTensorDataset | None = None,
              target_index: int | Sequence[int] | None = None, adversarial_class: int | None = None,
              seed: int = 0, poison_indices: Sequence[int] | None = None, **kw) -> PoisonSet:
        """Craft poisons so that ``test_set[target_index]`` is classified as ``adversarial_class``.

        ``surrogate`` is a trained model or a list of models (an ensemble). ``poison_indices``
        overrides the random choice of poisons (they must belong to the adversarial class).
        """
        t0 = time.perf_counter()
        models = as_models(surrogate, self.name)
        target_images, target_labels, target_indices, adv = resolve_target(
            test_set, target_index, adversarial_class, seed, self.name)
        indices = self._poison_indices(train_set, adv, seed, poison_indices)
        device = model_device(models[0])
        bases = train_set.images[torch.from_numpy(indices)].to(device)
        labels = train_set.labels[torch.from_numpy(indices)].to(device)
        matcher = GradientMatcher(models, target_images, torch.full((len(target_images),), adv))
        objective = self._objective(matcher, train_set, indices, adv)
        delta, finals, histories = craft_perturbations(
            bases, labels, objective, eps=self.eps, steps=self.steps, lr=self.lr,
            restarts=self.restarts, augment=self.augment, shift=self.shift, flip=self.flip,
            batch_size=self.batch_size, seed=seed, desc=self.name)
        poisoned = project_linf(bases + delta, bases, self.eps)
        return PoisonSet(
            attack=self.name, indices=indices, images=poisoned.cpu().numpy(), labels=labels.cpu().numpy(),
            target_images=target_images.numpy(), target_labels=target_labels.numpy(),
            target_indices=target_indices, adversarial_class=adv,
            params={**self.params(), "seed": seed, "budget_count": len(indices), "ensemble": len(models),
                    "restart_losses": finals, "best_restart": int(np.argmin(finals)),
                    "loss_history": histories[int(np.argmin(finals))],
                    "craft_seconds": time.perf_counter() - t0})

    def _objective(self, matcher: GradientMatcher, train_set: ImageTensorDataset, indices: np.ndarray,
                   adv: int) -> LossFn:
        """The crafting objective (subclasses add terms): here the matching loss of the augmented batch."""
        return lambda x_aug, _plain, y, _sl: matcher.loss(x_aug, y)

    def _poison_indices(self, train_set, adv, seed, poison_indices) -> np.ndarray:
        if poison_indices is None:
            return random_poisons(train_set, adv, self.budget, seed)
        indices = np.sort(np.asarray(poison_indices, dtype=np.int64))
        if len(indices) == 0 or (train_set.labels[torch.from_numpy(indices)] != adv).any():
            raise ValueError(f"poison_indices must be non-empty and all of adversarial_class={adv}")
        return indices


def _positive(value, name: str) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Helpers for callers: surrogates, evaluation, and the digits demo regime
# --------------------------------------------------------------------------------------------

def train_surrogate(train_set: ImageTensorDataset, model: nn.Module | None = None, *, arch: str = "cnn",
                    width: int | None = None, epochs: int = 20, lr: float = 0.1, batch_size: int = 128,
                    seed: int = 0, device: str | torch.device | None = None,
                    config: TrainConfig | None = None) -> nn.Module:
    """Train a surrogate with :func:`sanitizer.train.train_classifier` and return it in eval mode.

    Example:
        >>> surrogate = train_surrogate(train_set, arch="cnn", width=16, epochs=10)  # doctest: +SKIP
    """
    if model is None:
        torch.manual_seed(seed)
        model = make_model(arch, train_set.num_classes, train_set.images.shape[1], width)
    if device is not None:
        model = model.to(device)
    config = config or TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    train_classifier(model, train_set, config, desc="surrogate")
    return model.eval()


def choose_target(surrogate: nn.Module, test_set: ImageTensorDataset, rule: str = "random",
                  seed: int = 0) -> tuple[int, int | None]:
    """A test image the surrogate classifies correctly (flipping a mistake is no attack).

    ``random``: any such image; the adversarial class is left to the attack (``None``).
    ``uncertain``: one whose top surrogate probability is below 0.9, adversarial class = the
    surrogate's runner-up (an attacker picking a target that is already near a boundary).

    Example:
        >>> target, adv = choose_target(surrogate, test_set, "uncertain", seed=3)  # doctest: +SKIP
    """
    if rule not in ("random", "uncertain"):
        raise ValueError(f"unknown target rule {rule!r}: use 'random' or 'uncertain'")
    g = torch.Generator().manual_seed(seed)
    probs = predict_proba(surrogate, test_set.images)
    ok = probs.argmax(1) == test_set.labels
    if rule == "uncertain":
        ok &= probs.max(1).values < 0.9
    candidates = torch.nonzero(ok).flatten()
    if len(candidates) == 0:
        raise ValueError(f"no test image qualifies as a target under rule {rule!r}; train the surrogate longer "
                         "or use rule='random'")
    target = int(candidates[torch.randint(len(candidates), (1,), generator=g)])
    adv = int(probs[target].topk(2).indices[1]) if rule == "uncertain" else None
    return target, adv


def target_outcome(model: nn.Module, poisons: PoisonSet) -> dict:
    """How a (victim) model treats the targets of a poison set: adversarial-class probability and success."""
    if poisons.target_images is None:
        raise ValueError("this poison set has no target images (is it a backdoor?)")
    probs = predict_proba(model, torch.from_numpy(poisons.target_images))
    adv = poisons.adversarial_class
    return {"adv_prob": probs[:, adv].tolist(), "predicted": probs.argmax(1).tolist(),
            "success": bool((probs.argmax(1) == adv).all())}


def digits_demo_settings() -> dict:
    """The best settings found for gradient matching on digits (the ``sanitizer demo`` regime); not reliable.

    Measured with ``benchmarks/calibrate_gradient_matching.py --regime digits`` (see
    ``benchmarks/RESULTS.md``, "Gradient matching calibration"): with one surrogate 1 of 10 fresh
    trials succeeded (Wilson 95% [0.02, 0.40]; the victim's P(adversarial class) rose from 0.12 to
    0.23 on average); with an ensemble of 2 surrogates 2 of 10 (Wilson 95% [0.06, 0.51]).
    Gradient matching is weak on this tiny from-scratch regime; a clear majority was not reached.
    Keys: ``width`` of :class:`~sanitizer.models.CompactCNN`, ``ensemble`` (surrogates to
    train, seeds ``seed + m``, passed to ``craft`` as a list), ``target_choice`` (``"uncertain"``: a
    correctly classified test image with top surrogate probability < 0.9, adversarial class = the
    runner-up), ``surrogate`` and ``victim`` :class:`TrainConfig` arguments, and ``attack``
    arguments for :class:`GradientMatching`.
    """
    return {
        "width": 32,
        "ensemble": 2,
        "target_choice": "uncertain",
        "surrogate": {"epochs": 20, "lr": 0.05, "batch_size": 64, "crop_padding": 2},
        "victim": {"epochs": 20, "lr": 0.05, "batch_size": 64, "crop_padding": 2},
        # 14 poisons: about 10 % of the adversarial class (1 % of the training set), as in the CIFAR-10
        # benchmarks; 80 (a third of the class, dense enough to vouch for each other) was not representative
        "attack": {"eps": 32 / 255, "budget": 14, "steps": 100, "restarts": 1, "shift": 2, "flip": False},
    }


def digits_demo_model(seed: int = 0, width: int | None = None) -> CompactCNN:
    """A fresh CompactCNN for the digits demo regime."""
    torch.manual_seed(seed)
    return CompactCNN(1, 10, width or digits_demo_settings()["width"])
