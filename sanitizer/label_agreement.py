"""Mislabelled examples: the label side of the ``density`` policy.

A mislabelled example sits among examples of another class in penultimate-feature space, so few of its
nearest neighbours (over *all* classes, the example itself left out) carry its label: its *agreement*
is near 0. Natural confusion (an ambiguous image near a class boundary) also lowers agreement, but
continuously: it gives a tail that thins towards 0. Random label flips instead add a separate
population at agreement ≈ 0. So the side acts only when the agreement distribution has a mode at its
low end, measured by the *gate ratio*

    R = #(agreement ≤ 0.1) / #(0.2 ≤ agreement ≤ 0.5)

(pooled over classes). With k = 20 the low end covers 3 agreement levels and the middle 7, so R > 1
means that the low levels hold more than twice the mass per level of the middle ones: a second mode,
not a tail. Measured at k = 10 (``benchmarks/RESULTS.md``, tuning seeds): clean digits 0.26–0.69,
clean from-scratch CIFAR-10 0.53–0.57, clean CIFAR-10 transfer features 0.47; digits with 10 % random
flips 0.86–2.3 (above 1 from the second round on). When the gate is open, the examples with at most
one agreeing neighbour (:data:`MAX_AGREEING`) are flagged: on digits with 10 % flips (tuning seeds),
"at most 2 of 20" found 97 % of the flips at 74 % precision, "at most 1" 94 % at 79 %, "none" 84 % at
85 %.
"""

from __future__ import annotations

import numpy as np

from sanitizer.neighbors import CLUSTER_MAX_ROWS, knn

LOW_AGREEMENT = 0.1
MIDDLE_AGREEMENT = (0.2, 0.5)
MAX_AGREEING = 1  # flagged: at most one of the k neighbours carries the example's label
# Large rounds first estimate R on this many random examples (each searched against every row); when its upper
# 95 % bound is below the level that matters (the gate, or harvest mode's pass trigger) the full search is skipped.
# On CIFAR-10 (50k rows, k = 20) the estimate's spread is ±0.02 and the bound sits ~0.05 above it: clean labels'
# bound 0.59–0.68 against the trigger 0.7, 10 % flips' 0.84–1.24 (benchmarks/RESULTS.md).
GATE_SAMPLE = 8_192
GATE_SAMPLE_MIN_ROWS = 4 * GATE_SAMPLE  # below this the full search costs little more than the sample's


def label_agreement(features: np.ndarray, labels: np.ndarray, k: int = 10, backend: str = "auto") -> np.ndarray:
    """Share of each example's ``k`` nearest other examples (cosine, all classes) that carry its label.

    Example:
        >>> f = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], dtype=np.float32)
        >>> label_agreement(f, np.array([0, 0, 1, 0]), k=1).tolist()
        [1.0, 1.0, 0.0, 0.0]
    """
    agreeing, k = _agreeing_neighbours(features, labels, k, backend)
    return agreeing / k


def _agreeing_neighbours(features: np.ndarray, labels: np.ndarray, k: int, backend: str,
                         queries: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(how many of each example's k nearest others carry its label, the k used: at most n − 1); with
    ``queries``, for those examples only (their neighbours are still searched among all)."""
    n = len(labels)
    rows = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    if n < 2:
        return np.ones(len(rows)), 1
    k = min(k, n - 1)
    unit = np.asarray(features, dtype=np.float32)
    unit = unit / (np.linalg.norm(unit, axis=1, keepdims=True) + 1e-12)
    # features of a trained network: compact lists
    _, idx = knn(unit, k, backend, approximate="clusters", queries=queries)
    return (labels[idx] == labels[rows][:, None]).sum(1), k


def _gate_counts(agreement: np.ndarray) -> tuple[int, int]:
    lo, hi = MIDDLE_AGREEMENT
    return int((agreement <= LOW_AGREEMENT).sum()), int(((agreement >= lo) & (agreement <= hi)).sum())


def gate_ratio(agreement: np.ndarray) -> float:
    """R = #(agreement ≤ 0.1) / #(0.2 ≤ agreement ≤ 0.5): above 1, the low end is a mode of its own."""
    low, middle = _gate_counts(agreement)
    return low / max(middle, 1)


def gate_ratio_upper(agreement: np.ndarray) -> float:
    """Upper 95 % bound of R when ``agreement`` is a random sample of the examples: the two counts as
    Poisson, R·exp(1.96·√(1/low + 1/middle)) (each count at least ½)."""
    low, middle = _gate_counts(agreement)
    return gate_ratio(agreement) * float(np.exp(1.96 * np.sqrt(1 / max(low, 0.5) + 1 / max(middle, 0.5))))


def sampled_gate(features: np.ndarray, labels: np.ndarray, k: int, backend: str = "auto",
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """``(sample, agreement of the sample, info)``: R estimated on :data:`GATE_SAMPLE` random examples
    (searched against every example), with its upper bound; None below :data:`GATE_SAMPLE_MIN_ROWS` rows, and
    above :data:`~sanitizer.neighbors.CLUSTER_MAX_ROWS`, where the search is a graph built on every row whatever
    the queries (a sample would cost about what the full search costs, and the full search may follow it)."""
    n = len(labels)
    if not GATE_SAMPLE_MIN_ROWS <= n <= CLUSTER_MAX_ROWS:
        return None
    sample = np.sort(np.random.default_rng(seed).choice(n, GATE_SAMPLE, replace=False))
    agreeing, k = _agreeing_neighbours(features, labels, k, backend, queries=sample)
    agreement = agreeing / k
    info = {"gate_ratio": round(gate_ratio(agreement), 4), "gate_ratio_upper": round(gate_ratio_upper(agreement), 4),
            "sampled": len(sample), "low_agreement": int((agreement <= LOW_AGREEMENT).sum())}
    return sample, agreement, info


def mislabelled(features: np.ndarray, labels: np.ndarray, k: int = 10, gate: float = 1.0, backend: str = "auto",
                label_probability: np.ndarray | None = None, max_probability: float | None = None,
                confirmed: np.ndarray | None = None,
                skip_below: float | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(flagged bool [n], agreement [n], info): the examples with at most one agreeing neighbour, flagged
    only when the gate ratio exceeds ``gate`` (else none). With ``max_probability``, an example is flagged
    only if the model also gives its label (``label_probability``, [n]) less than that probability. With
    ``confirmed`` (bool [n]: the examples in the low-agreement mode, agreement ≤ :data:`LOW_AGREEMENT`, in the
    previous round), only those can be flagged: a flipped label stays wrong from round to round, a clean image
    near a class boundary often does not (``info["unconfirmed"]`` counts the ones spared). With ``skip_below``
    (a gate or trigger level), a round of at least :data:`GATE_SAMPLE_MIN_ROWS` examples first estimates R on a
    sample (:func:`sampled_gate`); when its upper bound is at most ``skip_below`` nothing is flagged and the full
    search is skipped (``agreement`` is NaN outside the sample; ``info["sampled"]`` says how many).
    ``skip_below`` must not exceed ``gate``."""
    if skip_below is not None:  # a large round: a sample first, the full search only if R may exceed skip_below
        estimate = sampled_gate(features, labels, k, backend)
        if estimate is not None and estimate[2]["gate_ratio_upper"] <= skip_below:
            sample, sampled_agreement, info = estimate
            agreement = np.full(len(labels), np.nan)  # (unsampled examples: not searched)
            agreement[sample] = sampled_agreement
            return np.zeros(len(labels), dtype=bool), agreement, {**info, "gate": gate, "open": False, "flagged": 0}
    agreeing, k = _agreeing_neighbours(features, labels, k, backend)
    agreement = agreeing / k
    ratio = gate_ratio(agreement)
    flagged = (agreeing <= MAX_AGREEING) & (ratio > gate)
    info = {"gate_ratio": round(ratio, 4), "gate": gate, "open": bool(ratio > gate),
            "low_agreement": int((agreement <= LOW_AGREEMENT).sum())}
    if confirmed is not None:
        unconfirmed = flagged & ~np.asarray(confirmed, dtype=bool)
        info["unconfirmed"] = int(unconfirmed.sum())
        flagged &= ~unconfirmed
    if max_probability is not None and label_probability is not None:
        spared = flagged & (np.asarray(label_probability) >= max_probability)
        info["spared_by_the_model"] = int(spared.sum())
        flagged &= ~spared
    info["flagged"] = int(flagged.sum())
    return flagged, agreement, info
