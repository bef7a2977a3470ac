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

    embedding = "features"

    def __init__(self, budget: int | float = 0.05, multiplier: float = 1.5) -> None:
        self.budget = _budget(budget)
        self.multiplier = check_threshold(multiplier, "multiplier")

    def drop_count(self, n: int) -> int:
        expected = self.budget * n if self.budget < 1 else self.budget
        return min(n, math.ceil(self.multiplier * expected - 1e-9))

    def select_class(self, x: np.ndarray, label: int, seed: int):
        centred = x.astype(np.float64) - x.mean(0, keepdims=True)
        scores = (centred @ top_direction(centred)) ** 2
        m = self.drop_count(len(x))
        drop = np.argsort(-scores, kind="stable")[:m]
        return drop, scores, {"n": len(x), "dropped": len(drop)}


def top_direction(centred: np.ndarray, method: str = "svd", iterations: int = 100, seed: int = 0,
                  tol: float = 1e-9) -> np.ndarray | None:
    """The top principal direction of mean-centred rows: their top right singular vector (unit length,
    sign as the method leaves it). One routine for every policy that needs it (spectral signatures,
    the density policy's ``principal_deviation``).

    ``method="svd"``: exact, from a thin SVD (O(n·D·min(n, D))); always returns a vector (an arbitrary
    one when every row is zero). ``method="power"``: power iteration on ``cᵀc`` from a random start
    drawn with ``seed``, stopping once the direction moves by less than ``tol`` or after
    ``iterations`` steps: O(iterations · n · D), no D × D or n × n matrix formed; returns None when the
    rows are all zero (all points identical: no direction to speak of).
    """
    c = np.asarray(centred, dtype=np.float64)
    if method == "svd":
        return np.linalg.svd(c, full_matrices=False)[2][0]
    if method != "power":
        raise SanitizerError(f"method must be 'svd' or 'power', got {method!r}")
    v = np.random.default_rng(seed).standard_normal(c.shape[1])
    v /= np.linalg.norm(v)
    for _ in range(iterations):
        w = c.T @ (c @ v)
        norm = np.linalg.norm(w)
        if norm <= 1e-12:
            return None
        w /= norm
        moved = np.linalg.norm(w - v)
        v = w
        if moved < tol:
            break
    return v


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
