"""BadNets (Gu et al., 2017): a patch trigger stamped on training images that are relabelled (dirty label)
to the attacker's target class; at test time the patch flips any input to that class."""

from __future__ import annotations

import numpy as np
import torch

from sanitizer.attacks._util import check_class, class_or_draw, class_pool
from sanitizer.attacks.base import Attack, PoisonSet, ThreatModel, check_budget, register_attack, resolve_budget
from sanitizer.attacks.triggers import check_trigger, make_trigger, set_patch_options, stamp_trigger
from sanitizer.data.tensors import ImageTensorDataset


@register_attack("badnets")
class BadNets(Attack):
    """Dirty-label patch backdoor.

    Poisons are drawn from ``source_class`` (any class but the target when None), get the trigger
    and the label ``adversarial_class`` (the backdoor's target class; drawn with the seed when None).
    ``budget`` is a count or a fraction of the training set.

    Example:
        >>> attack = BadNets(budget=50, patch_size=3)
        >>> poisons = attack.craft(train_set, adversarial_class=0, seed=1)  # doctest: +SKIP
        >>> result = evaluate_backdoor(poisons, victim, test_set)  # doctest: +SKIP
    """

    needs_surrogate = False
    threat_model = ThreatModel("backdoor", clean_label=False, setting="from-scratch",
                               summary="patch trigger on relabelled images (Gu et al. 2017)")

    def __init__(self, budget: int | float = 0.01, patch_size: int = 3,
                 trigger_kind: str = "checkerboard", location: str = "bottom_right", margin: int = 1,
                 opacity: float = 1.0) -> None:
        set_patch_options(self, budget, patch_size, trigger_kind, location, margin, opacity)

    def craft(self, train_set: ImageTensorDataset, *, surrogate=None, test_set=None, target_index=None,
              adversarial_class: int | None = None, source_class: int | None = None, seed: int = 0,
              trigger: torch.Tensor | None = None, **kw) -> PoisonSet:
        c = train_set.num_classes
        if source_class is not None:
            check_class(source_class, c, "source_class")
        target = class_or_draw(adversarial_class, c, seed, "adversarial_class", exclude=source_class)
        if source_class is not None and source_class == target:
                raise ValueError("source_class equals the target class; poisons must come from another class")
        if trigger is None:
            trigger = make_trigger(self.patch_size, train_set.images.shape[1], self.trigger_kind, seed)
        trigger = check_trigger(trigger, tuple(train_set.images.shape[1:]), self.margin)
        pool = class_pool(train_set, source_class, exclude=target)
        budget = check_budget(resolve_budget(self.budget, len(train_set)), len(pool),
                              "the source class" if source_class is not None else "the non-target classes")
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(pool, budget, replace=False))
        gen = torch.Generator().manual_seed(seed)
        images = stamp_trigger(train_set.images[torch.from_numpy(indices)], trigger, self.location, self.margin,
                               gen, self.opacity)
        return PoisonSet(self.name, indices, images.numpy(), np.full(budget, target),
                         adversarial_class=target, source_class=-1 if source_class is None else int(source_class),
                         trigger=trigger.numpy(), params={**self.params(), "budget": budget, "seed": seed})
