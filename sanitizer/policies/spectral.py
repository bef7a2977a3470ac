"""Spectral signatures (Tran, Li, Madry, 2018): per class, drop the largest projections on the
top singular vector of the centred features."""

from __future__ import annotations

import math

import numpy as np

from sanitizer.errors import SanitizerError, check_fraction, check_positive_int, check_threshold
from sanitizer.policies.base import Policy, register_policy


@register_policy("spectral")
class SpectralPolicy(Policy):
    """Score ``((h − mean) · v)²`` with ``v`` the top right singular vector of the centred class features;
    drop the ``multiplier × budget`` highest-scoring examples of every class.

    ``budget`` is the expected number of poisons per class: an int (a count) or a float in (0, 1)
    (a fraction of the class). Tran et al. remove 1.5 times the budget.

    Example:
        >>> policy = SpectralPolicy(budget=25)        # drops 37 per class
        >>> sel = policy.select(features, labels)     # doctest: +SKIP
    """

    embedding_kind = "features"

    def __init__(self, budget: int | float = 0.05, multiplier: float = 1.5) -> None:
        self.budget = _budget(budget)
        self.multiplier = check_threshold(multiplier, "multiplier")

    def drop_count(self, n: int) -> int:
        expected = self.budget * n if self.budget < 1 else self.budget
        return min(n, math.ceil(self.multiplier * expected - 1e-9))

    def select_class(self, x: np.ndarray, label: int, seed: int):
        centred = x.astype(np.float64) - x.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        scores = (centred @ vt[0]) ** 2
        m = self.drop_count(len(x))
        drop = np.argsort(-scores, kind="stable")[:m]
        return drop, scores, {"n": len(x), "dropped": len(drop)}


def _budget(value) -> int | float:
    """A count (an integer >= 1) or a fraction in (0, 1): 2.5 poisons is neither."""
    try:
        fraction = check_fraction(value, "budget", high=1.0)
    except SanitizerError:
        fraction = None
    if fraction is not None and fraction < 1:
        return fraction
    try:
        return check_positive_int(value, "budget")
    except SanitizerError:
        raise SanitizerError(f"budget is the expected number of poisons per class: a count (an integer >= 1) or a "
                             f"fraction of the class in (0, 1); got {value!r}") from None
