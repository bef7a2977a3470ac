"""Gradient-matching family of attacks: bounds, objective, determinism, errors, CLI (tiny CPU models)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from sanitizer.attacks import PoisonSet, make_attack
from sanitizer.attacks import command as attack_command
from sanitizer.attacks.gradient_matching import GradientMatcher, differentiable_augment
from sanitizer.data import ImageTensorDataset
from sanitizer.models import CompactCNN

EPS = 8 / 255


@pytest.fixture(scope="module")
def data():
    """Three classes of 1x8x8 images with class-dependent means; train and test splits."""
    gen = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.arange(n) % 3
        x = (torch.rand(n, 1, 8, 8, generator=gen) * 0.6 + 0.2 * y[:, None, None, None]).clamp(0, 1)
        return ImageTensorDataset(x, y, None, 3)

    return make(90), make(12)


@pytest.fixture(scope="module")
def surrogate(data):
    torch.manual_seed(0)
    model = CompactCNN(1, 3, 4)
    # A few SGD steps are enough: the attacks only need gradients, not a good model.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = data[0]
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(train.images), train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


ATTACKS = {
    "gradient_matching": dict(steps=12, restarts=2, budget=4, eps=EPS, augment=False),
    "adaptive": dict(steps=12, restarts=1, budget=4, eps=EPS, augment=False, lam=1.0, k=3),
    "sleeper_agent": dict(steps=12, budget=4, eps=EPS, augment=False, patch_size=3),
    "metapoison": dict(steps=12, budget=4, eps=EPS, augment=False, clean_batch=16, lr=0.05, kappa=20.0),
}
TARGETED = sorted(set(ATTACKS) - {"sleeper_agent"})


def craft(name, data, surrogate, seed=0, **overrides):
    train, test = data
    params = {**ATTACKS[name], **overrides}
    return make_attack(name, **params).craft(train, surrogate=surrogate, test_set=test, target_index=0,
                                             adversarial_class=1, source_class=0, seed=seed)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_bound_range_and_quantisation(name, data, surrogate):
    poisons = craft(name, data, surrogate)
    train = data[0]
    base = train.images[torch.from_numpy(poisons.indices)].numpy()
    assert np.abs(poisons.images - base).max() <= poisons.params["eps"] + 1e-6
    assert poisons.images.min() >= 0 and poisons.images.max() <= 1
    np.testing.assert_allclose(poisons.images * 255, np.round(poisons.images * 255), atol=1e-3)
    assert np.abs(poisons.images - base).max() > 0  # it did perturb


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_objective_falls(name, data, surrogate):
    overrides = {"steps": 25} if name == "metapoison" else {"steps": 25, "restarts": 1}
    poisons = craft(name, data, surrogate, **overrides)
    history = np.asarray(poisons.params["loss_history"])
    assert len(history) == 25
    assert history[-5:].mean() < history[:3].mean() - 0.05 * abs(history[:3].mean())


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_save_load_roundtrip_and_determinism(name, data, surrogate, tmp_path):
    a = craft(name, data, surrogate, seed=3)
    a.save(tmp_path / "p.npz")
    b = PoisonSet.load(tmp_path / "p.npz")
    for field in ("indices", "images", "labels", "target_images", "target_labels", "target_indices", "trigger"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or np.array_equal(x, y), field
    assert b.adversarial_class == a.adversarial_class and b.attack == a.attack
    assert b.params == a.params and b.params["seed"] == 3 and b.params["budget_count"] == len(a)
    again = craft(name, data, surrogate, seed=3)
    assert np.array_equal(again.images, a.images) and np.array_equal(again.indices, a.indices)
    other = craft(name, data, surrogate, seed=4)
    assert not np.array_equal(other.images, a.images)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_bad_parameters(name, data, surrogate):
    with pytest.raises(ValueError, match="eps must be > 0"):
        make_attack(name, eps=0.0)
    with pytest.raises(ValueError, match="exceeds"):
        craft(name, data, surrogate, budget=500)
    train, test = data
    attack = make_attack(name, **ATTACKS[name])
    if name in TARGETED:
        with pytest.raises(IndexError, match="outside test_set"):
            attack.craft(train, surrogate=surrogate, test_set=test, target_index=len(test), adversarial_class=1)
        with pytest.raises(ValueError, match="test_set"):
            attack.craft(train, surrogate=surrogate, target_index=0, adversarial_class=1)
    else:
        with pytest.raises(ValueError, match="source_class=7 is not a class"):
            attack.craft(train, surrogate=surrogate, source_class=7, adversarial_class=1)
        with pytest.raises(ValueError, match="must differ"):
            attack.craft(train, surrogate=surrogate, source_class=1, adversarial_class=1)
    with pytest.raises(ValueError, match="surrogate"):
        attack.craft(train, surrogate=None, test_set=test, target_index=0, adversarial_class=1, source_class=0)


def test_gradient_matching_poisons_come_from_the_adversarial_class(data, surrogate):
    poisons = craft("gradient_matching", data, surrogate)
    assert (poisons.labels == 1).all() and poisons.adversarial_class == 1
    assert (data[0].labels[torch.from_numpy(poisons.indices)] == 1).all()
    assert poisons.target_indices.tolist() == [0]


def test_fractional_budget_and_random_target(data, surrogate):
    train, test = data
    poisons = make_attack("gradient_matching", steps=2, restarts=1, budget=0.05).craft(
        train, surrogate=surrogate, test_set=test, seed=1)
    assert len(poisons) == round(0.05 * len(train))
    assert poisons.adversarial_class != int(poisons.target_labels[0])


def test_matching_uses_only_trainable_parameters(data, surrogate):
    """Transfer setting: a frozen feature extractor plus a linear head; gradients are matched on the head."""
    import copy

    model = copy.deepcopy(surrogate)
    for p in model.features.parameters():
        p.requires_grad_(False)
    matcher = GradientMatcher([model], data[1].images[:1], torch.tensor([1]))
    assert [t.shape for t in matcher.target[0]] == [p.shape for p in model.classifier.parameters()]
    poisons = craft("gradient_matching", data, model, steps=10, restarts=1)
    assert poisons.params["loss_history"][-1] < poisons.params["loss_history"][0]
    assert len(craft("metapoison", data, model, steps=3)) == 4  # unrolls only the head
    assert all(p.grad is None for p in model.parameters())  # crafting leaves no gradients behind


def test_ensemble_and_matcher_loss_is_a_cosine_distance(data, surrogate):
    x = data[0].images[data[0].labels == 1][:4]
    matcher = GradientMatcher([surrogate, surrogate], data[1].images[:1], torch.tensor([1]))
    loss = float(matcher.loss(x, torch.ones(4, dtype=torch.long)).detach())
    assert 0 <= loss <= 2
    same = GradientMatcher([surrogate], x, torch.ones(4, dtype=torch.long))
    assert float(same.loss(x, torch.ones(4, dtype=torch.long)).detach()) == pytest.approx(0, abs=1e-5)


def test_differentiable_augment_moves_pixels_and_passes_gradients():
    x = torch.rand(5, 1, 6, 6, requires_grad=True)
    out = differentiable_augment(x, 2, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _cli(argv):
    parser = argparse.ArgumentParser()
    attack_command.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_lists_and_crafts(tmp_path, capsys):
    assert _cli(["attack", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "gradient_matching" in listing and "targeted" in listing
    out = tmp_path / "p.npz"
    code = _cli(["attack", "gradient_matching", "--data", "digits", "--out", str(out), "--width", "4",
                 "--surrogate-epochs", "1", "--budget", "3", "--eps", "16/255", "--target-index", "2",
                 "--adversarial-class", "0", "--param", "steps=2", "--param", "restarts=1"])
    assert code == 0
    poisons = PoisonSet.load(out)
    assert len(poisons) == 3 and poisons.adversarial_class == 0 and poisons.params["steps"] == 2
    assert poisons.params["eps"] == pytest.approx(16 / 255)


def test_cli_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit):
        _cli(["attack", "gradient_matching", "--data", "digits", "--out", str(tmp_path / "p.npz"), "--eps", "16"])
    with pytest.raises(SystemExit, match="does not take"):
        _cli(["attack", "gradient_matching", "--data", "digits", "--out", str(tmp_path / "p.npz"),
              "--param", "nonsense=1"])
    weights = tmp_path / "w.pt"
    torch.save(CompactCNN(1, 10, 4).state_dict(), weights)
    with pytest.raises(SystemExit, match="does not fit"):
        _cli(["attack", "gradient_matching", "--data", "digits", "--out", str(tmp_path / "p.npz"),
              "--surrogate-weights", str(weights), "--width", "8"])


@pytest.mark.parametrize("embedding", ["last_layer", "features"])
def test_adaptive_pulls_poison_embeddings_towards_their_class(data, surrogate, embedding):
    plain = craft("adaptive", data, surrogate, lam=0.0, steps=20, embedding=embedding)
    dense = craft("adaptive", data, surrogate, lam=5.0, steps=20, embedding=embedding)
    assert dense.params["density_term_poisons"] < plain.params["density_term_poisons"]
    with pytest.raises(ValueError, match="anchor"):
        make_attack("adaptive", anchor="median")


def test_adaptive_noise_term_keeps_the_poisons_noise_floor_near_their_bases(data, surrogate):
    plain = craft("adaptive", data, surrogate, lam=0.0, noise_lam=0.0, steps=20)
    quiet = craft("adaptive", data, surrogate, lam=0.0, noise_lam=20.0, steps=20)
    assert quiet.params["noise_excess_poisons"] < plain.params["noise_excess_poisons"]
    with pytest.raises(ValueError, match="noise_lam"):
        make_attack("adaptive", noise_lam=-1)


def test_sleeper_agent_trigger_selection_and_success_helper(data, surrogate):
    from sanitizer.attacks.sleeper_agent import apply_trigger, backdoor_success, gradient_norms

    train, test = data
    poisons = craft("sleeper_agent", data, surrogate)
    assert poisons.trigger.shape == (1, 3, 3) and poisons.source_class == 0 and poisons.adversarial_class == 1
    assert (poisons.labels == 1).all() and poisons.target_images is None
    pool = np.flatnonzero(train.labels.numpy() == 1)
    norms = gradient_norms(surrogate, train.images[pool], train.labels[pool])
    assert set(poisons.indices.tolist()) == set(pool[np.argsort(-norms.numpy())[:4]].tolist())
    rate = backdoor_success(surrogate, test, poisons)
    assert 0.0 <= rate <= 1.0
    patched = apply_trigger(torch.zeros(2, 1, 8, 8), torch.ones(1, 3, 3), torch.Generator().manual_seed(0))
    assert patched.sum(dim=(1, 2, 3)).tolist() == [9.0, 9.0]


def test_sleeper_agent_retrains_a_copy(data, surrogate):
    before = [p.detach().clone() for p in surrogate.parameters()]
    poisons = craft("sleeper_agent", data, surrogate, steps=4, retrain_rounds=1, retrain_epochs=1)
    assert len(poisons) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, surrogate.parameters()))


def test_metapoison_color_and_margin(data, surrogate):
    from sanitizer.attacks.metapoison import apply_color, cw_margin, staggered_surrogates

    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert float(cw_margin(logits, 1)) == pytest.approx(1.0)
    assert float(cw_margin(logits, 0, kappa=0.5)) == pytest.approx(-0.5)
    images = torch.rand(2, 3, 4, 4)
    assert torch.allclose(apply_color(images, torch.zeros(2, 3, 2, 2, 2)), images, atol=1e-6)
    shifted = apply_color(images.clamp(0.1, 0.9), torch.full((2, 3, 2, 2, 2), 0.05))
    assert torch.allclose(shifted, images.clamp(0.1, 0.9) + 0.05, atol=1e-5)
    with pytest.raises(ValueError, match="RGB"):
        craft("metapoison", data, surrogate, color=True)
    gen = torch.Generator().manual_seed(1)
    rgb_train = ImageTensorDataset(torch.rand(30, 3, 8, 8, generator=gen), torch.arange(30) % 3, None, 3)
    rgb_test = ImageTensorDataset(torch.rand(4, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0]), None, 3)
    ensemble = staggered_surrogates(rgb_train, count=2, epochs=2, width=4,
                                    config=None)
    assert len(ensemble) == 2
    poisons = make_attack("metapoison", steps=3, budget=2, clean_batch=4, color=True, color_eps=0.04).craft(
        rgb_train, surrogate=ensemble, test_set=rgb_test, target_index=0, adversarial_class=1)
    base = rgb_train.images[torch.from_numpy(poisons.indices)].numpy()
    assert np.abs(poisons.images - base).max() <= 8 / 255 + 0.04 + 1e-6


def test_cli_drives_attacks_of_the_whole_registry(tmp_path):
    """The command follows the common craft convention: a model-free attack gets no surrogate."""
    out = tmp_path / "flip.npz"
    assert _cli(["attack", "label_flip", "--data", "digits", "--out", str(out), "--budget", "10",
                 "--per-class", "20"]) == 0
    poisons = PoisonSet.load(out)
    assert len(poisons) == 10 and poisons.params["per_class"] == 20
    from sanitizer.data import load_digits_split

    full, _ = load_digits_split()  # indices were mapped back to the full training set
    assert np.array_equal(poisons.images, full.images[torch.from_numpy(poisons.indices)].numpy())
