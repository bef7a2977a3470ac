"""Deep k-NN (Peri et al., 2020): drop a point whose label is not the plurality of its neighbours.

The neighbours are the ``k`` nearest points over *all* classes in penultimate-feature space, so
this policy overrides :meth:`Policy.select` instead of working class by class.
"""

from __future__ import annotations

import warnings

import numpy as np

from sanitizer.errors import check_embeddings, check_labels, check_positive_int
from sanitizer.neighbors import check_backend, knn
from sanitizer.policies.base import Policy, Selection, register_policy


@register_policy("deep_knn")
class DeepKnnPolicy(Policy):
    """Drop each example whose label is not among the plurality labels of its ``k`` nearest neighbours.

    Peri et al. set ``k`` to about twice the poison budget; ``budget=`` does that for you
    (``k = 2 * budget``). Ties: an example is kept when its label is one of the tied plurality labels.
    The score is the fraction of neighbours carrying another label. Classes with fewer than
    ``min_class_size`` (3) examples are kept, with a warning: no neighbour could share their label. A class
    the rule would empty is kept whole (``info["spared_classes"]``).

    Example:
        >>> policy = DeepKnnPolicy(budget=25)      # k = 50
        >>> sel = policy.select(features, labels)  # doctest: +SKIP
    """

    embedding = "features"

    def __init__(self, k: int | None = None, budget: int | None = None, backend: str = "auto") -> None:
        if budget is not None:
            budget = check_positive_int(budget, "budget")
        if k is None:
            k = 2 * budget if budget is not None else 50
        self.k = check_positive_int(k, "k")  # Peri et al. use about twice the poison budget
        self.budget = budget
        self.backend = check_backend(backend)

    def select(self, embeddings, labels, num_classes: int | None = None, seed: int = 0) -> Selection:
        y = check_labels(labels, num_classes)
        x = check_embeddings(embeddings, len(y))
        n = len(y)
        classes, counts = np.unique(y, return_counts=True)
        tiny = classes[counts < self.min_class_size]
        if len(tiny):  # no neighbour could vouch for them: kept, as every class-wise policy keeps tiny classes
            warnings.warn(f"classes {tiny.tolist()} have fewer than {self.min_class_size} examples; the "
                          f"{self.name!r} policy keeps them all", stacklevel=2)
        if n < 2:
            return Selection(np.ones(n, dtype=bool), np.zeros(n), {"k": 0, "skipped_classes": tiny.tolist()})
        k = min(self.k, n - 1)
        _, idx = knn(x, k, self.backend)
        neighbour_labels = y[idx]                                   # [n, k]
        own = (neighbour_labels == y[:, None]).sum(1)
        keep = (own >= _plurality_count(neighbour_labels)) | np.isin(y, tiny)
        # never empty a class (as the class-wise policies never do): with k near n and balanced labels the
        # leave-one-out plurality can go against every member of a class
        emptied = np.setdiff1d(classes, y[keep])
        keep |= np.isin(y, emptied)
        scores = 1.0 - own / k
        return Selection(keep, scores, {"k": k, "dropped": int((~keep).sum()), "skipped_classes": tiny.tolist(),
                                        "spared_classes": emptied.tolist()})


def _plurality_count(labels: np.ndarray) -> np.ndarray:
    """Per row of ``labels`` [n, k]: how often its most frequent value occurs. O(n·k) memory, whatever
    the label values (a per-class count table would be n × (largest label + 1))."""
    s = np.sort(labels, axis=1)
    pos = np.arange(s.shape[1])
    starts = np.where(np.diff(s, axis=1, prepend=s[:, :1] - 1) != 0, pos, 0)
    run = pos - np.maximum.accumulate(starts, axis=1) + 1        # length of the run ending at each position
    return run.max(axis=1)
