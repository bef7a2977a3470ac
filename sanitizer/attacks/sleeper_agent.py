"""Sleeper agent (Souri et al., NeurIPS 2022): a hidden-trigger backdoor crafted by gradient matching.

The poisons are clean-label images of the target class, perturbed within ε = 16/255 and carrying
no trigger. Their training gradient is matched to the gradient of *patched* source-class images
towards the target class, so a victim trained on them learns "patch → target class"; at test
time any source-class image with the patch is misclassified. Poisons are the target-class images
with the largest gradient norm; the surrogate can be retrained from scratch on the current
poisoned set a few times while crafting (``retrain_rounds``), refreshing the target gradient.
"""

from __future__ import annotations

import copy
import time

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
from sanitizer.attacks.gradient_matching import (
    GradientMatcher,
    _positive,
    craft_perturbations,
)
from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.embeddings import model_device
from sanitizer.train import TrainConfig, predict_proba, train_classifier


def random_trigger(channels: int, size: int, seed: int) -> torch.Tensor:
    """A random binary patch ``[channels, size, size]`` drawn from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed) + 7)
    return (torch.rand(channels, size, size, generator=gen) < 0.5).float()


def apply_trigger(images: torch.Tensor, trigger: torch.Tensor, generator: torch.Generator | None = None,
                  location: str = "random") -> torch.Tensor:
    """Paste ``trigger`` on every image, at a random place per image or in the bottom-right corner."""
    out = images.clone()
    _, _, h, w = images.shape
    ph, pw = trigger.shape[-2:]
    if ph > h or pw > w:
        raise ValueError(f"a {ph}x{pw} trigger does not fit {h}x{w} images")
    trigger = trigger.to(images.device, images.dtype)
    if location == "corner":
        out[:, :, h - ph:, w - pw:] = trigger
        return out
    if location != "random":
        raise ValueError(f"location must be 'random' or 'corner', got {location!r}")
    rows = torch.randint(0, h - ph + 1, (len(images),), generator=generator)
    cols = torch.randint(0, w - pw + 1, (len(images),), generator=generator)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        out[i, :, r:r + ph, c:c + pw] = trigger
    return out


def gradient_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-example norm of ∇θ L(x, y) over the trainable parameters (eval mode), via ``torch.func``."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = dict(model.named_buffers())
    device = model_device(model)

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, ({**frozen, **p}, buffers), (x[None],)), y[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    norms = []
    with eval_mode([model]):
        for i in range(0, len(images), batch_size):
            g = per_example(params, images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device))
            norms.append(torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values())).cpu())
    return torch.cat(norms)


def reinitialise(model: nn.Module) -> None:
    """Reset the parameters of every submodule whose parameters are all trainable (frozen parts are kept)."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if hasattr(module, "reset_parameters") and own and all(p.requires_grad for p in own):
            module.reset_parameters()
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and (not own or all(p.requires_grad for p in own)):
            module.reset_running_stats()


@register_attack("sleeper_agent")
class SleeperAgent(Attack):
    """Hidden-trigger backdoor through gradient matching, clean label, from scratch.

    Args:
        eps: L∞ bound (16/255). budget: poison count or fraction of the training set (1%).
        steps, lr, restarts, augment, shift, flip: as in gradient matching (250, 0.1, 1, on, 4, on).
        patch_size: side of the square random binary trigger (default: a quarter of the image side).
        source_images: at most this many patched source-class training images form the target gradient.
        retrain_rounds: retrain the surrogate from scratch on the current poisoned set this many times
            while crafting (the paper uses 4), for ``retrain_epochs`` each.

    Example:
        >>> attack = make_attack("sleeper_agent", budget=0.01, retrain_rounds=4, retrain_epochs=20)  # doctest: +SKIP
        >>> poisons = attack.craft(train_set, surrogate=model, source_class=3, adversarial_class=5)  # doctest: +SKIP
        >>> backdoor_success(victim, test_set, poisons)  # doctest: +SKIP
    """

    threat_model = ThreatModel("backdoor", clean_label=True, setting="from-scratch",
                               summary="hidden-trigger patch backdoor crafted by gradient matching (Souri et al. 2022)")

    def __init__(self, eps: float = 16 / 255, budget: int | float = 0.01, steps: int = 250, lr: float = 0.1,
                 restarts: int = 1, augment: bool = True, shift: int = 4, flip: bool = True,
                 patch_size: int | None = None, source_images: int = 1000, retrain_rounds: int = 0,
                 retrain_epochs: int = 20, retrain_lr: float = 0.1, batch_size: int = 512) -> None:
        self.eps = check_eps(eps)
        self.budget = budget
        self.steps = _positive(steps, "steps")
        self.lr = float(lr)
        self.restarts = _positive(restarts, "restarts")
        self.augment, self.shift, self.flip = bool(augment), int(shift), bool(flip)
        self.patch_size = None if patch_size is None else _positive(patch_size, "patch_size")
        self.source_images = _positive(source_images, "source_images")
        if int(retrain_rounds) != retrain_rounds or retrain_rounds < 0:
            raise ValueError(f"retrain_rounds must be an integer ≥ 0, got {retrain_rounds}")
        self.retrain_rounds = int(retrain_rounds)
        self.retrain_epochs = _positive(retrain_epochs, "retrain_epochs")
        self.retrain_lr = float(retrain_lr)
        self.batch_size = _positive(batch_size, "batch_size")

    def craft(self, train_set: ImageTensorDataset, *, surrogate=None, source_class: int | None = None,
              adversarial_class: int | None = None, seed: int = 0, trigger: torch.Tensor | None = None,
              **kw) -> PoisonSet:
        """Poison ``train_set`` so that patched ``source_class`` images go to ``adversarial_class``.

        Missing classes are drawn from ``seed``; ``trigger`` (``[C, p, p]`` in [0, 1]) defaults to a
        random binary patch. With ``retrain_rounds`` > 0 the surrogates are copied and retrained.
        """
        t0 = time.perf_counter()
        models = as_models(surrogate, self.name)
        source, target_class = self._classes(train_set, source_class, adversarial_class, seed)
        c, h, _ = train_set.images.shape[1:]
        if trigger is None:
            trigger = random_trigger(c, self.patch_size or max(1, h // 4), seed)
        trigger = torch.as_tensor(trigger, dtype=torch.float32)
        if trigger.ndim != 3 or trigger.shape[0] != c:
            raise ValueError(f"trigger must have shape [{c}, p, p], got {tuple(trigger.shape)}")
        if self.retrain_rounds:
            models = [copy.deepcopy(m) for m in models]  # the caller's surrogates stay untouched
        device = model_device(models[0])

        rng = np.random.default_rng([seed, 31])
        labels_np = train_set.labels.numpy()
        source_pool = np.flatnonzero(labels_np == source)
        source_idx = np.sort(rng.choice(source_pool, min(self.source_images, len(source_pool)), replace=False))
        patched = apply_trigger(train_set.images[torch.from_numpy(source_idx)], trigger,
                                torch.Generator().manual_seed(int(seed) + 11))
        patched_labels = torch.full((len(patched),), target_class)

        pool = np.flatnonzero(labels_np == target_class)
        count = check_budget(resolve_budget(self.budget, len(train_set)), len(pool), f"class {target_class}")
        norms = gradient_norms(models[0], train_set.images[torch.from_numpy(pool)],
                               train_set.labels[torch.from_numpy(pool)])
        indices = np.sort(pool[torch.argsort(norms, descending=True)[:count].numpy()])
        bases = train_set.images[torch.from_numpy(indices)].to(device)
        labels = train_set.labels[torch.from_numpy(indices)].to(device)

        matcher = GradientMatcher(models, patched, patched_labels)
        on_step = self._retrainer(models, matcher, train_set, indices, bases, patched, patched_labels, seed)
        delta, finals, histories = craft_perturbations(
            bases, labels, lambda x, _plain, y, _sl: matcher.loss(x, y), eps=self.eps, steps=self.steps,
            lr=self.lr, restarts=self.restarts, augment=self.augment, shift=self.shift, flip=self.flip,
            batch_size=self.batch_size, seed=seed, desc=self.name, on_step=on_step)
        poisoned = project_linf(bases + delta, bases, self.eps)
        best = int(np.argmin(finals))
        return PoisonSet(
            attack=self.name, indices=indices, images=poisoned.cpu().numpy(), labels=labels.cpu().numpy(),
            adversarial_class=target_class, source_class=source, trigger=trigger.numpy(),
            params={**self.params(), "seed": seed, "budget_count": len(indices), "ensemble": len(models),
                    "trigger_location": "random", "restart_losses": finals, "best_restart": best,
                    "loss_history": histories[best], "craft_seconds": time.perf_counter() - t0})

    def _classes(self, train_set, source_class, adversarial_class, seed) -> tuple[int, int]:
        n = train_set.num_classes
        rng = np.random.default_rng([seed, 29])
        source = int(rng.integers(n)) if source_class is None else int(source_class)
        if adversarial_class is None:
            adversarial_class = int(rng.choice([k for k in range(n) if k != source]))
        for name, value in (("source_class", source), ("adversarial_class", adversarial_class)):
            if not 0 <= int(value) < n:
                raise ValueError(f"{name}={value} is not a class; choose one in [0, {n})")
        if source == int(adversarial_class):
            raise ValueError("source_class and adversarial_class (the backdoor's target class) must differ")
        return source, int(adversarial_class)

    def _retrainer(self, models, matcher, train_set, indices, bases, patched, patched_labels, seed):
        """``on_step`` hook retraining the surrogates ``retrain_rounds`` times, evenly spaced over the steps."""
        if not self.retrain_rounds:
            return None
        every = max(1, self.steps // (self.retrain_rounds + 1))
        due = {every * (r + 1) - 1 for r in range(self.retrain_rounds)} - {self.steps - 1}
        idx = torch.from_numpy(indices)

        def on_step(step: int, delta: torch.Tensor) -> None:
            if step not in due:
                return
            current = project_linf(bases + delta, bases, self.eps).cpu()
            images = train_set.images.clone()
            images[idx] = current
            poisoned = ImageTensorDataset(images, train_set.labels, None, train_set.num_classes)
            for m, model in enumerate(models):
                reinitialise(model)
                config = TrainConfig(epochs=self.retrain_epochs, lr=self.retrain_lr, seed=int(seed) * 31 + step + m)
                train_classifier(model, poisoned, config, desc=f"retrain {m + 1}/{len(models)}")
                model.eval()
            matcher.set_target(patched, patched_labels)

        return on_step


def backdoor_success(model: nn.Module, test_set: ImageTensorDataset, poisons: PoisonSet, seed: int = 0,
                     location: str = "random") -> float:
    """Fraction of source-class test images that ``model`` puts in the target class once patched.

    Example:
        >>> rate = backdoor_success(victim, test_set, poisons)  # doctest: +SKIP
    """
    if poisons.trigger is None or poisons.source_class < 0:
        raise ValueError("this poison set has no trigger and source class (is it a targeted attack?)")
    source = test_set.images[test_set.labels == poisons.source_class]
    if len(source) == 0:
        raise ValueError(f"test_set has no image of source class {poisons.source_class}")
    patched = apply_trigger(source, torch.from_numpy(poisons.trigger), torch.Generator().manual_seed(seed), location)
    return float((predict_proba(model, patched).argmax(1) == poisons.adversarial_class).float().mean())


__all__ = ["SleeperAgent", "apply_trigger", "backdoor_success", "gradient_norms", "random_trigger"]
