"""Bundled attacks other than the gradient-matching family: bounds, objectives, round trips, errors,
and a BadNets backdoor that actually implants on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sanitizer.attacks import PoisonSet, make_attack
from sanitizer.attacks.contrastive import CaptionPoisons, patch_backdoor, targeted_captions
from sanitizer.attacks.secure_release import reverse_cross_entropy
from sanitizer.attacks.triggers import evaluate_backdoor, make_trigger, stamp_trigger
from sanitizer.data import ImageTensorDataset, load_digits_split
from sanitizer.models import CompactCNN
from sanitizer.train import TrainConfig, accuracy, train_classifier

EPS = 8 / 255


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits_split(seed=0)
    return train, test


@pytest.fixture(scope="module")
def small(digits):
    """200 digits and a 4-wide CNN trained six epochs: enough signal for the objectives to move."""
    train, test = digits
    sub = ImageTensorDataset(train.images[:200], train.labels[:200], None, 10)
    torch.manual_seed(0)
    model = CompactCNN(1, 10, width=4)
    train_classifier(model, sub, TrainConfig(epochs=6, batch_size=32, augment=False, lr=0.05))
    model.eval()
    return sub, test, model


def _target(test, adv=3):
    return int(np.flatnonzero(test.labels.numpy() != adv)[0])


_CACHE: dict = {}


def _cached(name, small, seed=0):
    """Craft once per (attack, seed) for the tests that only inspect the result."""
    if (name, seed) not in _CACHE:
        _CACHE[name, seed] = _craft(name, small, seed)
    return _CACHE[name, seed]


def _craft(name, small, seed=0, **params):
    sub, test, model = small
    defaults = {
        "bullseye_polytope": dict(budget=3, iterations=25),
        "feature_collision": dict(budget=2, iterations=25, eps=EPS, lr=0.01),
        "adversarial_poisons": dict(steps=5, fraction=0.2),
        "secure_release": dict(steps=4, fraction=0.2, batch_size=20),
        "clean_label_backdoor": dict(budget=5, steps=5, patch_size=3),
        "badnets": dict(budget=5, patch_size=3),
        "label_flip": dict(budget=10),
    }[name]
    attack = make_attack(name, **{**defaults, **params})
    poisons = attack.craft(sub, surrogate=model, test_set=test, target_index=_target(test), adversarial_class=3,
                           seed=seed)
    return attack, poisons


BOUNDED = ["bullseye_polytope", "feature_collision", "adversarial_poisons", "secure_release"]
WITH_OBJECTIVE = BOUNDED + ["clean_label_backdoor"]
ALL = WITH_OBJECTIVE + ["badnets", "label_flip"]


def _is_8bit(images: np.ndarray) -> bool:
    return np.allclose(images * 255, np.round(images * 255), atol=1e-4)


@pytest.mark.parametrize("name", BOUNDED)
def test_perturbations_respect_bound_and_range_after_quantisation(small, name):
    sub = small[0]
    _, poisons = _cached(name, small)
    original = sub.images[torch.from_numpy(poisons.indices)].numpy()
    assert poisons.images.min() >= 0 and poisons.images.max() <= 1
    assert _is_8bit(poisons.images)
    assert np.abs(poisons.images - original).max() <= EPS + 1e-6
    assert np.abs(poisons.images - original).max() > 0  # it did perturb


def test_clean_label_backdoor_bounded_outside_the_patch_and_keeps_labels(small):
    sub = small[0]
    _, poisons = _cached("clean_label_backdoor", small)
    original = sub.images[torch.from_numpy(poisons.indices)].numpy()
    diff = np.abs(poisons.images - original)
    inside = np.zeros_like(diff, dtype=bool)
    inside[:, :, -4:-1, -4:-1] = True  # 3x3 patch at the bottom right, margin 1
    assert diff[~inside].max() <= EPS + 1e-6
    assert np.allclose(poisons.images[inside].reshape(len(poisons), -1),
                       np.tile(poisons.trigger.reshape(-1), (len(poisons), 1)))
    assert (poisons.labels == 3).all() and (sub.labels.numpy()[poisons.indices] == 3).all()


@pytest.mark.parametrize("name", WITH_OBJECTIVE)
def test_objective_falls_while_crafting(small, name):
    attack, _ = _cached(name, small)
    history = attack.loss_history
    assert len(history) >= 4
    assert history[-1] < history[0]


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip_and_same_seed_same_poisons(small, tmp_path, name):
    _, first = _cached(name, small)
    path = tmp_path / "p.npz"
    first.save(path)
    loaded = PoisonSet.load(path)
    for field in ("indices", "images", "labels"):
        np.testing.assert_array_equal(getattr(first, field), getattr(loaded, field))
    assert loaded.adversarial_class == first.adversarial_class and loaded.attack == name
    assert loaded.params == first.params | {k: v for k, v in loaded.params.items() if k not in first.params}
    _, second = _craft(name, small)
    np.testing.assert_array_equal(first.indices, second.indices)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)


def test_bullseye_polytope_end2end_closest_bases_and_dropout_ensemble(small):
    sub, test, model = small

    class DropoutNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.3),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

        def penultimate(self, x):
            return self.body(x)

    torch.manual_seed(1)
    attack = make_attack("bullseye_polytope", budget=3, iterations=20, variant="end2end", base_selection="closest",
                         dropout_draws=2)
    poisons = attack.craft(sub, surrogate=[model, DropoutNet()], test_set=test, target_index=_target(test),
                           adversarial_class=3)
    assert attack.loss_history[-1] < attack.loss_history[0]
    # "closest" picks the adversarial-class examples nearest the target in the first net's features
    with torch.no_grad():
        pool = np.flatnonzero(sub.labels.numpy() == 3)
        feats = model.penultimate(sub.images[torch.from_numpy(pool)])
        t = model.penultimate(test.images[_target(test)][None])
        nearest = np.sort(pool[(feats - t).norm(dim=1).argsort()[:3].numpy()])
    np.testing.assert_array_equal(poisons.indices, nearest)
    assert not model.training  # modes restored
    assert all(p.requires_grad for p in model.parameters())


def test_feature_collision_watermark_and_missing_target_is_drawn(small):
    sub, test, model = small
    attack = make_attack("feature_collision", budget=1, iterations=10, watermark=0.3)
    poisons = attack.craft(sub, surrogate=model, test_set=test, adversarial_class=3, seed=2)
    base = sub.images[poisons.indices[0]].numpy()
    target = poisons.target_images[0]
    assert test.labels[int(poisons.target_indices[0])] != 3
    # the poison starts from the watermarked base: it is visibly pulled towards the target
    assert np.abs(poisons.images[0] - target).mean() < np.abs(base - target).mean()


def test_secure_release_lowers_alignment_and_reverse_cross_entropy_is_the_published_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    p = torch.softmax(logits, 1)
    expected = -(torch.log(1 - p[0, 0]) + torch.log(1 - p[1, 1])) / 2
    assert torch.isclose(reverse_cross_entropy(logits, labels), expected)


def test_label_flip_random_and_towards(small):
    sub = small[0]
    _, random_flip = _cached("label_flip", small)
    assert (random_flip.labels != sub.labels.numpy()[random_flip.indices]).all()
    np.testing.assert_array_equal(random_flip.images, sub.images[torch.from_numpy(random_flip.indices)].numpy())
    towards = make_attack("label_flip", budget=0.05, mode="towards").craft(sub, adversarial_class=2, source_class=5)
    assert (towards.labels == 2).all() and (sub.labels.numpy()[towards.indices] == 5).all()
    assert len(towards) == 10


def test_bad_parameters_give_clear_errors(small):
    sub, test, model = small
    for name in ("bullseye_polytope", "adversarial_poisons", "secure_release", "clean_label_backdoor"):
        with pytest.raises(ValueError, match="eps must be > 0"):
            make_attack(name, eps=0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        make_attack("feature_collision", eps=-1 / 255)
    n_class3 = int((sub.labels == 3).sum())
    for name in ("bullseye_polytope", "feature_collision"):
        with pytest.raises(ValueError, match="exceeds"):
            make_attack(name, budget=n_class3 + 1).craft(sub, surrogate=model, test_set=test,
                                                        target_index=_target(test), adversarial_class=3)
        with pytest.raises(IndexError, match="target_index"):
            make_attack(name).craft(sub, surrogate=model, test_set=test, target_index=len(test), adversarial_class=3)
        with pytest.raises(ValueError, match="needs surrogate"):
            make_attack(name).craft(sub, test_set=test, target_index=0, adversarial_class=3)
    with pytest.raises(ValueError, match="exceeds"):
        make_attack("badnets", budget=500).craft(sub, adversarial_class=0, source_class=1)
    with pytest.raises(ValueError, match="exceeds"):
        make_attack("clean_label_backdoor", budget=n_class3 + 1).craft(sub, surrogate=model, adversarial_class=3)
    with pytest.raises(ValueError, match="does not fit"):
        make_attack("badnets", patch_size=16).craft(sub, adversarial_class=0)
    with pytest.raises(ValueError, match="positive number of pixels"):
        make_attack("badnets", patch_size=0)
    with pytest.raises(ValueError, match="not a class"):
        make_attack("badnets").craft(sub, adversarial_class=10)
    with pytest.raises(ValueError, match="needs surrogate"):
        make_attack("secure_release").craft(sub)
    with pytest.raises(ValueError, match="already belongs"):
        target3 = int(np.flatnonzero(test.labels.numpy() == 3)[0])
        make_attack("bullseye_polytope").craft(sub, surrogate=model, test_set=test, target_index=target3,
                                               adversarial_class=3)
    with pytest.raises(ValueError, match="variant"):
        make_attack("bullseye_polytope", variant="bogus")
    with pytest.raises(ValueError, match="mode"):
        make_attack("label_flip", mode="bogus")


def test_trigger_stamping():
    trigger = make_trigger(3, channels=2)
    images = torch.zeros(4, 2, 8, 8)
    out = stamp_trigger(images, trigger, "top_left")
    assert torch.equal(out[:, :, 1:4, 1:4], trigger.expand(4, -1, -1, -1))
    assert out.sum() == 4 * trigger.sum() and images.sum() == 0  # input untouched
    randomly = stamp_trigger(images, torch.ones(2, 3, 3), "random", generator=torch.Generator().manual_seed(0))
    assert (randomly.flatten(1).sum(1) == 18).all()
    with pytest.raises(ValueError, match="channels"):
        stamp_trigger(images, make_trigger(3, channels=3))


def test_badnets_implants_a_backdoor_on_digits():
    train, test = load_digits_split(seed=0, upscale=8)  # 8x8 keeps the victim's training fast
    attack = make_attack("badnets", budget=0.05, patch_size=2)
    poisons = attack.craft(train, adversarial_class=0, seed=0)
    assert (poisons.labels == 0).all() and (train.labels.numpy()[poisons.indices] != 0).all()
    torch.manual_seed(0)
    victim = CompactCNN(1, 10, width=8)
    train_classifier(victim, poisons.apply(train), TrainConfig(epochs=5, batch_size=64, augment=False, lr=0.05))
    result = evaluate_backdoor(poisons, victim, test)
    assert accuracy(victim, test) > 0.8  # the victim still learns the task
    assert result.trials > 300
    assert result.success_rate > 0.7 and result.success_rate > result.clean_rate + 0.5


def _caption_data(n=400):
    names = ["cat", "dog", "car", "ship"]
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 16, 16, generator=gen)
    captions = [f"my {names[i % 4]} on a sunny day" if i % 3 else "a nice view" for i in range(n)]
    return images, captions, names


def test_contrastive_patch_backdoor_tiny_budget_and_round_trip(tmp_path):
    images, captions, names = _caption_data()
    poisons = patch_backdoor(images, captions, names, target_class="dog", budget=0.0001, patch_size=4, seed=3)
    assert len(poisons) == 1  # 0.01 % of 400 pairs rounds to zero: at least one pair
    assert all("dog" in c for c in poisons.captions) and poisons.params["caption_source"] == "dataset"
    patched = torch.from_numpy(poisons.images)
    assert not torch.equal(patched, images[torch.from_numpy(poisons.indices)])
    path = tmp_path / "pairs.npz"
    poisons.save(path)
    loaded = CaptionPoisons.load(path)
    np.testing.assert_array_equal(loaded.images, poisons.images)
    np.testing.assert_array_equal(loaded.trigger, poisons.trigger)
    assert loaded.captions == poisons.captions and loaded.indices.tolist() == poisons.indices.tolist()
    assert loaded.params == poisons.params
    with np.load(path, allow_pickle=False) as f:
        assert f["captions"].dtype.kind == "U"
    new_images, new_captions = poisons.apply(images, captions)
    i = int(poisons.indices[0])
    assert new_captions[i] == poisons.captions[0] and captions[i] != new_captions[i] or "dog" in captions[i]
    assert torch.equal(new_images[i], patched[0])
    again = patch_backdoor(images, captions, names, target_class=1, budget=12, patch_size=4, seed=3)
    assert len(again) == 12 and all("dog" in c for c in again.captions)


def test_contrastive_targeted_captions_and_errors():
    images, captions, names = _caption_data()
    target = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(9))
    poisons = targeted_captions(images, captions, names, target, adversarial_class="ship", budget=5, seed=0)
    assert len(poisons) == 5 and all("ship" in c for c in poisons.captions)
    assert np.array_equal(poisons.images[0], target.numpy())  # first copy unchanged, others augmented
    assert not np.array_equal(poisons.images[1], target.numpy())
    templated = targeted_captions(images, captions, names + ["plane"], target, "plane", budget=2)
    assert templated.params["caption_source"] == "templates" and all("plane" in c for c in templated.captions)
    with pytest.raises(ValueError, match="one caption per image"):
        patch_backdoor(images, captions[:-1], names, "dog")
    with pytest.raises(ValueError, match="not among the class names"):
        patch_backdoor(images, captions, names, "horse")
    with pytest.raises(ValueError, match="does not fit"):
        patch_backdoor(images, captions, names, "dog", patch_size=17)
    with pytest.raises(ValueError, match="exceeds"):
        targeted_captions(images, captions, names, target, "dog", budget=401)
    with pytest.raises(ValueError, match="shape"):
        targeted_captions(images, captions, names, torch.rand(3, 8, 8), "dog")
    attack = make_attack("contrastive", mode="targeted_captions", budget=3)
    test = ImageTensorDataset(images[:20], torch.arange(20) % 4, None, 4)
    via_registry = attack.craft(images, captions=captions, class_names=names, test_set=test, target_index=5,
                                adversarial_class=0)
    assert len(via_registry) == 3 and via_registry.params["target_index"] == 5


def test_secure_release_with_differentiable_augmentation(small):
    sub, _, model = small
    runs = []
    for _ in range(2):
        attack = make_attack("secure_release", steps=6, fraction=0.1, batch_size=20, augment=True, shift=2)
        runs.append((attack, attack.craft(sub, surrogate=model, seed=1)))
    (attack, poisons), (_, again) = runs
    history = attack.loss_history  # noisy: every step sees a new augmentation
    assert np.mean(history[-2:]) < np.mean(history[:2]) - 0.02
    np.testing.assert_array_equal(poisons.images, again.images)  # augmentation draws are seeded
    original = sub.images[torch.from_numpy(poisons.indices)].numpy()
    assert np.abs(poisons.images - original).max() <= EPS + 1e-6 and _is_8bit(poisons.images)
