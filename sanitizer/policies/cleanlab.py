"""Confident learning (Northcutt, Jiang and Chuang, 2021) as a baseline policy, through ``cleanlab``.

Each round, a logistic regression on the round's penultimate features is cross-validated
(``folds``-fold, stratified); its out-of-fold probabilities go to ``cleanlab.filter.find_label_issues``,
and the examples it flags are dropped. The score is 1 − the out-of-fold probability of the given label.

Made for mislabelled examples (random label flips, dirty-label backdoors whose patched images still
look like their source class); a clean-label attack keeps correct labels and is not its target.
"""

from __future__ import annotations

import warnings

import numpy as np

from sanitizer.errors import SanitizerError, check_embeddings, check_labels, check_positive_int, check_seed
from sanitizer.policies.base import Policy, Selection, register_policy


def _find_label_issues():
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as exc:
        raise SanitizerError("the 'cleanlab' policy needs the cleanlab package: pip install cleanlab") from exc
    return find_label_issues


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0,
                              c: float = 1.0, max_iter: int = 1000) -> np.ndarray:
    """``[N, K]`` probabilities of a standardised logistic regression, each row from the fold that did
    not train on it; ``y`` holds classes ``0..K-1``, each present at least ``folds`` times."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    return cross_val_predict(model, x, y, cv=split, method="predict_proba")


# the rules cleanlab.filter.find_label_issues accepts (it asserts on anything else, at the first round)
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
           "low_normalized_margin", "low_self_confidence")


@register_policy("cleanlab")
class CleanlabPolicy(Policy):
    """Drop what ``cleanlab.filter.find_label_issues`` flags on cross-validated logistic-regression
    probabilities of the penultimate features.

    ``folds``: cross-validation folds (fewer when the smallest class is smaller); ``c``: the inverse L2
    strength of the logistic regression; ``filter_by``: cleanlab's rule (``"prune_by_noise_rate"``,
    its default, ``"prune_by_class"``, ``"both"``, ``"confident_learning"``, ...). Classes with fewer
    than two examples are kept untouched and left out of the fit, with a warning.

    Example:
        >>> sel = CleanlabPolicy().select(features, labels)  # doctest: +SKIP
    """

    embedding = "features"

    def __init__(self, folds: int = 5, c: float = 1.0, filter_by: str = "prune_by_noise_rate",
                 max_iter: int = 1000) -> None:
        self.folds = check_positive_int(folds, "folds", 2)
        if isinstance(c, bool) or not isinstance(c, (int, float, np.integer, np.floating)) or not c > 0:
            raise SanitizerError(f"c (the logistic regression's inverse L2 strength) must be a positive number, "
                                 f"got {c!r}")
        self.c = float(c)
        if filter_by not in FILTERS:
            raise SanitizerError(f"unknown filter_by {filter_by!r} (cleanlab's rule); choose one of "
                                 f"{', '.join(FILTERS)}")
        self.filter_by = str(filter_by)
        self.max_iter = check_positive_int(max_iter, "max_iter")

    def select(self, embeddings, labels, num_classes: int | None = None, seed: int = 0) -> Selection:
        find_label_issues = _find_label_issues()
        y = check_labels(labels, num_classes)
        seed = check_seed(seed)
        x = check_embeddings(embeddings, len(y)).astype(np.float64)
        keep = np.ones(len(y), dtype=bool)
        scores = np.zeros(len(y))
        classes, counts = np.unique(y, return_counts=True)
        fitted = np.isin(y, classes[counts >= 2])
        info = {"skipped_classes": classes[counts < 2].tolist(), "folds": 0, "flagged": 0}
        if info["skipped_classes"]:
            warnings.warn(f"classes {info['skipped_classes']} have fewer than 2 examples; the 'cleanlab' policy "
                          "keeps them all", stacklevel=2)
        if len(np.unique(y[fitted])) < 2:
            info["reason"] = "fewer than two classes with two or more examples"
            warnings.warn("the 'cleanlab' policy needs two classes with two or more examples each; it keeps "
                          "every example", stacklevel=2)
            return Selection(keep, scores, info)
        rows = np.flatnonzero(fitted)
        present, y_fit = np.unique(y[rows], return_inverse=True)
        folds = int(min(self.folds, np.bincount(y_fit).min()))
        probs = out_of_fold_probabilities(x[rows], y_fit, folds, seed, self.c, self.max_iter)
        issues = find_label_issues(y_fit, probs, filter_by=self.filter_by, n_jobs=1)
        keep[rows[issues]] = False
        scores[rows] = 1.0 - probs[np.arange(len(rows)), y_fit]
        info.update(folds=folds, flagged=int(issues.sum()), classes=present.tolist())
        return Selection(keep, scores, info)
