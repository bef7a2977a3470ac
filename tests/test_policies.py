import math
import warnings

import numpy as np
import pytest
import torch

from sanitizer import make_policy, select
from sanitizer.errors import SanitizerError
from sanitizer.neighbors import class_isolation, knn, principal_deviation, robust_zscore
from sanitizer.policies.density import CLOSED_CLASS_FACTOR
from sanitizer.policies.epic import facility_location_medoids


def blobs_with_outliers(n_per_class=300, dim=8, outliers=5, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys, planted = [], [], []
    for c in range(3):
        center = rng.normal(0, 10, dim)
        xs.append(center + rng.normal(0, 1, (n_per_class, dim)))
        ys.append(np.full(n_per_class, c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    for c in range(3):
        idx = rng.choice(np.flatnonzero(y == c), outliers, replace=False)
        x[idx] += rng.normal(0, 1, (outliers, dim)) * 0 + rng.choice([-1, 1], (outliers, dim)) * 6
        planted.extend(idx)
    return x.astype(np.float32), y, np.sort(planted)


def test_knn_matches_brute_force_and_excludes_self():
    x = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    dist, idx = knn(x, 7, backend="faiss")
    full = np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(dist, np.sort(full, 1)[:, :7], rtol=1e-4, atol=1e-4)
    assert not (idx == np.arange(200)[:, None]).any()
    dist_t, _ = knn(x, 7, backend="torch")
    np.testing.assert_allclose(dist_t, dist, rtol=1e-3, atol=1e-3)


def test_ivf_path_is_close_to_exact():
    x = np.random.default_rng(1).normal(size=(3000, 16)).astype(np.float32)
    exact, _ = knn(x, 10, backend="faiss")
    approx, _ = knn(x, 10, backend="faiss", ivf_threshold=1000, nprobe=32)
    # Approximate search can only overestimate distances; the mean relative error must be small.
    assert (approx >= exact - 1e-4).all()
    assert np.mean(approx.mean(1) / exact.mean(1) - 1) < 0.02


def test_density_finds_planted_isolated_points():
    x, y, planted = blobs_with_outliers()
    sel = select(x, y, policy="density")
    dropped = np.flatnonzero(~sel.keep)
    assert set(planted) <= set(dropped)
    assert len(dropped) <= len(planted) + 3  # few false positives
    # The planted points carry the highest scores of their class.
    assert np.all(sel.scores[planted] > np.percentile(sel.scores, 95))


def test_principal_deviation_follows_the_top_singular_vector():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 12)) * np.r_[3.0, 2.0, np.ones(10)]  # a clear top direction
    c = x - x.mean(0)
    proj = c @ np.linalg.svd(c, full_matrices=False)[2][0]
    expected = np.abs(proj - np.median(proj))
    np.testing.assert_allclose(principal_deviation(x), expected, rtol=1e-6, atol=1e-8)
    assert not principal_deviation(np.ones((10, 4))).any()  # identical rows: no direction


def tight_group_in_one_class(seed=0, n=300, group=30, dim=16):
    """A class of n Gaussian points plus a tight group that moved together along one direction."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + group, dim))
    x[n:] = 3.0 * np.eye(dim)[0] + 0.1 * rng.normal(size=(group, dim))
    return x.astype(np.float32), np.zeros(n + group, dtype=int), np.arange(n, n + group)


def test_spectral_term_finds_a_tight_group_that_knn_isolation_misses():
    x, y, group = tight_group_in_one_class()
    options = dict(k=10, threshold=2.0, max_fraction=0.2, two_sided=False)
    plain = select(x, y, policy="density", **options)
    spectral = select(x, y, policy="density", spectral=True, **options)
    caught = lambda sel: np.isin(group, np.flatnonzero(~sel.keep)).mean()  # noqa: E731
    assert caught(plain) <= 0.2  # the group's members are each other's nearest neighbours
    assert caught(spectral) >= 0.9
    assert (~spectral.keep).sum() <= 0.2 * len(x) + 1  # the cap still holds
    assert np.all(spectral.scores >= plain.scores - 1e-9)  # the larger of the two scores


def test_density_cap_limits_drops_per_class():
    x, y, planted = blobs_with_outliers(outliers=30)
    sel = select(x, y, policy="density", max_fraction=0.02, threshold=1.0)
    for c in range(3):
        assert (~sel.keep[y == c]).sum() <= math.floor(0.02 * (y == c).sum())


def test_duplicates_count_once():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    x[:10] = 20.0  # ten identical far-away copies: they must not vouch for each other
    with pytest.warns(UserWarning, match="duplicate"):
        iso = class_isolation(x, k=5)
    assert np.all(iso[:10] > np.percentile(iso[10:], 99))
    assert len(set(iso[:10])) == 1


def test_robust_zscore_handles_constant_input():
    assert np.all(robust_zscore(np.ones(10)) == 0)


def test_small_classes_are_kept_with_a_warning():
    x = np.random.default_rng(0).normal(size=(52, 3)).astype(np.float32)
    y = np.zeros(52, dtype=int)
    y[-2:] = 1  # class 1 has two examples
    with pytest.warns(UserWarning, match="fewer than"):
        sel = select(x, y, policy="density")
    assert sel.keep[-2:].all()
    # a class smaller than k+1 uses k = n_c - 1 instead of failing
    y[-5:] = 1
    sel = select(x, y, policy="density", k=10)
    assert sel.scores.shape == (52,)


def test_bad_inputs():
    x = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(SanitizerError, match="out of range"):
        select(x, [0, 1, 2, 5], num_classes=3)
    with pytest.raises(SanitizerError, match="NaN"):
        select(np.array([[np.nan, 0]] * 4, dtype=np.float32), [0, 0, 1, 1])
    with pytest.raises(SanitizerError, match="match"):
        select(x, [0, 1])
    with pytest.raises(SanitizerError, match="unknown policy"):
        select(x, [0, 0, 1, 1], policy="nope")
    with pytest.raises(SanitizerError, match="shape"):
        select(np.zeros(4), [0, 0, 1, 1])


def brute_force_greedy(x, budget):
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    s = np.exp(-d / x.shape[1])
    covered, chosen = np.zeros(len(x)), []
    for _ in range(budget):
        gains = np.maximum(s - covered[:, None], 0).sum(0)
        gains[chosen] = -1
        j = int(np.argmax(gains))
        chosen.append(j)
        covered = np.maximum(covered, s[:, j])
    owner = np.argmax(s[:, chosen], axis=1)
    return np.array(chosen), owner


def test_lazy_facility_location_equals_dense_greedy():
    x = np.random.default_rng(3).normal(size=(150, 4))
    medoids, owner = facility_location_medoids(x, 20, block=32)
    ref_medoids, ref_owner = brute_force_greedy(x, 20)
    np.testing.assert_array_equal(medoids, ref_medoids)
    np.testing.assert_array_equal(owner, ref_owner)


def test_epic_drops_singleton_medoids():
    x, y, planted = blobs_with_outliers(outliers=3)
    sel = select(x, y, policy="epic-0.1")
    dropped = set(np.flatnonzero(~sel.keep))
    assert set(planted) <= dropped
    policy = make_policy("epic", fraction=0.2)
    assert policy.fraction == 0.2 and policy.embedding == "logits"


def test_random_and_none():
    x = torch.zeros(100, 2)
    y = torch.zeros(100, dtype=torch.long)
    assert select(x, y, policy="none").keep.all()
    a = select(x, y, policy="random", count=7, seed=1)
    b = select(x, y, policy="random", count=7, seed=1)
    assert (~a.keep).sum() == 7
    np.testing.assert_array_equal(a.keep, b.keep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SanitizerError):
            select(x, y, policy="random", nonsense=1)


def test_two_sided_density_flags_a_tight_group_of_near_duplicates():
    # 300 Gaussian points of one class and 30 near-copies of one point: isolation alone cannot see
    # them (each has 29 close neighbours); the dense side of the default score does.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(330, 16)).astype(np.float32)
    x[300:] = x[0] + 0.001 * rng.normal(size=(30, 16))
    y = np.zeros(330, dtype=int)
    group = np.arange(300, 330)
    default = select(x, y, policy="density", two_sided=True, max_fraction=0.2)
    isolation_only = select(x, y, policy="density")  # the default: isolation only
    assert np.isin(group, default.dropped).mean() >= 0.9
    assert np.isin(group, isolation_only.dropped).mean() == 0.0
    assert len(np.setdiff1d(default.dropped, np.r_[group, 0])) <= 0.02 * 300  # few clean ones
    assert default.info["per_class"][0]["too_dense"] >= 27


def test_a_class_of_uniformly_easy_examples_is_not_emptied():
    # Every example equally easy (the same tiny spread): no tail is abnormal, little is dropped.
    rng = np.random.default_rng(1)
    x = (1e-4 * rng.normal(size=(500, 8))).astype(np.float32)
    sel = select(x, np.zeros(500, dtype=int), policy="density", two_sided=True, max_fraction=0.2)
    assert (~sel.keep).sum() <= 0.02 * 500


def test_dense_side_acts_in_the_first_rounds_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(330, 16)).astype(np.float32)
    x[300:] = x[0] + 0.001 * rng.normal(size=(30, 16))
    y = np.zeros(330, dtype=int)
    policy = make_policy("density", two_sided=True, max_fraction=0.2)  # dense_rounds=1
    policy.start_round(0)
    assert np.isin(np.arange(300, 330), policy.select(x, y).dropped).all()
    policy.start_round(1)
    assert not np.isin(np.arange(300, 330), policy.select(x, y).dropped).any()
    always = make_policy("density", two_sided=True, dense_rounds=None, max_fraction=0.2)
    always.start_round(5)
    assert np.isin(np.arange(300, 330), always.select(x, y).dropped).all()


def test_a_policy_spec_carries_its_options():
    policy = make_policy("density:k=7:two_sided=true:threshold=2.5")
    assert (policy.k, policy.two_sided, policy.threshold) == (7, True, 2.5)
    assert make_policy("epic:fraction=0.3").fraction == 0.3
    assert make_policy("epic-0.2").fraction == 0.2
    with pytest.raises(SanitizerError, match="both"):
        make_policy("density:k=7", k=9)
    with pytest.raises(SanitizerError, match="KEY=VALUE"):
        make_policy("density:k")
    with pytest.raises(SanitizerError, match="bad options"):
        make_policy("density:nosuch=1")


def test_the_isolation_gate_keeps_a_class_with_a_group_of_isolated_points_and_withdraws_natural_tails():
    rng = np.random.default_rng(3)
    y = np.arange(4000) % 8
    x = rng.standard_t(df=4, size=(4000, 6)).astype(np.float32)  # heavy tails: every class has isolated points
    planted = np.flatnonzero(y == 2)[:40]
    x[planted] += rng.normal(0, 12, size=(40, 6)).astype(np.float32)  # 8 % of class 2, each far from the rest
    plain = make_policy("density", isolation_gate=False).select(x, y, num_classes=8)
    gated = make_policy("density").select(x, y, num_classes=8)  # the gate is the default
    assert gated.info["isolation_gate"]["open_classes"] == [2]
    dropped_plain, dropped_gated = set(np.flatnonzero(~plain.keep)), set(np.flatnonzero(~gated.keep))
    # the open class keeps every drop; closed classes only their gross outliers (past 2x the threshold)
    gross = plain.scores > CLOSED_CLASS_FACTOR * 3.0
    assert dropped_gated == {i for i in dropped_plain if y[i] == 2 or gross[i]}
    assert any(y[i] != 2 for i in dropped_gated)  # heavy tails do have a few gross outliers
    assert len(dropped_plain - dropped_gated) == gated.info["isolation_gate"]["withdrawn"] > 0
    assert len(dropped_gated & set(planted)) >= 0.9 * min(len(planted), math.floor(0.05 * 500))
    np.testing.assert_array_equal(gated.scores, plain.scores)


def test_a_policy_whose_start_round_takes_only_the_index_still_runs_in_a_sanitizer():
    """Policies written before the Sanitizer passed the round's candidates to ``start_round`` keep working."""
    from planted import planted_dataset, tiny_mlp

    from sanitizer import Sanitizer
    from sanitizer.policies import Policy

    class OldStyle(Policy):
        name = "old-style"

        def start_round(self, index):
            self.rounds = [*getattr(self, "rounds", []), index]

        def select_class(self, x, label, seed):
            return np.zeros(0, dtype=np.int64), np.zeros(len(x)), {}

    data, _ = planted_dataset()
    policy = OldStyle()
    sanitizer = Sanitizer(tiny_mlp(), data, policy=policy, warmup=0, every=1, verbose=False)
    sanitizer.run_round(0)
    sanitizer.run_round(1)
    assert policy.rounds == [0, 1]
