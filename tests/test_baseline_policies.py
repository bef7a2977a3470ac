"""The baseline defenses (deep k-NN, spectral signatures, activation clustering) find planted points."""

import numpy as np
import pytest

from sanitizer.policies import available_policies, make_policy


def gaussian_classes(rng, n_per_class=150, dim=16, classes=3, spread=8.0):
    centres = rng.normal(0, spread, (classes, dim))
    x = np.concatenate([centres[c] + rng.normal(0, 1, (n_per_class, dim)) for c in range(classes)])
    y = np.repeat(np.arange(classes), n_per_class)
    return x.astype(np.float32), y, centres


def test_baselines_are_registered_with_feature_embeddings():
    for name in ("deep_knn", "spectral", "activation_clustering"):
        assert name in available_policies()
        assert make_policy(name).embedding == "features"


def test_deep_knn_drops_points_sitting_inside_another_class():
    rng = np.random.default_rng(0)
    x, y, centres = gaussian_classes(rng)
    planted = centres[1] + rng.normal(0, 1, (12, x.shape[1]))  # labelled 0, living among class 1
    x = np.concatenate([x, planted.astype(np.float32)])
    y = np.concatenate([y, np.zeros(12, dtype=np.int64)])
    sel = make_policy("deep_knn", budget=12).select(x, y)      # k = 24 > 12 planted: they cannot outvote
    is_planted = np.arange(len(y)) >= len(y) - 12
    assert not sel.keep[is_planted].any()
    assert sel.keep[~is_planted].mean() > 0.99
    assert sel.scores[is_planted].min() > sel.scores[~is_planted].max()


def test_deep_knn_never_empties_a_class():
    """k = n − 1 and labels split 3/3: every example's leave-one-out plurality is the other label (a case the
    property tests found); the rule would drop all six, so both classes are kept whole."""
    x = np.array([[-1.0], [0.0], [-1.0], [-1.0], [-1.0], [-1.0]], dtype=np.float32)
    y = np.array([1, 0, 0, 0, 1, 1])
    sel = make_policy("deep_knn").select(x, y)
    assert sel.keep.all() and sel.info["spared_classes"] == [0, 1] and sel.info["dropped"] == 0
    # a class the rule empties only partly is not spared
    x2 = np.concatenate([np.zeros((20, 2)), np.ones((20, 2)), np.zeros((2, 2))]).astype(np.float32)
    y2 = np.array([0] * 20 + [1] * 20 + [1] * 2)
    sel2 = make_policy("deep_knn", k=5).select(x2, y2)
    assert not sel2.keep[40:].any() and sel2.keep[:40].all() and sel2.info["spared_classes"] == []


def test_deep_knn_with_small_k_is_fooled_by_a_tight_group():
    # The reason for k ≈ 2 × budget: with k below the group size, planted points vouch for each other.
    rng = np.random.default_rng(1)
    x, y, centres = gaussian_classes(rng)
    planted = centres[1] + rng.normal(0, 0.05, (12, x.shape[1]))
    x = np.concatenate([x, planted.astype(np.float32)])
    y = np.concatenate([y, np.zeros(12, dtype=np.int64)])
    is_planted = np.arange(len(y)) >= len(y) - 12
    assert make_policy("deep_knn", k=5).select(x, y).keep[is_planted].all()
    assert not make_policy("deep_knn", k=24).select(x, y).keep[is_planted].any()


def test_spectral_drops_the_shifted_points_within_one_and_a_half_budgets():
    rng = np.random.default_rng(2)
    dim = 20
    clean = rng.normal(0, 1, (200, dim))
    direction = rng.normal(0, 1, dim)
    direction /= np.linalg.norm(direction)
    planted = rng.normal(0, 1, (10, dim)) + 6 * direction
    x = np.concatenate([clean, planted]).astype(np.float32)
    y = np.zeros(len(x), dtype=np.int64)
    sel = make_policy("spectral", budget=10).select(x, y)
    assert len(sel.dropped) == 15
    assert set(range(200, 210)) <= set(sel.dropped.tolist())
    # Fraction budgets scale with the class: 5% of 210 → 1.5 × 10.5 → 16.
    assert len(make_policy("spectral", budget=0.05).select(x, y).dropped) == 16


def test_activation_clustering_drops_a_small_separate_cluster_only():
    rng = np.random.default_rng(3)
    dim = 24
    clean0 = rng.normal(0, 1, (200, dim))
    planted = rng.normal(0, 1, (30, dim)) + 5.0
    clean1 = rng.normal(10, 1, (230, dim))                    # a unimodal class: nothing to drop
    x = np.concatenate([clean0, planted, clean1]).astype(np.float32)
    y = np.repeat([0, 1], 230)
    sel = make_policy("activation_clustering").select(x, y)
    assert set(sel.dropped.tolist()) == set(range(200, 230))
    info = sel.info["per_class"]
    assert info[0]["smaller_fraction"] == pytest.approx(30 / 230)
    assert info[1]["smaller_fraction"] >= 0.35


def test_baselines_reject_bad_options():
    with pytest.raises(ValueError, match="k must be"):
        make_policy("deep_knn", k=0)
    with pytest.raises(ValueError, match="budget"):
        make_policy("spectral", budget=0)
    with pytest.raises(ValueError, match="threshold"):
        make_policy("activation_clustering", threshold=0.9)
