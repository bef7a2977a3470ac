"""The from-scratch benchmark's pieces at seconds scale: the cifar10-scratch-full preset's code path
on digits, the signal recorder, the purification baselines and the offline detection study."""

import json

import numpy as np
import pytest
import torch

from benchmarks import detection_study, poisoning
from benchmarks.presets import get_preset
from benchmarks.signals import load_epoch
from sanitizer.purify import bernoulli_noise, friendly_noise, jpeg_compress, uniform_noise
from sanitizer.train import onecycle_factor


def smoke_preset():
    # The full-CIFAR preset's recipe (one-cycle, rounds every epoch, 1 % budget) on 8×8 digits, width 4.
    return get_preset("cifar10-scratch-full").with_overrides(
        ["data=digits", "width=4", "epochs=3", "budget=10", "batch_size=64",
         'attack_options={"gradient_matching": {"steps": 2, "restarts": 1, "shift": 1}}'])


def test_onecycle_rises_then_falls_to_near_zero():
    factors = [onecycle_factor(e, 10) for e in range(10)]
    assert factors[0] < factors[1] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(factors[1:], factors[2:]))
    assert 0 < factors[-1] < 0.1


def test_scratch_full_preset_records_signals_and_runs_the_purifiers(tmp_path):
    out, cache = tmp_path / "run.jsonl", tmp_path / "cache"
    defenses = ["none", "clean", "jpeg:quality=25", "friendly_noise:steps=2", "density"]
    poisoning.run(smoke_preset(), "gradient_matching", 1, defenses, out, "", cache, record_signals=True)
    rows = {r["defense"]: r for r in map(json.loads, out.read_text().splitlines()) if r["kind"] == "victim"}
    assert set(rows) == set(defenses)
    assert rows["jpeg:quality=25"]["policy_options"] == {"quality": 25}
    assert rows["jpeg:quality=25"]["seconds_prefix"] == 0.0          # trained from scratch on purified data
    assert rows["friendly_noise:steps=2"]["seconds_prefix"] > 0       # branched after the shared prefix
    assert rows["friendly_noise:steps=2"]["seconds"] > rows["friendly_noise:steps=2"]["seconds_purify"] > 0
    # once the rows are written, no checkpoint (victims' epochs, friendly noise) is left in the cache
    assert not list((cache / "victims").glob("*")) and not list((cache / "purified").glob("*"))
    assert rows["density"]["round_epochs"] == [2]                     # the first round after a fifth (warmup 2)
    run_dir = next((cache / "signals").iterdir())
    meta = json.loads((run_dir / "meta.json").read_text())
    is_poison = np.load(run_dir / "is_poison.npy")
    assert is_poison.sum() == 10 and meta["poison_indices"] == np.flatnonzero(is_poison).tolist()
    epochs = sorted(int(p.stem[5:]) for p in run_dir.glob("epoch*.npz"))
    assert epochs == [0, 1, 2]
    arrays = load_epoch(run_dir, 2)
    n = len(is_poison)
    assert arrays["logits"].shape == (n, 10) and arrays["train_logits"].shape == (n, 10)
    assert np.isfinite(arrays["train_logits"]).all()                  # every example harvested once per epoch
    # harvested penultimate features from epoch 1 on (the hook goes in at the first epoch's end)
    assert "train_features" not in load_epoch(run_dir, 0)
    assert arrays["train_features"].shape == arrays["features"].shape
    assert np.isfinite(arrays["train_features"]).all()
    assert not np.allclose(arrays["train_features"], arrays["features"], atol=1e-2)  # train-mode views, not the pass
    focus = np.load(run_dir / "focus.npy")
    assert arrays["jpeg_logits"].shape == (len(focus), 10)
    # the recorder's eval logits are those of the final undefended model (same run, same epoch)
    rows_study = detection_study.study_run(run_dir, epochs=[2])
    signals = {r["signal"] for r in rows_study}
    assert {"loss_low", "jpeg_loss_rise", "policy:density(default)", "policy:epic-0.1"} <= signals
    for r in rows_study:
        if r.get("auroc_in_class") is not None:
            assert 0.0 <= r["auroc_in_class"] <= 1.0


def test_detection_metrics_on_known_scores():
    pos, neg = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0, 3.0])
    assert detection_study.auroc(pos, neg) == pytest.approx((4 + 4 + 3.5) / 12)
    assert detection_study.recall_at_fpr(pos, np.arange(100.0), 0.02) == pytest.approx(0.0)
    assert detection_study.recall_at_fpr(np.array([99.5, 50.0]), np.arange(100.0), 0.02) == pytest.approx(0.5)
    logits, feats, y = np.random.default_rng(0).normal(size=(5, 3)), np.ones((5, 2)), np.array([0, 1, 2, 0, 1])
    emb = detection_study.last_layer(logits, feats, y)
    assert emb.shape == (5, 9)
    np.testing.assert_allclose(emb.reshape(5, 3, 3)[:, :, 2], detection_study.residual(logits, y), rtol=1e-6)


def test_purifications_stay_in_range_and_friendly_noise_keeps_the_output():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    assert (jpeg_compress(x, 90) - x).abs().mean() < (jpeg_compress(x, 10) - x).abs().mean()
    noisy = uniform_noise(x, 8 / 255, seed=1)
    assert noisy.min() >= 0 and noisy.max() <= 1 and (noisy - x).abs().max() <= 8 / 255 + 1e-6
    torch.testing.assert_close((bernoulli_noise(x, 0.1) - x).abs(), torch.full_like(x, 0.1))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    noise = friendly_noise(model, x, eps=16 / 255, steps=20, lr=10.0)
    assert noise.abs().max() <= 16 / 255 + 1e-6
    assert noise.abs().mean() > 4 / 255          # grown beyond the ±8/255 uniform start on average
    with torch.no_grad():
        before = torch.softmax(model(x), 1)
        after = torch.softmax(model((x + noise).clamp(0, 1)), 1)
    assert (before - after).abs().max() < 0.1     # the model's output barely moves


def test_friendly_noise_in_channels_last_follows_the_ordinary_layout():
    from sanitizer.models import CompactCNN

    class Contiguous(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.contiguous())

    torch.manual_seed(0)
    net = CompactCNN(3, 4, 4).eval()
    x = torch.rand(8, 3, 8, 8)
    fast = friendly_noise(net, x, steps=3, lr=1.0, seed=0)
    reference = friendly_noise(Contiguous(net), x, steps=3, lr=1.0, seed=0)
    torch.testing.assert_close(fast, reference, rtol=1e-3, atol=1e-4)


def test_friendly_noise_resumes_from_its_checkpoint_to_the_same_noise(tmp_path):
    class DiesAfter(torch.nn.Module):  # the same weights, killed after a number of forward passes
        def __init__(self, net, calls):
            super().__init__()
            self.net, self.calls = net, calls

        def forward(self, x):
            self.calls -= 1
            if self.calls < 0:
                raise KeyboardInterrupt
            return self.net(x)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x = torch.rand(10, 3, 4, 4)
    options = {"steps": 3, "lr": 1.0, "batch_size": 3, "seed": 5}
    through = friendly_noise(net, x, **options)
    path = tmp_path / "noise.npz"
    with pytest.raises(KeyboardInterrupt):  # dies in the third batch, after two were saved
        friendly_noise(DiesAfter(net, 2 * 4 + 2), x, checkpoint=path, save_every_s=0, **options)
    with np.load(path, allow_pickle=False) as saved:
        assert int(saved["done"]) == 6
    counted = DiesAfter(net, 1000)
    resumed = friendly_noise(counted, x, checkpoint=path, **options)
    assert 1000 - counted.calls == 2 * 4                 # only the last two batches were computed again
    torch.testing.assert_close(resumed, through)
    # other weights (or settings) never reuse the file: their noise is computed afresh
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    fresh = friendly_noise(other, x, **options)
    torch.testing.assert_close(friendly_noise(other, x, checkpoint=path, **options), fresh)


def test_the_policy_table_pools_sets_per_round():
    from benchmarks.detection_study import policy_table

    rows = [{"signal": "policy:spectral", "round_epoch": 2, "recall": r, "clean_dropped_in_class": c,
             "auroc_in_class": a} for r, c, a in ((0.1, 10, 0.8), (0.3, 30, 0.9))]
    rows.append({"signal": "loss_low", "round_epoch": 2, "auroc_in_class": 0.5})  # raw signals are not policies
    lines = policy_table(rows).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| spectral | 2 | 2 | 0.20 [0.10–0.30] | 20 [10–30] | 0.85 [0.80–0.90] |"
    # the screen's rows (noise_screen_study --saved) join as the default's step before training
    screen = [{"poisons_flagged": f, "poisons": 500, "clean_flagged_in_class": c, "clean_in_class": 4500,
               "auroc_in_class": 1.0}
              for f, c in ((500, 80), (450, 40))]
    lines = policy_table(rows + screen).splitlines()
    assert lines[3] == "| noise screen (default) | start | 2 | 0.95 [0.90–1.00] | 60 [40–80] | 1.00 [1.00–1.00] |"


def test_the_policy_plot_draws_every_policy_and_round(tmp_path):
    from benchmarks.detection_study import policy_plot

    rows = [{"signal": f"policy:{name}", "round_epoch": e, "recall": 0.1 * e, "clean_dropped_in_class": 9,
             "clean_dropped_in_class_frac": 0.002, "auroc_in_class": 0.7} for name in ("spectral", "epic-0.1")
            for e in (2, 5)]
    rows.append({"poisons_flagged": 500, "poisons": 500, "clean_flagged_in_class": 80, "clean_in_class": 4500,
                 "auroc_in_class": 1.0})
    path = policy_plot(rows, tmp_path / "detection.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_another_surrogate_seed_trains_another_surrogate_and_names_its_poisons(tmp_path):
    """Issue 10's >= 3 surrogates: `--set surrogate_seed=...` trains and caches another surrogate, and the poisons
    crafted on it get their own cache name; the default seed keeps the names earlier runs cached under."""
    from benchmarks.presets import make_setting

    base = smoke_preset().with_overrides(["surrogate_epochs=2"])
    other = base.with_overrides(["surrogate_seed=5"])
    assert base.surrogate_tag() == "" and other.surrogate_tag() == "_ss5"
    settings = [make_setting(p, "", tmp_path) for p in (base, other)]
    assert settings[0].info["surrogate_path"] != settings[1].info["surrogate_path"]
    assert settings[0].info["surrogate_sha256"] != settings[1].info["surrogate_sha256"]
    assert make_setting(other, "", tmp_path).info["surrogate_sha256"] == settings[1].info["surrogate_sha256"]  # cached
    for setting in settings:
        poisoning.craft(setting, "gradient_matching", 1, 0, 1, tmp_path)
    names = sorted(p.name for p in (tmp_path / "poisons").iterdir())
    assert len(names) == 2 and names[1].endswith("_ss5.npz") and not names[0].endswith("_ss5.npz")
