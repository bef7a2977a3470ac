"""Harvest mode: rounds embed from the training steps, keyed by index through the sampler's order."""

import copy
import warnings

import numpy as np
import pytest
import torch
from planted import planted_images, uninterrupted_and_resumed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sanitizer import Sanitizer
from sanitizer.core import AUTO_HARVEST_MIN_EXAMPLES
from sanitizer.embeddings import gradient_embeddings
from sanitizer.errors import SanitizerError


def mlp_and_data(n=90, seed=0):
    """An MLP without BatchNorm or dropout: in train mode it computes what it computes in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = torch.arange(n) % 3
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, TensorDataset(x, y)


def frozen_epochs(model, loader, sanitizer, epochs, forwards_per_batch=1):
    """A plain training loop whose steps leave the weights unchanged (lr 0): harvested rows must then
    equal a separate pass exactly, which pins down the index matching."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for epoch in range(epochs):
        sanitizer.start_epoch(epoch)
        model.train()
        for x, y in loader:
            for _ in range(forwards_per_batch):
                loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@pytest.mark.parametrize("kind", ["last_layer", "logits", "features"])
def test_harvested_round_equals_a_separate_pass_when_the_model_does_not_move(kind):
    model, data = mlp_and_data()
    captured = {}
    sanitizer = Sanitizer(model, data, policy="none", embedding=kind, warmup=2, every=1, harvest=True, verbose=False,
                          round_hooks=[lambda s, e, cand, emb, sel: captured.update({e: (cand, emb.clone())})])
    loader = sanitizer.wrap(DataLoader(data, batch_size=16, shuffle=True))
    frozen_epochs(model, loader, sanitizer, epochs=3)
    candidates, emb = captured[2]
    expected = gradient_embeddings(model, data, embedding=kind, indices=candidates)
    assert torch.allclose(emb, expected, atol=1e-5)
    record = sanitizer.history[-1]["harvest"]
    assert (record["harvested"], record["embedded"], record["off"]) == (len(data), 0, None)
    # the same weights in train and eval mode (no BatchNorm, no dropout): the probe finds no disagreement
    assert record["check"]["ok"] and record["check"]["pass_only"] == record["check"]["harvest_only"] == 0


def test_rows_the_last_epoch_did_not_see_are_embedded_by_a_pass():
    model, data = mlp_and_data(n=90)
    captured = {}
    sanitizer = Sanitizer(model, data, policy="none", warmup=1, every=1, harvest=True, verbose=False,
                          round_hooks=[lambda s, e, cand, emb, sel: captured.update({e: (cand, emb.clone())})])
    loader = sanitizer.wrap(DataLoader(data, batch_size=20, shuffle=True, drop_last=True))  # 10 rows never seen
    frozen_epochs(model, loader, sanitizer, epochs=2)
    candidates, emb = captured[1]
    assert torch.allclose(emb, gradient_embeddings(model, data, indices=candidates), atol=1e-5)
    record = sanitizer.history[-1]["harvest"]
    assert (record["harvested"], record["embedded"], record["off"]) == (80, 10, None)


def test_two_forwards_per_batch_turn_harvest_off_with_a_warning_and_rounds_still_correct():
    model, data = mlp_and_data()
    captured = {}
    sanitizer = Sanitizer(model, data, policy="none", warmup=1, every=1, harvest=True, verbose=False,
                          round_hooks=[lambda s, e, cand, emb, sel: captured.update({e: (cand, emb.clone())})])
    loader = sanitizer.wrap(DataLoader(data, batch_size=16, shuffle=True))
    with pytest.warns(UserWarning, match="harvest mode is off"):
        frozen_epochs(model, loader, sanitizer, epochs=2, forwards_per_batch=2)
    candidates, emb = captured[1]
    assert torch.allclose(emb, gradient_embeddings(model, data, indices=candidates), atol=1e-5)
    assert sanitizer.history[-1]["harvest"]["off"] is not None
    assert sanitizer.history[-1]["harvest"]["harvested"] == 0


def harvesting_epoch(warmup: int):
    """A harvest-mode sanitizer at the start of epoch 0, the model in train mode: (model, data, sanitizer, loader)."""
    model, data = mlp_and_data()
    sanitizer = Sanitizer(model, data, policy="none", warmup=warmup, every=1, harvest=True, verbose=False)
    loader = sanitizer.wrap(DataLoader(data, batch_size=16, shuffle=True))
    sanitizer.start_epoch(0)
    model.train()
    return model, data, sanitizer, loader


def test_eval_forwards_and_no_grad_forwards_are_not_harvested():
    model, data, sanitizer, loader = harvesting_epoch(warmup=1)
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    model.eval()
    for x, _ in loader:
        model(x)
    assert sanitizer.harvester.state()["harvested"] == 0
    assert sanitizer.harvester.broken is None


def test_harvest_refuses_the_params_embedding():
    model, data = mlp_and_data()
    with pytest.raises(SanitizerError, match="harvest=True works with"):
        Sanitizer(model, data, embedding="params", harvest=True, epochs=3, verbose=False)


def test_harvested_rows_follow_the_latest_epoch():
    model, data = mlp_and_data()
    sanitizer = Sanitizer(model, data, policy="none", warmup=5, every=1, harvest=True, verbose=False)
    loader = sanitizer.wrap(DataLoader(data, batch_size=16, shuffle=True))
    frozen_epochs(model, loader, sanitizer, epochs=3)
    h, z, have = sanitizer.harvester.rows(np.arange(len(data)), since_epoch=2)
    assert have.all() and h.shape == (len(data), 8) and z.shape == (len(data), 3)
    assert np.all(sanitizer.harvester.seen_epoch == 2)


def test_a_replicated_last_layer_turns_harvest_off():
    """nn.DataParallel runs replicas whose rows would arrive out of order: refuse them, warn, use a pass."""
    model, data = mlp_and_data()
    sanitizer = Sanitizer(model, data, policy="none", warmup=1, every=1, harvest=True, verbose=False)
    loader = sanitizer.wrap(DataLoader(data, batch_size=16, shuffle=True))
    replica = copy.copy(model[2])  # a shallow copy shares the hooks, as DataParallel's replicas do
    sanitizer.start_epoch(0)
    next(iter(loader))  # the sampler hands the harvester the epoch's order
    replica.train()
    with pytest.warns(UserWarning, match="replicas"):
        replica(torch.randn(4, 8))
    assert sanitizer.harvester.broken is not None


def test_resuming_before_a_round_drops_what_the_uninterrupted_run_drops():
    """The harvested rows travel in state_dict(): a checkpoint between an epoch and the round that reads
    its rows resumes exactly."""
    from sanitizer.train import TrainConfig

    ds, _ = planted_images()
    cfg = TrainConfig(epochs=5, lr=0.05, batch_size=32, augment=False, seed=0)
    # stop before the round at epoch 2, which reads epoch 1's harvested rows
    (_, san), (_, san3) = uninterrupted_and_resumed(ds, cfg, stop=2, warmup=2, every=2, harvest=True, verbose=False,
                                                    policy_options={"threshold": 2.0})
    assert [r["dropped_now"] for r in san.history] == [r["dropped_now"] for r in san3.history]
    assert san3.history[-2]["harvest"]["harvested"] == len(ds)  # the round at epoch 2 read restored rows


def test_a_harvest_state_for_another_dataset_is_refused():
    model, data = mlp_and_data()
    sanitizer = Sanitizer(model, data, policy="none", warmup=1, harvest=True, verbose=False)
    state = sanitizer.state_dict()
    state["harvest"]["seen_epoch"] = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(SanitizerError, match="harvest state"):
        sanitizer.load_state_dict(state)


class NoLinear(nn.Module):
    """Logits from a parameter product: no nn.Linear anywhere (the logits embedding still works)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3))

    def forward(self, x):
        return x @ self.w


def test_automatic_harvest_keeps_the_pass_where_it_cannot_hook_and_explicit_harvest_says_why():
    _, data = mlp_and_data()
    auto = Sanitizer(NoLinear(), data, embedding="logits", harvest=None, epochs=3, verbose=False)
    assert auto.harvester is None
    model, big = mlp_and_data(n=AUTO_HARVEST_MIN_EXAMPLES)
    assert Sanitizer(model, big, harvest=None, epochs=3, verbose=False).harvester is not None
    with pytest.raises(SanitizerError, match="nn.Linear"):
        Sanitizer(NoLinear(), data, embedding="logits", harvest=True, epochs=3, verbose=False)


def test_the_harvest_state_survives_a_weights_only_checkpoint(tmp_path):
    model, data = mlp_and_data()
    sanitizer = Sanitizer(model, data, policy="none", warmup=5, harvest=True, verbose=False)
    loader = sanitizer.wrap(DataLoader(data, batch_size=16, shuffle=True))
    frozen_epochs(model, loader, sanitizer, epochs=2)
    torch.save({"sanitizer": sanitizer.state_dict()}, tmp_path / "ckpt.pt")
    restored = Sanitizer(model, data, policy="none", warmup=5, harvest=True, verbose=False)
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["sanitizer"])
    h, z, have = restored.harvester.rows(np.arange(len(data)), since_epoch=1)
    assert have.all()
    assert torch.equal(h, sanitizer.harvester.h) and torch.equal(z, sanitizer.harvester.z)


def blob_training(mixup: bool, epochs: int = 4, n: int = 300, seed: int = 0, mixup_from: int = 0):
    """Train an MLP on three separable blobs with a harvesting sanitizer (rounds from epoch 2 on); with
    ``mixup`` every batch from epoch ``mixup_from`` on is blended with a shuffled copy of itself (Beta(1, 1)
    weight per batch)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 6, generator=gen) * 0.5 + 3 * nn.functional.one_hot(y, 6).float()
    data = TensorDataset(x, y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    captured = {}  # epoch -> (the round's rows, a pass over the same candidates at that moment)

    def hook(s, epoch, candidates, emb, selection):
        captured[epoch] = (emb.clone(), gradient_embeddings(model, data, indices=candidates))

    sanitizer = Sanitizer(model, data, policy="none", warmup=2, every=1, harvest=True, verbose=False,
                          round_hooks=[hook])
    loader = sanitizer.wrap(DataLoader(data, batch_size=20, shuffle=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        sanitizer.start_epoch(epoch)
        for xb, yb in loader:
            if mixup and epoch >= mixup_from:
                lam, perm = float(rng.beta(1.0, 1.0)), torch.randperm(len(xb), generator=gen)
                z = model(lam * xb + (1 - lam) * xb[perm])
                loss = lam * nn.functional.cross_entropy(z, yb) + (1 - lam) * nn.functional.cross_entropy(z, yb[perm])
            else:
                loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model, data, sanitizer, captured


def test_a_mixup_loop_fails_the_label_fit_check_and_rounds_fall_back_to_a_pass():
    with pytest.warns(UserWarning, match="fit their labels"):
        model, data, sanitizer, captured = blob_training(mixup=True)
    for record in sanitizer.history:  # every round fails the check and embeds with a pass
        check = record["harvest"]["check"]
        assert not check["ok"] and check["gap"] > 0.1 and record["harvest"]["harvested"] == 0
    for rows, passed in captured.values():  # both rounds embed with a pass over the examples
        assert torch.allclose(rows, passed, atol=1e-5)


def test_the_probe_shrinks_after_two_passed_checks_and_grows_back_when_one_fails():
    _, data, sanitizer, _ = blob_training(mixup=False, epochs=6)  # rounds at epochs 2-5
    assert [r["harvest"]["check"]["probe"] for r in sanitizer.history] == [len(data), len(data), 128, 128]
    with pytest.warns(UserWarning, match="fit their labels"):  # blending switched on at epoch 4
        _, data, sanitizer, _ = blob_training(mixup=True, epochs=7, mixup_from=4)
    checks = [r["harvest"]["check"] for r in sanitizer.history]  # rounds at 2-6; round 4 checks epoch 3's rows
    assert [c["probe"] for c in checks] == [len(data), len(data), 128, 128, len(data)]
    assert [c["ok"] for c in checks] == [True, True, True, False, False]  # the small probe sees the blend


def test_an_ordinary_loop_that_learns_passes_the_label_fit_check():
    _, data, sanitizer, captured = blob_training(mixup=False)
    rows, passed = captured[3]
    assert not torch.allclose(rows, passed, atol=1e-3)  # the rows are harvested, not a pass
    for record in sanitizer.history:
        assert record["harvest"]["check"]["ok"] and record["harvest"]["harvested"] == len(data)
    assert sanitizer.harvester.broken is None


def blob_label_run(flip_rate: float, seed: int = 0, n: int = 600, epochs: int = 5):
    """An MLP on four separable blobs, ``flip_rate`` of the labels flipped, under the default density policy in
    harvest mode (rounds at epochs 2, 3, 4). Returns the sanitizer and the flipped mask."""
    gen = torch.Generator().manual_seed(seed)
    true = torch.arange(n) % 4
    x = torch.randn(n, 8, generator=gen) * 0.5 + 3 * nn.functional.one_hot(true, 8).float()
    flipped = torch.rand(n, generator=gen) < flip_rate
    y = torch.where(flipped, (true + torch.randint(1, 4, (n,), generator=gen)) % 4, true)
    data = TensorDataset(x, y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    sanitizer = Sanitizer(model, data, warmup=2, every=1, harvest=True, verbose=False)
    loader = sanitizer.wrap(DataLoader(data, batch_size=25, shuffle=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(epochs):
        sanitizer.start_epoch(epoch)
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return sanitizer, flipped.numpy()


@pytest.mark.parametrize("flip_rate", [0.0, 0.15])
def test_harvest_rounds_make_a_pass_for_the_label_side_only_when_the_rows_hint_at_flips(flip_rate):
    sanitizer, flipped = blob_label_run(flip_rate)
    rounds = [r for r in sanitizer.history if r.get("kind") != "screen"]
    assert all(r["harvest"]["harvested"] > 0 for r in rounds)  # the within-class sides ran on harvested rows
    sides = [r["label_side"] for r in rounds]
    trigger = sanitizer.policy.label_pass_trigger
    for side in sides:
        if side["views"] == "pass":
            assert side.get("harvested_gate_ratio") is None or side["harvested_gate_ratio"] > trigger
        else:
            assert side["views"] == "harvested" and side["gate_ratio"] <= trigger
    assert sanitizer.policy._clean_views is None  # offered for the round only
    if flip_rate:
        assert any(side["views"] == "pass" for side in sides)
        assert np.isin(np.flatnonzero(flipped), sanitizer.dropped).mean() >= 0.8
    else:
        assert all(side["views"] == "harvested" for side in sides) and not any(side["open"] for side in sides)


def test_the_default_harvests_from_ten_thousand_examples_and_makes_a_pass_below():
    model, small = mlp_and_data(n=AUTO_HARVEST_MIN_EXAMPLES - 1)
    assert Sanitizer(model, small, epochs=3, verbose=False).harvester is None  # a pass over a small set costs little
    model, big = mlp_and_data(n=AUTO_HARVEST_MIN_EXAMPLES)
    assert Sanitizer(model, big, epochs=3, verbose=False).harvester is not None


def test_a_checkpoint_taken_mid_epoch_leaves_the_later_rows_at_their_examples():
    model, data, sanitizer, loader = harvesting_epoch(warmup=5)
    for step, (x, _) in enumerate(loader):
        model(x)
        if step == 1:
            sanitizer.state_dict()  # flushes the rows so far, mid-epoch
    _, z, have = sanitizer.harvester.rows(np.arange(len(data)), since_epoch=0)
    assert have.all()
    torch.testing.assert_close(z, model(data.tensors[0]).detach())  # every row at its own example


def test_an_unpickled_model_and_harvester_keep_harvesting():
    """Lightning's ddp_spawn pickles the model with its hook and the sanitizer: the copies must still match rows."""
    model, data = mlp_and_data()
    sanitizer = Sanitizer(model, data, policy="none", warmup=5, every=1, harvest=True, verbose=False)
    # deepcopy goes through the same __getstate__ as pickling, keeping the hook's harvester the copied one
    copy_model, copy_harvester = copy.deepcopy((model, sanitizer.harvester))
    order = np.random.default_rng(0).permutation(len(data))
    copy_harvester.start_order(order, epoch=0)
    copy_model.train()
    x = data.tensors[0]
    copy_model(x[order])
    _, z, have = copy_harvester.rows(np.arange(len(data)), since_epoch=0)
    assert copy_harvester.broken is None and have.all()
    torch.testing.assert_close(z, copy_model(x).detach())


def test_a_sampler_that_leaves_the_split_to_another_turns_harvest_off(monkeypatch):
    """Under torch.distributed a sampler yielding every rank's indices (accelerate or Lightning split them
    afterwards) cannot tell which rows this rank trained on: a pass instead, with a warning only when asked."""
    import sanitizer.core as core

    model, data = mlp_and_data()
    asked = Sanitizer(model, data, harvest=True, epochs=3, verbose=False)
    model, big = mlp_and_data(n=AUTO_HARVEST_MIN_EXAMPLES)
    automatic = Sanitizer(model, big, epochs=3, verbose=False)
    split = Sanitizer(model, big, epochs=3, verbose=False)
    monkeypatch.setattr(core, "world_size", lambda: 2)
    with pytest.warns(UserWarning, match="cannot be matched"):
        asked.sampler()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        automatic.sampler()
        split.sampler(num_replicas=2, rank=0)  # this rank's own indices: harvesting goes on
    assert "cannot be matched" in asked.harvester.broken and "cannot be matched" in automatic.harvester.broken
    assert split.harvester.broken is None
