"""Control policies: ``none`` keeps everything; ``random`` drops a given number uniformly at random."""

from __future__ import annotations

import numpy as np

from sanitizer.errors import SanitizerError, check_fraction, check_labels, check_positive_int
from sanitizer.policies.base import Policy, Selection, register_policy


@register_policy("none")
class NoPolicy(Policy):
    """Keep every example (the undefended baseline)."""

    def select(self, embeddings, labels, num_classes=None, seed=0) -> Selection:
        n = len(check_labels(labels, num_classes))
        return Selection(np.ones(n, dtype=bool), np.zeros(n), {})


@register_policy("random")
class RandomPolicy(Policy):
    """Drop ``count`` examples (or ``fraction`` of them) uniformly at random, seeded: a control.

    Example:
        >>> RandomPolicy(count=5).select(np.zeros((20, 2)), np.zeros(20, int)).keep.sum()
        15
    """

    def __init__(self, count: int | None = None, fraction: float | None = None) -> None:
        if (count is None) == (fraction is None):
            raise SanitizerError("the 'random' policy needs exactly one of count= (examples) or fraction= (in [0, 1])")
        self.count = None if count is None else check_positive_int(count, "count", 0)
        self.fraction = None if fraction is None else check_fraction(fraction, "fraction", zero_ok=True)

    def select(self, embeddings, labels, num_classes=None, seed=0) -> Selection:
        n = len(check_labels(labels, num_classes))
        m = self.count if self.count is not None else int(round(self.fraction * n))
        if not 0 <= m <= n:
            raise SanitizerError(f"cannot drop {m} of {n} examples; lower count= or pass fraction=")
        rng = np.random.default_rng(seed)
        keep = np.ones(n, dtype=bool)
        keep[rng.choice(n, m, replace=False)] = False
        return Selection(keep, (~keep).astype(float), {"dropped": m})
