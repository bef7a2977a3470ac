"""EPIC (Yang, Liu, Mirzasoleiman, ICML 2022), re-implemented without the dense n_c × n_c matrix.

Per class: greedy facility location picks k_c = ceil(f · n_c) medoids with similarity
s_ij = exp(−‖g_i − g_j‖ / D) (D = embedding dimension, submodlib's Euclidean kernel); every point
joins its most similar medoid; medoids whose cluster holds only themselves are dropped.

The reference builds the dense similarity matrix (O(n_c²) memory). Here the marginal gains are kept
exactly and updated only for the points a new medoid covers better, with similarities computed in
row blocks, so memory is O(n_c · D + block · n_c) and the result is the exact greedy solution
(ties go to the lowest index, as with a dense argmax).
"""

from __future__ import annotations

import math

import numpy as np

from sanitizer.errors import check_fraction
from sanitizer.policies.base import Policy, register_policy


def _similarity_block(x: np.ndarray, sq: np.ndarray, cols: np.ndarray, scale: float,
                      rows: np.ndarray | None = None) -> np.ndarray:
    """Similarities exp(−‖x_r − x_c‖ / scale) of ``rows`` (default: all points) to ``cols``."""
    xr, sr = (x, sq) if rows is None else (x[rows], sq[rows])
    d2 = sr[:, None] + sq[cols][None] - 2.0 * (xr @ x[cols].T)
    return np.exp(-np.sqrt(np.maximum(d2, 0.0)) / scale)


def facility_location_medoids(x: np.ndarray, budget: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Greedy facility-location medoids of ``x`` and the medoid each point joins.

    Returns ``(medoids [budget], assignment [n])`` where ``assignment[i]`` is the position in
    ``medoids`` of the most similar medoid of point i (first chosen wins ties).

    Exact greedy with incrementally maintained gains: gain_j = Σ_i max(0, s_ij − covered_i). When a
    medoid is added only the points it covers better (set U) change, so the update costs |U| · n
    similarity evaluations (computed in blocks of rows, never the n × n matrix). |U| shrinks as
    medoids accumulate, so the total is about n² · log(budget) / budget per step on average rather
    than the n² per step of re-evaluating every gain.
    """
    x = np.asarray(x, dtype=np.float64)
    n, dim = x.shape
    budget = min(budget, n)
    scale = float(dim)
    sq = (x * x).sum(1)
    everyone = np.arange(n)
    gains = np.zeros(n)
    for start in range(0, n, block):  # initial gains: nothing is covered yet
        gains += _similarity_block(x, sq, everyone, scale, rows=everyone[start:start + block]).sum(0)
    covered = np.zeros(n)
    owner = np.full(n, -1)
    medoids: list[int] = []
    for step in range(budget):
        j = int(np.argmax(gains))
        medoids.append(j)
        col = _similarity_block(x, sq, np.array([j]), scale)[:, 0]
        better = col > covered
        changed = np.flatnonzero(better)
        for start in range(0, len(changed), block):
            rows = changed[start:start + block]
            s_rows = _similarity_block(x, sq, everyone, scale, rows=rows)  # [len(rows), n]
            old = np.maximum(s_rows - covered[rows, None], 0.0).sum(0)
            new = np.maximum(s_rows - col[rows, None], 0.0).sum(0)
            gains -= old - new
        covered[changed] = col[changed]
        # A point far from every medoid has similarity 0 (exp underflows) to all: it joins the first one.
        owner[better | (owner < 0)] = step
        gains[medoids] = -np.inf
    return np.asarray(medoids, dtype=np.int64), owner


@register_policy("epic")
class EpicPolicy(Policy):
    """EPIC-f: drop medoids of singleton clusters among ceil(f · n_c) facility-location medoids.

    EPIC embeds with ``logits`` (softmax − onehot), so that is this policy's embedding kind.

    Example:
        >>> sel = EpicPolicy(fraction=0.1).select(embeddings, labels)  # doctest: +SKIP
    """

    embedding = "logits"

    def __init__(self, fraction: float = 0.1) -> None:
        self.fraction = check_fraction(fraction, "fraction (EPIC's subset size, e.g. 0.1 or policy='epic-0.1')")

    def select_class(self, x: np.ndarray, label: int, seed: int):
        budget = math.ceil(self.fraction * len(x))
        medoids, owner = facility_location_medoids(x, budget)
        sizes = np.bincount(owner, minlength=len(medoids))
        singleton = medoids[sizes == 1]
        scores = np.zeros(len(x))
        # 1 for an isolated medoid, small for a medoid of a large cluster; 0 for a medoid that joined an earlier
        # medoid's cluster (a duplicate of it: its own cluster is empty), as for every non-medoid
        scores[medoids] = np.where(sizes > 0, 1.0 / np.maximum(sizes, 1), 0.0)
        return singleton, scores, {"n": len(x), "medoids": len(medoids), "dropped": len(singleton)}
