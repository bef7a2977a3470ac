"""Our policy: drop the examples that sit isolated among the gradient embeddings of their own class."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from sanitizer.errors import check_flag, check_fraction, check_positive_int, check_threshold
from sanitizer.label_agreement import LOW_AGREEMENT, mislabelled
from sanitizer.neighbors import (
    EXACT_LIMIT,
    check_backend,
    class_isolation,
    class_isolation_factored,
    outer_product_factors,
    principal_deviation,
    robust_zscore,
)
from sanitizer.policies.base import Policy, Selection, cap_count, register_policy

# With the isolation gate, a class whose isolated tail does not stand out still loses the examples scored past
# this multiple of the threshold (see DensityPolicy.gate_classes).
CLOSED_CLASS_FACTOR = 2.0


@register_policy("density")
class DensityPolicy(Policy):
    """kNN density within each class: drop the examples whose density is abnormal for their class:
    isolated ones always, and with ``two_sided=True`` also the abnormally dense ones. With
    ``screen=True`` (the default) the Sanitizer first runs the input-noise screen when training
    starts (:mod:`sanitizer.noise_screen`): images whose patch noise floor is an outlier for their
    class (robust z > ``screen_threshold``) are dropped before the model sees them. That is what
    catches ℓ∞-bounded poisons (gradient matching from scratch), which are *not* isolated in
    gradient space; the rounds then catch what is isolated (mislabelled examples, feature collision).
    With ``screen_patterns=True`` (the default) the screen also drops the images of a class that share an
    exact stamped window which the other classes lack (:mod:`sanitizer.shared_patterns`): patch
    backdoors on colour images, which leave the noise floor alone.

    The isolation of an example is the mean distance to its ``k`` nearest same-class neighbours in
    the embedding (faiss); its score is the robust z-score of log(isolation) within the class, so one
    threshold works for every class. Two kinds of poison are abnormal in opposite directions:

    - **isolated** (z > ``threshold``): mislabelled examples, feature collision, bullseye polytope:
      their gradient points away from their class;
    - **too dense** (z < −``dense_threshold``): examples the model learns far faster than the rest of
      their class sit at the origin of last-layer gradient space, packed together. From-scratch
      gradient-matching poisons and backdoors are learned this way (on CIFAR-10 from scratch, 70–80 %
      of the poisons of a set sit in the densest few percent of their class within the first quarter
      of training; ``benchmarks/RESULTS.md``). Clean examples of a class are learned at a spread of
      speeds, so few of them are as extreme.

    Learning speed only tells poisons apart early: later in training every clean example is learned
    too and the dense tail fills with clean ones. So the dense side acts in the first ``dense_rounds``
    rounds of a sanitizer (default 1: the first round, at ``warmup``), the isolated side in every
    round. ``two_sided`` is off by default: on two from-scratch CIFAR-10 tuning sets the dense side
    found 68 % of the poisons, yet the target's adversarial probability ended *higher* than undefended
    (3.8× and 6.7×; docs/two-sided-density.md). Detection alone did not defend there, so it is not the
    default yet. The reported score is
    ``max(z, −z · threshold / dense_threshold)``: above ``threshold`` means dropped on either side.
    At most ``max_fraction`` of a class is dropped per round (most extreme first). With the two-sided
    score pass a larger cap (e.g. 0.2): 10 % of a class can be poisons, and 5 % would hide half of them.

    **The label side** (``label_side=True``, the default) looks across classes: an example of which at
    most one of its ``label_k`` nearest neighbours in penultimate-feature space (all classes) carries its
    label is mislabelled, or natural confusion. It acts only when such examples form a population of their
    own (:mod:`sanitizer.label_agreement`: the gate ratio above ``label_gate``), which random label flips
    make and clean data, even CIFAR-10 at 83 % accuracy, does not; and only from round
    ``label_start_round`` (the second) on, once the features are past the first epochs. It needs the
    features, so it runs on the explicit last-layer embedding (the default), whose rows factor as
    softmax error ⊗ [features; 1]; with other embeddings it is skipped and the round's info says so. It is not bound by
    ``max_fraction`` (10 % flipped labels would hide behind a 5 % cap), only by half of each class. With
    ``label_confirm`` (the default) an example is flagged only if it was also in the low-agreement mode in the
    round before (the Sanitizer passes the rows' dataset indices to :meth:`start_round`; the round before the
    first acting one only gathers this evidence): a flipped label stays wrong, natural confusion comes and goes.
    **In harvest mode** the rows are train-mode features of augmented views, in which flipped labels blur into
    the natural tail (the gate ratio of the same flips 0.7–1.5 against 1.2–2.8 on a pass, digits). So the label
    side measures its gate ratio on the harvested rows first and, when it exceeds ``label_pass_trigger``
    (or once the gate has latched open), asks the Sanitizer for a pass over the round's rows
    (:meth:`use_clean_views`) and decides on those: rounds on clean labels stay free of a pass.

    **The isolation gate** (``isolation_gate=True``, the default): the isolation side drops in full only in
    classes whose isolated tail stands out among the classes (:meth:`gate_classes`), a group of poisons in one
    class; elsewhere only gross outliers (score over ``CLOSED_CLASS_FACTOR`` × ``threshold``), not the natural
    tail every class has. ``isolation_gate=False`` is the ungated isolation side of earlier versions.

    With ``spectral=True`` the isolation side also takes the robust z-score of the example's deviation
    along its class's top principal direction (:func:`~sanitizer.neighbors.principal_deviation`).

    Example:
        >>> policy = DensityPolicy(k=10, threshold=3.0, two_sided=True)
        >>> sel = policy.select(embeddings, labels)  # doctest: +SKIP
        >>> sel.info["per_class"][0]["too_dense"], sel.info["per_class"][0]["isolated"]  # doctest: +SKIP
    """

    def __init__(self, k: int = 10, threshold: float = 3.0, max_fraction: float = 0.05,
                 backend: str = "auto", spectral: bool = False, two_sided: bool = False,
                 dense_threshold: float | None = None, dense_rounds: int | None = 1, screen: bool = True,
                 screen_threshold: float = 3.5, screen_patterns: bool = True, label_side: bool = True,
                 label_k: int = 20, label_gate: float = 1.0, label_start_round: int = 1,
                 label_max_probability: float | None = None, isolation_gate: bool = True,
                 label_confirm: bool = True, label_pass_trigger: float = 0.7) -> None:
        k = check_positive_int(k, "k")
        self.label_side = check_flag(label_side, "label_side")
        self.label_k = check_positive_int(label_k, "label_k")
        self.label_gate = check_threshold(label_gate, "label_gate")
        self.label_start_round = check_positive_int(label_start_round, "label_start_round", 0)
        self.label_confirm = check_flag(label_confirm, "label_confirm")
        self.label_pass_trigger = check_threshold(label_pass_trigger, "label_pass_trigger")
        self.label_max_probability = None if label_max_probability is None else check_fraction(
            label_max_probability, "label_max_probability")
        self.screen = check_flag(screen, "screen")
        self.screen_threshold = check_threshold(screen_threshold, "screen_threshold")
        self.screen_patterns = check_flag(screen_patterns, "screen_patterns")
        self.isolation_gate = check_flag(isolation_gate, "isolation_gate")
        max_fraction = check_fraction(max_fraction, "max_fraction", zero_ok=True)
        threshold = check_threshold(threshold)
        if dense_threshold is not None:
            dense_threshold = check_threshold(dense_threshold, "dense_threshold")
        self.k = k
        self.threshold = threshold
        self.max_fraction = max_fraction
        self.backend = check_backend(backend)
        self.spectral = check_flag(spectral, "spectral")
        self.two_sided = check_flag(two_sided, "two_sided")
        self.dense_threshold = dense_threshold
        # None: the dense side acts in every round
        self.dense_rounds = None if dense_rounds is None else check_positive_int(dense_rounds, "dense_rounds", 0)
        self._round = 0
        self._ids: np.ndarray | None = None  # the dataset indices of this round's rows, when the caller gives them
        self._label_low: np.ndarray | None = None  # indices in the low-agreement mode last round
        self._label_opened = False  # the gate has opened in an acting round of this run (it then stays open)
        self._clean_views: Callable[[], np.ndarray] | None = None  # see use_clean_views

    def use_clean_views(self, provider: Callable[[], np.ndarray] | None) -> None:
        """For a round whose rows were harvested, the Sanitizer offers ``provider``: it makes a pass over the
        round's rows and returns their :meth:`cross_class_features` (None after the round)."""
        self._clean_views = provider

    def start_round(self, index: int, candidates: np.ndarray | None = None) -> None:
        self._round = int(index)
        self._ids = None if candidates is None else np.asarray(candidates, dtype=np.int64)

    def state_dict(self) -> dict:
        """The label side's memory of the last round (for a checkpoint; see :meth:`Policy.state_dict`)."""
        state = {"label_opened": self._label_opened}
        return state if self._label_low is None else {**state, "label_low": torch.from_numpy(self._label_low.copy())}

    def load_state_dict(self, state: Mapping) -> None:
        low = state.get("label_low")
        self._label_low = None if low is None else torch.as_tensor(low).numpy().astype(np.int64)
        self._label_opened = bool(state.get("label_opened", False))

    def dense_side_active(self) -> bool:
        return self.two_sided and (self.dense_rounds is None or self._round < self.dense_rounds)

    def _isolation(self, x: np.ndarray) -> np.ndarray:
        # the explicit last-layer embedding is an outer product per row: its exact kNN needs C + d work per
        # pair instead of C·d (neighbors.knn_factored); the class count comes from Policy.select. Exact is
        # O(n²) per class, so classes above EXACT_LIMIT take the approximate search on the explicit rows.
        factors = None
        if self.backend == "auto" and self.k < len(x) <= EXACT_LIMIT:
            factors = outer_product_factors(x, self._num_classes)
        if factors is not None:
            return class_isolation_factored(*factors, self.k)
        return class_isolation(x, self.k, self.backend)

    def gate_classes(self, selection: Selection, labels: np.ndarray) -> None:
        """With ``isolation_gate=True``: keep the class-by-class drops only in classes whose share of examples
        over ``threshold`` stands out among the classes (the screen's class-level test,
        :func:`~sanitizer.noise_screen.attacked_classes`). Every class has a natural isolated tail; a group of
        poisons in one class (feature collision) makes that class's tail heavier than the others', where a
        uniform contamination (random label flips: the label side's business) or no poison at all does not.
        In a closed class an example still goes when its score exceeds ``CLOSED_CLASS_FACTOR`` × ``threshold``:
        natural tails on digits reach robust z 3.4–6.4 (36 audited rounds, one 9.9), while a gross outlier (an
        example inside another class's cluster) sits at 5–11 and would otherwise be kept whenever such outliers
        are spread evenly over the classes."""
        if not self.isolation_gate:
            return
        from sanitizer.noise_screen import THRESHOLD, attacked_classes

        y = np.asarray(labels)
        if len(np.unique(y)) < 3:  # no other classes to compare a tail with: the gate stays open
            selection.info["isolation_gate"] = {"open_classes": "all (fewer than 3 classes)", "withdrawn": 0}
            return
        open_classes = attacked_classes(selection.scores, y, self.threshold, THRESHOLD)
        # in a closed class only the examples far past any natural tail still go (gross outliers, 2x the threshold)
        gross = selection.scores > CLOSED_CLASS_FACTOR * self.threshold
        restore = ~selection.keep & ~np.isin(y, open_classes) & ~gross
        selection.keep[restore] = True
        selection.info["isolation_gate"] = {"open_classes": open_classes, "withdrawn": int(restore.sum())}

    def cross_class_features(self, x: np.ndarray, num_classes: int) -> np.ndarray | None:
        """``[softmax error (num_classes) | penultimate features]`` of each row (from the last-layer embedding's
        factors) when the label side acts this round; ``[n, 0]`` when it should but the rows are not last-layer
        gradients."""
        if not self.label_side or self._round < self.label_start_round - int(self.label_confirm):
            return None  # (with label_confirm the round before the first acting one gathers evidence)
        factors = outer_product_factors(x, num_classes) if len(x) > 1 else None
        if factors is None:
            return np.zeros((len(x), 0), np.float32)
        error, h1 = factors
        return np.concatenate([error, h1[:, :-1]], 1)

    def select_across(self, features: np.ndarray, labels: np.ndarray, selection: Selection,
                      num_classes: int) -> None:
        """The label side: drop the mislabelled examples (see the class docstring) from ``selection``."""
        if features.shape[1] == 0:
            selection.info["label_side"] = {"open": False, "skipped": "the embedding rows are not last-layer "
                                            "gradients (softmax error ⊗ [features; 1]), so no features"}
            return
        y = np.asarray(labels)
        error, feats = features[:, :num_classes], features[:, num_classes:]
        p_label = 1.0 + error[np.arange(len(y)), y]  # the model's probability of the given label
        ids = self._ids if self._ids is not None and len(self._ids) == len(y) else None
        confirmed = None  # without a previous round (or without dataset indices) one round decides
        if self.label_confirm and ids is not None and self._label_low is not None:
            confirmed = np.isin(ids, self._label_low)
        # Once the gate has opened the run has flipped labels; dropping them lowers R, so later rounds would
        # close the gate on the flips the first open round could not confirm yet: it stays open instead.
        # (Only in a Sanitizer's run of rounds: a policy called on its own has no indices and no memory.)
        latched = self._label_opened and confirmed is not None and self._round >= self.label_start_round

        def decide(feats: np.ndarray, p_label: np.ndarray, skip_below: float):
            # a large round skips the full search when a sample bounds R below skip_below (none once latched)
            return mislabelled(feats, y, self.label_k, -1.0 if latched else self.label_gate, self.backend, p_label,
                               self.label_max_probability, confirmed, skip_below=None if latched else skip_below)

        if self._clean_views is None:
            flagged, agreement, info = decide(feats, p_label, self.label_gate)
        else:  # harvested rows: pay for a pass only when they hint at flipped labels, or once the gate has latched
            result = None if latched else decide(feats, p_label, min(self.label_pass_trigger, self.label_gate))
            if result is None or result[2]["gate_ratio"] > self.label_pass_trigger:
                harvested_ratio = None if result is None else result[2]["gate_ratio"]
                clean = self._clean_views()
                result = decide(clean[:, num_classes:], 1.0 + clean[np.arange(len(y)), y], self.label_gate)
                result[2].update(views="pass", harvested_gate_ratio=harvested_ratio)
            else:
                result[2]["views"] = "harvested"
            flagged, agreement, info = result
        if ids is not None:
            self._label_low = np.sort(ids[agreement <= LOW_AGREEMENT])  # the low mode, for the next round
        if latched:
            info["gate"], info["latched"] = self.label_gate, info["gate_ratio"] <= self.label_gate
        elif info["open"] and ids is not None and self._round >= self.label_start_round:
            self._label_opened = True
        if self._round < self.label_start_round:  # evidence for the next round's confirmation only
            views = {key: info[key] for key in ("views", "harvested_gate_ratio") if key in info}
            selection.info["label_side"] = {"open": False, "evidence_only": True, "gate_ratio": info["gate_ratio"],
                                            "low_agreement": info["low_agreement"], **views}
            return
        dropped = 0
        for c in np.unique(y[flagged]):
            members = np.flatnonzero(y == c)
            if len(members) < self.min_class_size:
                continue
            ranked = members[flagged[members]]
            ranked = ranked[np.argsort(agreement[ranked], kind="stable")][:len(members) // 2]  # never empty a class
            dropped += int(selection.keep[ranked].sum())
            selection.keep[ranked] = False
            # above the threshold when flagged: the highest flagged agreement maps to the threshold
            label_score = self.threshold * (1.0 - agreement[ranked]) / (1.0 - agreement[ranked].max()) + 1e-9
            selection.scores[ranked] = np.maximum(selection.scores[ranked], label_score)
        selection.info["label_side"] = {**info, "dropped_by_label_side_only": dropped}

    def select_class(self, x: np.ndarray, label: int, seed: int):
        isolation = self._isolation(x)
        z = robust_zscore(np.log(isolation + 1e-12))
        scores = z
        if self.spectral:
            scores = np.maximum(scores, robust_zscore(principal_deviation(x, seed=seed) + 1e-12))
        dense = np.zeros(len(x), dtype=bool)
        if self.dense_side_active():
            dense_threshold = self.dense_threshold or self.threshold
            dense = z < -dense_threshold
            scores = np.maximum(scores, -z * (self.threshold / dense_threshold))
        over = np.flatnonzero(scores > self.threshold)
        cap = cap_count(len(x), self.max_fraction)
        drop = over[np.argsort(-scores[over], kind="stable")][:cap]
        return drop, scores, {"n": len(x), "over_threshold": len(over), "dropped": len(drop),
                              "too_dense": int(dense[drop].sum()), "isolated": int((~dense[drop]).sum()),
                              "median_isolation": float(np.median(isolation))}
