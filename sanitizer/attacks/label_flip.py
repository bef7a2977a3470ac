"""Label flipping: change the labels of a budget of training examples, at random or towards one class."""

from __future__ import annotations

import numpy as np

from sanitizer.attacks._util import check_class, class_or_draw, class_pool
from sanitizer.attacks.base import Attack, PoisonSet, ThreatModel, check_budget, register_attack, resolve_budget
from sanitizer.data.tensors import ImageTensorDataset

MODES = ("random", "towards")


@register_attack("label_flip")
class LabelFlip(Attack):
    """Flip ``budget`` labels (a count or a fraction of the training set); images are unchanged.

    ``mode="random"``: each flipped example gets a uniformly random wrong label.
    ``mode="towards"``: each gets ``adversarial_class``. ``source_class`` restricts which examples flip.

    Example:
        >>> poisons = LabelFlip(budget=0.1).craft(train_set, seed=0)  # doctest: +SKIP
    """

    needs_surrogate = False
    threat_model = ThreatModel("indiscriminate", clean_label=False, setting="both",
                               summary="flip a budget of labels, at random or towards a class")

    def __init__(self, budget: int | float = 0.1, mode: str = "random") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown label-flip mode {mode!r}; choose 'random' or 'towards'")
        self.budget, self.mode = budget, mode
        resolve_budget(budget, 1)  # validates the budget early

    def craft(self, train_set: ImageTensorDataset, *, surrogate=None, test_set=None, target_index=None,
              adversarial_class: int | None = None, source_class: int | None = None, seed: int = 0,
              **kw) -> PoisonSet:
        c = train_set.num_classes
        if c < 2:
            raise ValueError("label flipping needs at least two classes")
        target = None
        if self.mode == "towards":
            target = class_or_draw(adversarial_class, c, seed, "adversarial_class", exclude=source_class)
        if source_class is not None:
            check_class(source_class, c, "source_class")
        pool = class_pool(train_set, source_class, exclude=target)
        budget = check_budget(resolve_budget(self.budget, len(train_set)), len(pool),
                              "the examples that can be flipped")
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(pool, budget, replace=False))
        old = train_set.labels.numpy()[indices]
        if target is not None:
            new = np.full(budget, target)
        else:  # a uniformly random class other than the true one
            new = (old + rng.integers(1, c, size=budget)) % c
        return PoisonSet(self.name, indices, train_set.images[indices].numpy(), new,
                         adversarial_class=-1 if target is None else target,
                         source_class=-1 if source_class is None else int(source_class),
                         params={**self.params(), "budget": budget, "seed": seed})
