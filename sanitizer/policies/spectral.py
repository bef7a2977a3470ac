"""Spectral signatures (Tran, Li, Madry, 2018): per class, drop the largest projections on the
top singular vector of the centred features."""

from __future__ import annotations

import math

import numpy as np

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
        if not budget > 0:
            raise ValueError(f"budget must be a positive count or a fraction in (0, 1), got {budget}")
        if multiplier <= 0:
            raise ValueError(f"multiplier must be > 0, got {multiplier}")
        self.budget = budget
        self.multiplier = multiplier

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
