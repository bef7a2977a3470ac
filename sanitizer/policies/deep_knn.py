"""Deep k-NN (Peri et al., 2020): drop a point whose label is not the plurality of its neighbours.

The neighbours are the ``k`` nearest points over *all* classes in penultimate-feature space, so
this policy overrides :meth:`Policy.select` instead of working class by class.
"""

from __future__ import annotations

import numpy as np

from sanitizer.density import knn
from sanitizer.errors import check_embeddings, check_labels
from sanitizer.policies.base import Policy, Selection, register_policy


@register_policy("deep_knn")
class DeepKnnPolicy(Policy):
    """Drop each example whose label is not among the plurality labels of its ``k`` nearest neighbours.

    Peri et al. set ``k`` to about twice the poison budget; ``budget=`` does that for you
    (``k = 2 * budget``). Ties: an example is kept when its label is one of the tied plurality labels.
    The score is the fraction of neighbours carrying another label.

    Example:
        >>> policy = DeepKnnPolicy(budget=25)      # k = 50
        >>> sel = policy.select(features, labels)  # doctest: +SKIP
    """

    embedding_kind = "features"

    def __init__(self, k: int | None = None, budget: int | None = None, backend: str = "auto") -> None:
        if k is None:
            k = 2 * budget if budget is not None else 50
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k}); Peri et al. use about twice the poison budget")
        self.k = int(k)
        self.budget = budget
        self.backend = backend

    def select(self, embeddings, labels, num_classes: int | None = None, seed: int = 0) -> Selection:
        y = check_labels(labels, num_classes)
        x = check_embeddings(embeddings, len(y))
        n = len(y)
        if n < 2:
            return Selection(np.ones(n, dtype=bool), np.zeros(n), {"k": 0})
        k = min(self.k, n - 1)
        _, idx = knn(x, k, self.backend)
        neighbour_labels = y[idx]                                   # [n, k]
        c = int(max(y.max(), neighbour_labels.max())) + 1
        counts = np.zeros((n, c), dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(n), k), neighbour_labels.ravel()), 1)
        own = counts[np.arange(n), y]
        keep = own >= counts.max(1)
        scores = 1.0 - own / k
        return Selection(keep, scores, {"k": k, "dropped": int((~keep).sum())})
