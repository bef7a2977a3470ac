"""Control policies: ``none`` keeps everything; ``random`` drops a given number uniformly at random."""

from __future__ import annotations

import numpy as np

from sanitizer.errors import SanitizerError, check_fraction, check_labels, check_positive_int, check_seed
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

    ``counts`` instead gives one count per round: round ``r`` drops ``counts[r]`` examples (at most all
    of them), and rounds past the end of the list drop none, e.g. as many as another defense dropped in
    the same rounds (the benchmark's matched random control). The round is the one the Sanitizer
    announces through :meth:`start_round`; each ``select`` moves on to the next.

    Example:
        >>> int(RandomPolicy(count=5).select(np.zeros((20, 2)), np.zeros(20, int)).keep.sum())
        15
        >>> policy = RandomPolicy(counts=[3, 1])
        >>> [int((~policy.select(np.zeros((20, 2)), np.zeros(20, int)).keep).sum()) for _ in range(3)]
        [3, 1, 0]
    """

    def __init__(self, count: int | None = None, fraction: float | None = None,
                 counts: list[int] | None = None) -> None:
        if sum(option is not None for option in (count, fraction, counts)) != 1:
            raise SanitizerError("the 'random' policy needs exactly one of count= (examples), fraction= "
                                 "(in [0, 1]) or counts= (examples per round)")
        self.count = None if count is None else check_positive_int(count, "count", 0)
        self.fraction = None if fraction is None else check_fraction(fraction, "fraction", zero_ok=True)
        if counts is not None and (isinstance(counts, (str, bytes)) or not hasattr(counts, "__iter__")):
            raise SanitizerError(f"counts must be a list of examples to drop per round, e.g. counts=[3, 1]; got "
                                 f"{counts!r} (for one number use count=)")
        self.counts = None if counts is None else [check_positive_int(c, "counts[]", 0) for c in counts]
        self._round = 0

    def start_round(self, index: int, candidates: np.ndarray | None = None) -> None:
        self._round = int(index)

    def select(self, embeddings, labels, num_classes=None, seed=0) -> Selection:
        n = len(check_labels(labels, num_classes))
        seed = check_seed(seed)
        if self.counts is not None:
            m = min(self.counts[self._round], n) if self._round < len(self.counts) else 0
        else:
            m = self.count if self.count is not None else int(round(self.fraction * n))
        self._round += 1
        if not 0 <= m <= n:
            raise SanitizerError(f"cannot drop {m} of {n} examples; lower count= or pass fraction=")
        rng = np.random.default_rng(seed if seed >= 0 else seed % 2**64)  # numpy takes no negative seeds
        keep = np.ones(n, dtype=bool)
        keep[rng.choice(n, m, replace=False)] = False
        return Selection(keep, (~keep).astype(float), {"dropped": m})
