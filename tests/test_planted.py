"""The shared integration fixture (`tests/planted.py`) keeps the promises the integration tests rely on."""

import numpy as np
import torch
from planted import DIM, NUM_CLASSES, planted_blobs, planted_dataset, tiny_mlp, weights

from sanitizer import select


def test_planted_points_are_mislabelled_and_isolated_in_their_claimed_class():
    images, labels, planted = planted_blobs(per_class=100, planted_per_class=2, seed=0)
    assert images.shape == (3 * 100, 1, 2, 4) and len(planted) == 2 * NUM_CLASSES
    x = images.view(len(images), DIM).numpy()
    y = labels.numpy()
    true = np.repeat(np.arange(NUM_CLASSES), 100)
    assert np.array_equal(np.flatnonzero(y != true), planted)  # exactly the planted points changed label
    means = np.stack([x[(y == c) & (true == c)].mean(0) for c in range(NUM_CLASSES)])
    dist_claimed = np.linalg.norm(x - means[y], axis=1)
    assert dist_claimed[planted].min() > 2 * np.percentile(dist_claimed[np.setdiff1d(np.arange(len(y)), planted)], 99)


def test_density_on_the_raw_inputs_drops_every_planted_point_and_few_others():
    data, planted = planted_dataset(per_class=100, planted_per_class=2, seed=0)
    sel = select(data.images.flatten(1).numpy(), data.labels.numpy(), policy="density")
    dropped = np.flatnonzero(~sel.keep)
    assert set(planted) <= set(dropped)
    assert len(dropped) - len(planted) <= NUM_CLASSES  # at most one clean point per class


def test_tiny_mlp_is_seeded_and_weights_are_detached_copies():
    a, b = tiny_mlp(seed=1), tiny_mlp(seed=1)
    wa = weights(a)
    assert all(torch.equal(wa[k], v) for k, v in weights(b).items())
    next(a.parameters()).data.add_(1.0)
    assert not torch.equal(wa["1.weight"], a.state_dict()["1.weight"])  # the copy did not move
