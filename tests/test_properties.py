"""Property-based tests (hypothesis): every registered policy on small random inputs, and the Sanitizer's
state_dict round trip. Small examples and few of them, so the file runs in seconds."""

from __future__ import annotations

import importlib.util
import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits
from torch import nn

from sanitizer import Sanitizer
from sanitizer.data import ImageTensorDataset
from sanitizer.policies import available_policies, make_policy, select
from sanitizer.policies.base import Policy

NEEDS = {"cleanlab": "cleanlab"}  # policies that need an optional package
POLICIES = [p for p in available_policies() if p not in NEEDS or importlib.util.find_spec(NEEDS[p]) is not None]
OPTIONS = {"random": {"fraction": 0.2}, "deep_knn": {"k": 3}, "activation_clustering": {"n_init": 1},
           "density": {"k": 3}}
# Policies that decide class by class (Policy.select): a class's decision depends on that class alone.
PER_CLASS = [p for p in POLICIES if type(make_policy(p, **OPTIONS.get(p, {}))).select is Policy.select]
# Controls that ignore classes altogether: a tiny class is no reason for them to keep anything.
CLASS_BLIND = {"random", "none"}

FAST = settings(max_examples=10, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """k-means and BLAS on tiny inputs are ~10x slower with a thread pool than without one."""
    with threadpool_limits(1):
        yield


@st.composite
def labelled_embeddings(draw, min_size=1, duplicates=False):
    """``(x [N, D] float, y [N] int)``: 1-3 classes, 1-12 examples each, coordinates from a small grid
    (so exact duplicates and ties are common) or arbitrary moderate floats."""
    sizes = draw(st.lists(st.integers(min_size, 12), min_size=1, max_size=3))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    dim = draw(st.integers(1, 4))
    if duplicates or draw(st.booleans()):
        grid = st.sampled_from([-1.0, 0.0, 0.5, 2.0])
    else:
        grid = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    x = np.array(draw(st.lists(st.lists(grid, min_size=dim, max_size=dim), min_size=len(labels),
                               max_size=len(labels))), dtype=np.float64)
    order = np.random.default_rng(draw(st.integers(0, 2**16))).permutation(len(labels))
    return x[order], labels[order]


def _select(policy, x, y, seed=0, num_classes=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny classes, k-means on duplicates: warnings are expected here
        return select(x, y, policy=policy, seed=seed, num_classes=num_classes, **OPTIONS.get(policy, {}))


@pytest.mark.parametrize("policy", POLICIES)
@FAST
@given(data=labelled_embeddings(), seed=st.integers(0, 2**31 - 1))
def test_every_policy_returns_a_well_formed_selection(policy, data, seed):
    x, y = data
    sel = _select(policy, x, y, seed)
    assert sel.keep.dtype == bool and sel.keep.shape == (len(y),)
    assert sel.scores.shape == (len(y),) and np.isfinite(sel.scores).all()
    assert set(y[~sel.keep]) <= set(y)
    if policy != "random":
        assert sel.keep.any(), "a policy dropped every example"


@pytest.mark.parametrize("policy", POLICIES)
@FAST
@given(data=labelled_embeddings(duplicates=True))
def test_duplicate_rows_do_not_crash(policy, data):
    x, y = data
    x = np.concatenate([x, x])  # every row twice
    y = np.concatenate([y, y])
    sel = _select(policy, x, y)
    assert sel.keep.shape == (len(y),) and np.isfinite(sel.scores).all()


@pytest.mark.parametrize("policy", PER_CLASS)
@FAST
@given(data=labelled_embeddings(min_size=3), seed=st.integers(0, 2**31 - 1))
def test_per_class_policies_decide_each_class_from_that_class_alone(policy, data, seed):
    x, y = data
    whole = _select(policy, x, y, seed)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        alone = _select(policy, x[members], y[members], seed)
        np.testing.assert_array_equal(alone.keep, whole.keep[members])


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - CLASS_BLIND))
@FAST
@given(data=labelled_embeddings(min_size=3))
def test_a_class_of_one_is_kept_with_a_warning(policy, data):
    x, y = data
    lone = int(y.max()) + 1
    x = np.concatenate([x, x[:1] + 100.0])  # far from everything: the most suspicious point there is
    y = np.concatenate([y, [lone]])
    with pytest.warns(UserWarning, match=f"{lone}"):
        sel = select(x, y, policy=policy, **OPTIONS.get(policy, {}))
    assert sel.keep[-1]


# ---------------------------------------------------------------- Sanitizer state round trip

def _sanitizer(seed, policy, warmup, every):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3))
    gen = torch.Generator().manual_seed(1)
    data = ImageTensorDataset(torch.rand(36, 1, 4, 4, generator=gen), torch.arange(36) % 3)
    options = {"random": {"count": 2}, "density": {"k": 3, "threshold": 1.0, "max_fraction": 0.2}}[policy]
    return Sanitizer(model, data, policy=policy, policy_options=options, warmup=warmup, every=every, seed=seed,
                     verbose=False, check=False)


@settings(max_examples=6, deadline=None, database=None)
@given(seed=st.integers(0, 2**20), policy=st.sampled_from(["random", "density"]), warmup=st.integers(0, 2),
       every=st.integers(1, 2), epochs=st.integers(1, 5))
def test_state_dict_round_trip_resumes_the_same_run(seed, policy, warmup, every, epochs):
    first = _sanitizer(seed, policy, warmup, every)
    for epoch in range(epochs):
        first.start_epoch(epoch)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = _sanitizer(seed, policy, warmup, every)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    np.testing.assert_array_equal(second.keep, first.keep)
    assert [dict(r) for r in second.history] == [dict(r) for r in first.history]
    assert second.epoch == first.epoch == epochs - 1
    for epoch in range(epochs, epochs + every):  # the next round is the one the saved run would have run
        first.start_epoch(epoch)
        second.start_epoch(epoch)
    np.testing.assert_array_equal(second.keep, first.keep)
