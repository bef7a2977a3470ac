"""The unlearn action: gradient ascent on flagged examples until the model is at chance on them."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sanitizer import Sanitizer
from sanitizer.errors import SanitizerError
from sanitizer.train import TrainConfig, train_classifier
from sanitizer.unlearn import unlearn
from tests.planted import NUM_CLASSES, planted_dataset, tiny_mlp


def _trained(model=None, planted_per_class=3):
    data, planted = planted_dataset(per_class=60, planted_per_class=planted_per_class)
    model = model or tiny_mlp()
    train_classifier(model, data, TrainConfig(epochs=30, lr=0.05, batch_size=32, augment=False,
                                              weight_decay=0.0, schedule="step"))
    return model, data, planted


def _losses(model, data):
    with torch.no_grad():
        return F.cross_entropy(model(data.images), data.labels, reduction="none").numpy()


def test_unlearn_brings_the_flagged_examples_to_chance_and_spares_other_classes():
    model, data, _ = _trained(planted_per_class=0)
    flagged = np.flatnonzero(data.labels.numpy() == 0)[::6]  # a few well-learned examples of class 0
    rest = np.flatnonzero(data.labels.numpy() != 0)  # the other classes' blobs lie far away
    before = _losses(model, data)
    assert before[flagged].mean() < 0.5 * math.log(NUM_CLASSES)  # learned: far below chance
    record = unlearn(model, data, flagged, NUM_CLASSES, lr=0.05, max_passes=50, batch_size=8)
    after = _losses(model, data)
    assert record["passes"] >= 1 and record["loss_before"] == pytest.approx(before[flagged].mean(), rel=1e-4)
    assert record["loss_after"] == pytest.approx(after[flagged].mean(), rel=1e-4)
    assert after[flagged].mean() >= math.log(NUM_CLASSES) * 0.9  # at (about) chance: the stop rule
    # the flagged examples rose far more than the other classes did
    assert after[flagged].mean() - before[flagged].mean() > 2 * (after[rest].mean() - before[rest].mean())


def test_unlearn_stops_after_max_passes_and_leaves_batchnorm_statistics_alone():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, NUM_CLASSES))
    model, data, _ = _trained(model, planted_per_class=0)
    stats = model[2].running_mean.clone()
    record = unlearn(model, data, np.arange(10), NUM_CLASSES, lr=1e-6, max_passes=2)
    assert record["passes"] == 2 and record["loss_after"] < math.log(NUM_CLASSES) * 1.5
    assert torch.equal(model[2].running_mean, stats)
    assert model.training  # the model's mode is restored


def test_unlearn_leaves_examples_the_model_never_learned_alone():
    model, data, _ = _trained(planted_per_class=0)
    wrong = np.flatnonzero(data.labels.numpy() == 0)[:5]
    relabelled = data.labels.clone()
    relabelled[wrong] = 1  # labels the model never learned: loss far above chance
    flipped = type(data)(data.images, relabelled, None, NUM_CLASSES)
    weights = [p.detach().clone() for p in model.parameters()]
    record = unlearn(model, flipped, wrong, NUM_CLASSES, lr=0.05)
    assert record["learned"] == 0 and record["passes"] == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_sanitizer_unlearn_action_records_the_ascent_and_drops_the_same_examples():
    model, data, planted = _trained()
    twin = tiny_mlp()
    twin.load_state_dict(model.state_dict())
    dropper = Sanitizer(twin, data, warmup=0, every=1, verbose=False)
    unlearner = Sanitizer(model, data, warmup=0, every=1, verbose=False, action="unlearn",
                          unlearn_options={"lr": 0.05, "max_passes": 20})
    kept_weights = [p.detach().clone() for p in twin.parameters()]
    losses = _losses(model, data)
    r_drop, r_unlearn = dropper.run_round(0), unlearner.run_round(0)
    assert r_drop["dropped_now"] == r_unlearn["dropped_now"] and len(r_drop["dropped_now"]) > 0
    assert "unlearn" not in r_drop and all(torch.equal(a, b) for a, b in zip(kept_weights, twin.parameters()))
    rec = r_unlearn["unlearn"]
    # only the dropped examples the model had learned (loss below chance) were trained towards uniform
    assert rec["examples"] == len(r_unlearn["dropped_now"])
    assert rec["learned"] == int((losses[r_unlearn["dropped_now"]] < math.log(NUM_CLASSES)).sum())
    with pytest.raises(SanitizerError, match="unknown action"):
        Sanitizer(model, data, action="purge")


def test_unlearning_one_example_with_a_retain_set_keeps_the_model():
    # Unclipped steps on a single example once wrecked a small model (digits: accuracy 0.92 -> 0.66).
    # The flagged example is a shortcut of its own (far from every blob), as a poison is.
    blobs, _ = planted_dataset(per_class=60, planted_per_class=0)
    odd = torch.full((1, 1, 2, 4), 12.0)
    data = type(blobs)(torch.cat([blobs.images, odd]), torch.cat([blobs.labels, torch.tensor([0])]), None,
                       NUM_CLASSES)
    model = tiny_mlp()
    train_classifier(model, data, TrainConfig(epochs=30, lr=0.05, batch_size=32, augment=False, weight_decay=0.0))
    flagged, rest = np.array([len(data) - 1]), np.arange(len(data) - 1)
    before = _losses(model, data)
    with torch.no_grad():
        acc_before = (model(data.images[rest]).argmax(1) == data.labels[rest]).float().mean().item()
    record = unlearn(model, data, flagged, NUM_CLASSES, retain=rest, lr=0.05, max_passes=50, batch_size=8)
    after = _losses(model, data)
    with torch.no_grad():
        acc_after = (model(data.images[rest]).argmax(1) == data.labels[rest]).float().mean().item()
    assert before[-1] < 0.5 * math.log(NUM_CLASSES) and record["learned"] == 1
    assert after[-1] > before[-1] + 0.3  # the shortcut is (partly) undone
    assert record["retain_loss_after"] is not None and acc_after >= acc_before - 0.02
