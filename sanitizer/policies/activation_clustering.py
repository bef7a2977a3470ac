"""Activation clustering (Chen et al., 2019): per class, reduce the features to a few dimensions,
split them with 2-means, and drop the smaller cluster when it is small enough."""

from __future__ import annotations

import numpy as np

from sanitizer.errors import check_fraction, check_positive_int
from sanitizer.policies.base import Policy, register_policy


@register_policy("activation_clustering")
class ActivationClusteringPolicy(Policy):
    """PCA to ``dims`` dimensions (Chen et al. use ICA; PCA is deterministic), 2-means, and drop the
    smaller cluster of a class when its relative size is below ``threshold``.

    The score of an example is one minus the relative size of its cluster.

    Example:
        >>> policy = ActivationClusteringPolicy(dims=10, threshold=0.35)
        >>> sel = policy.select(features, labels)  # doctest: +SKIP
    """

    embedding = "features"

    def __init__(self, dims: int = 10, threshold: float = 0.35, n_init: int = 10) -> None:
        self.dims = check_positive_int(dims, "dims")
        self.threshold = check_fraction(threshold, "threshold (a relative cluster size)", high=0.5)
        self.n_init = check_positive_int(n_init, "n_init")

    def select_class(self, x: np.ndarray, label: int, seed: int):
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        x = x.astype(np.float64)
        state = check_positive_int(seed, "seed", minimum=-(2**63)) % 2**32  # round seeds exceed sklearn's range
        dims = min(self.dims, x.shape[1], len(x) - 1)
        reduced = PCA(dims, random_state=state).fit_transform(x) if dims < x.shape[1] else x - x.mean(0)
        assign = KMeans(2, n_init=self.n_init, random_state=state).fit_predict(reduced)
        sizes = np.bincount(assign, minlength=2) / len(x)
        smaller = int(np.argmin(sizes))
        scores = 1.0 - sizes[assign]
        drop = np.flatnonzero(assign == smaller) if sizes[smaller] < self.threshold else np.zeros(0, np.int64)
        return drop, scores, {"n": len(x), "smaller_fraction": float(sizes[smaller]), "dropped": len(drop)}
