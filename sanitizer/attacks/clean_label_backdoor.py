"""Clean-label patch backdoor (Turner, Tsipras and Madry, 2019): the trigger is stamped on images *of the
target class*, labels unchanged. Plain patched images are easy to classify from their content, so the
network has little reason to learn the patch; an adversarial perturbation (untargeted PGD within
``eps`` against a surrogate) first makes them hard, so the patch becomes the easiest feature to use.
"""

from __future__ import annotations

import numpy as np
import torch

from sanitizer.attacks._util import as_models, check_positive_int, class_or_draw, class_pool
from sanitizer.attacks.adversarial_poisons import pgd_linf
from sanitizer.attacks.base import (
    Attack,
    PoisonSet,
    ThreatModel,
    check_budget,
    check_eps,
    register_attack,
    resolve_budget,
)
from sanitizer.attacks.triggers import check_trigger, make_trigger, set_patch_options, stamp_trigger
from sanitizer.data.tensors import ImageTensorDataset


@register_attack("clean_label_backdoor")
class CleanLabelBackdoor(Attack):
    """Patch on target-class images, optionally after a PGD perturbation that makes them hard.

    With ``perturb=True`` (default) craft needs a ``surrogate``; outside the patch every pixel stays
    within ``eps`` of the original image.

    Example:
        >>> attack = CleanLabelBackdoor(budget=50, eps=8/255, patch_size=3)
        >>> poisons = attack.craft(train_set, surrogate=model, adversarial_class=0)  # doctest: +SKIP
    """

    threat_model = ThreatModel("backdoor", clean_label=True, setting="from-scratch",
                               summary="patch on adversarially perturbed target-class images (Turner et al.)")
    loss_description = ("Minus the surrogate's cross-entropy on the poisons at every PGD step "
                        "(falls as they get harder).")

    def __init__(self, budget: int | float = 0.01, patch_size: int = 3,
                 trigger_kind: str = "checkerboard", location: str = "bottom_right", margin: int = 1,
                 opacity: float = 1.0, perturb: bool = True, eps: float = 8 / 255, steps: int = 20,
                 step_size: float | None = None) -> None:
        set_patch_options(self, budget, patch_size, trigger_kind, location, margin, opacity)
        self.perturb = bool(perturb)
        self.eps = check_eps(eps)
        self.steps = check_positive_int(steps, "steps")
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps

    def craft(self, train_set: ImageTensorDataset, *, surrogate=None, test_set=None, target_index=None,
              adversarial_class: int | None = None, source_class: int | None = None, seed: int = 0,
              trigger: torch.Tensor | None = None, **kw) -> PoisonSet:
        target = class_or_draw(adversarial_class, train_set.num_classes, seed, "adversarial_class",
                               exclude=source_class)
        if trigger is None:
            trigger = make_trigger(self.patch_size, train_set.images.shape[1], self.trigger_kind, seed)
        trigger = check_trigger(trigger, tuple(train_set.images.shape[1:]), self.margin)
        pool = class_pool(train_set, target)
        budget = check_budget(resolve_budget(self.budget, len(train_set)), len(pool),
                              f"target class {target}")
        indices = np.sort(np.random.default_rng(seed).choice(pool, budget, replace=False))
        idx = torch.from_numpy(indices)
        images, labels = train_set.images[idx], train_set.labels[idx]
        self._history = []
        if self.perturb:
            nets = as_models(surrogate, self.name + " (perturb=True)")
            images, self._history = pgd_linf(nets, images, labels, self.eps, self.steps, self.step_size,
                                             targeted=False, batch_size=256, desc=self.name)
        images = stamp_trigger(images, trigger, self.location, self.margin,
                               torch.Generator().manual_seed(seed), self.opacity)
        return PoisonSet(self.name, indices, images.numpy(), labels.numpy(), adversarial_class=target,
                         source_class=-1 if source_class is None else int(source_class),
                         trigger=trigger.numpy(), params={**self.params(), "budget": budget, "seed": seed})
