"""Our policy: drop the examples that sit isolated among the gradient embeddings of their own class."""

from __future__ import annotations

import numpy as np

from sanitizer.density import class_isolation, principal_deviation, robust_zscore
from sanitizer.policies.base import Policy, cap_count, register_policy


@register_policy("density")
class DensityPolicy(Policy):
    """kNN isolation within each class, normalised per class, thresholded and capped.

    The isolation of an example is the mean distance to its ``k`` nearest same-class neighbours;
    its score is the robust z-score of log(isolation) within the class, so one ``threshold`` works
    for every class. At most ``max_fraction`` of a class is dropped per round (most isolated first).

    With ``spectral=True`` the score is the larger of that and the robust z-score of the example's
    deviation along its class's top principal direction
    (:func:`~sanitizer.density.principal_deviation`): poisons crafted against one target move
    together, so they form a tight group whose members vouch for each other in a kNN, but they
    stretch their class along one direction. On the CIFAR-10 transfer tuning seeds this raised
    recall from 0.20 to 0.74 on feature collision and from 0.66 to 0.82 on bullseye polytope
    (``benchmarks/RESULTS.md``).

    Example:
        >>> policy = DensityPolicy(k=10, threshold=3.0)
        >>> sel = policy.select(embeddings, labels)  # doctest: +SKIP
    """

    def __init__(self, k: int = 10, threshold: float = 3.0, max_fraction: float = 0.05,
                 backend: str = "auto", spectral: bool = False) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        if not 0 <= max_fraction <= 1:
            raise ValueError("max_fraction must be in [0, 1]")
        self.k = k
        self.threshold = threshold
        self.max_fraction = max_fraction
        self.backend = backend
        self.spectral = bool(spectral)

    def select_class(self, x: np.ndarray, label: int, seed: int):
        isolation = class_isolation(x, self.k, self.backend)
        scores = robust_zscore(np.log(isolation + 1e-12))
        if self.spectral:
            scores = np.maximum(scores, robust_zscore(principal_deviation(x, seed=seed) + 1e-12))
        over = np.flatnonzero(scores > self.threshold)
        cap = cap_count(len(x), self.max_fraction)
        drop = over[np.argsort(-scores[over], kind="stable")][:cap]
        return drop, scores, {"n": len(x), "over_threshold": len(over), "dropped": len(drop),
                              "median_isolation": float(np.median(isolation))}
