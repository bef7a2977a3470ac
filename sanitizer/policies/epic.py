"""EPIC (Yang, Liu, Mirzasoleiman, ICML 2022), re-implemented without the dense n_c × n_c matrix.

Per class: greedy facility location picks k_c = ceil(f · n_c) medoids with similarity
s_ij = exp(−‖g_i − g_j‖ / D) (D = embedding dimension, submodlib's Euclidean kernel); every point
joins its most similar medoid; medoids whose cluster holds only themselves are dropped.

The reference builds the dense similarity matrix (O(n_c²) memory). Here the initial marginal gains
are accumulated block by block, and lazy greedy re-evaluates a candidate's gain from one similarity
column computed on the fly, so memory is O(n_c · D + block · n_c) and the greedy result is the
exact greedy solution (lazy evaluation is exact for submodular objectives; ties may break differently).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from sanitizer.policies.base import Policy, register_policy


def _similarity_column(x: np.ndarray, sq: np.ndarray, j: int, scale: float) -> np.ndarray:
    d2 = sq + sq[j] - 2.0 * (x @ x[j])
    return np.exp(-np.sqrt(np.maximum(d2, 0.0)) / scale)


def facility_location_medoids(x: np.ndarray, budget: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Greedy facility-location medoids of ``x`` and the medoid each point joins.

    Returns ``(medoids [budget], assignment [n])`` where ``assignment[i]`` is the position in
    ``medoids`` of the most similar medoid of point i (first chosen wins ties).
    """
    x = np.asarray(x, dtype=np.float64)
    n, dim = x.shape
    budget = min(budget, n)
    scale = float(dim)
    sq = (x * x).sum(1)
    # Initial gain of j is sum_i s_ij (nothing covered yet), accumulated block by block.
    gains = np.zeros(n)
    for start in range(0, n, block):
        q = x[start:start + block]
        d2 = (q * q).sum(1)[:, None] + sq[None] - 2.0 * q @ x.T
        gains += np.exp(-np.sqrt(np.maximum(d2, 0.0)) / scale).sum(0)
    heap = [(-g, j) for j, g in enumerate(gains)]
    heapq.heapify(heap)
    covered = np.zeros(n)
    owner = np.full(n, -1)
    medoids: list[int] = []
    while len(medoids) < budget and heap:
        _, j = heapq.heappop(heap)
        col = _similarity_column(x, sq, j, scale)
        gain = np.maximum(col - covered, 0.0).sum()
        if heap and gain < -heap[0][0] - 1e-12:
            heapq.heappush(heap, (-gain, j))  # stale bound: refresh and try the next best
            continue
        better = col > covered
        owner[better] = len(medoids)
        covered = np.maximum(covered, col)
        medoids.append(j)
    return np.asarray(medoids, dtype=np.int64), owner


@register_policy("epic")
class EpicPolicy(Policy):
    """EPIC-f: drop medoids of singleton clusters among ceil(f · n_c) facility-location medoids.

    EPIC embeds with ``logits`` (softmax − onehot), so that is this policy's embedding kind.

    Example:
        >>> sel = EpicPolicy(fraction=0.1).select(embeddings, labels)  # doctest: +SKIP
    """

    embedding_kind = "logits"

    def __init__(self, fraction: float = 0.1) -> None:
        if not 0 < fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        self.fraction = fraction

    def select_class(self, x: np.ndarray, label: int, seed: int):
        budget = math.ceil(self.fraction * len(x))
        medoids, owner = facility_location_medoids(x, budget)
        sizes = np.bincount(owner, minlength=len(medoids))
        singleton = medoids[sizes == 1]
        scores = np.zeros(len(x))
        scores[medoids] = 1.0 / sizes  # 1 for an isolated medoid, small for a medoid of a large cluster
        return singleton, scores, {"n": len(x), "medoids": len(medoids), "dropped": len(singleton)}
