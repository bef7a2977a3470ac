"""The poisoning benchmark harness: a tiny preset end to end, resume, branching, Wilson intervals."""

import json

import numpy as np
import pytest
import torch

from benchmarks import poisoning
from benchmarks.presets import LinearHead, get_preset
from benchmarks.report import load_rows, report, summarize, wilson
from sanitizer.core import Sanitizer
from sanitizer.data import ImageTensorDataset
from sanitizer.train import TrainConfig, continue_training

DEFENSES = ["none", "density", "random"]


def tiny_preset():
    # digits, a width-4 CNN trained from scratch for 3 epochs; label flips towards the adversarial class.
    return get_preset("digits-scratch-tiny").with_overrides(["per_class=40", "epochs=3", "warmup=1"])


def victim_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["kind"] == "victim"]


ALL = ["clean", *DEFENSES]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two trials of the tiny preset with every defense of these tests, run once for the module."""
    folder = tmp_path_factory.mktemp("tiny_run")
    out, cache = folder / "run.jsonl", folder / "cache"
    poisoning.run(tiny_preset(), "label_flip", 2, ALL, out, "", cache)
    return out, cache


def test_a_victim_killed_mid_training_resumes_at_its_next_epoch_and_ends_the_same(tiny_run, tmp_path, monkeypatch):
    reference = {r["defense"]: r for r in victim_rows(tiny_run[0]) if r["trial"] == 0}
    out, cache = tmp_path / "killed.jsonl", tiny_run[1]
    real_tracer = poisoning.target_tracer

    def dies_at_epoch_2(data, adv, trace):
        hook = real_tracer(data, adv, trace)

        def maybe_die(epoch, model):
            if epoch == 2:  # the undefended victim's second epoch after the prefix: its first is saved
                raise KeyboardInterrupt
            hook(epoch, model)
        return maybe_die

    monkeypatch.setattr(poisoning, "target_tracer", dies_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        poisoning.run(tiny_preset(), "label_flip", 1, ["none"], out, "", cache)
    assert victim_rows(out) == [] and len(list((cache / "victims").glob("*.pt"))) == 2  # the prefix and the victim
    monkeypatch.setattr(poisoning, "target_tracer", real_tracer)
    poisoning.run(tiny_preset(), "label_flip", 1, ["none"], out, "", cache)
    (row,) = victim_rows(out)
    assert row["resumed_at_epoch"] == 2
    for field in ("clean_accuracy", "target_adv_prob", "target_adv_prob_by_epoch", "dropped"):
        assert row[field] == reference["none"][field], field
    assert list((cache / "victims").glob("*.pt")) == []  # removed once the row is written


def test_tiny_preset_runs_two_trials_of_four_defenses_and_resumes(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "run.jsonl"
    out.write_text(tiny_run[0].read_text())
    cache = tiny_run[1]
    rows = victim_rows(out)
    assert sorted((r["trial"], r["defense"]) for r in rows) == sorted((t, d) for t in range(2) for d in ALL)
    for trial in range(2):
        per = {r["defense"]: r for r in rows if r["trial"] == trial}
        # Same poisoned set and target for every defense of a trial.
        assert len({(r["target_index"], r["adversarial_class"], r["seed"]) for r in per.values()}) == 1
        assert per["none"]["dropped"] == 0 and per["none"]["dropped_per_round"] == []
        # The random control drops as many as density did, round by round (the screen's in its first round).
        assert per["random"]["dropped_per_round"] == poisoning.matched_counts(per["density"])
        assert per["density"]["screen"]["dropped"] >= 0 and per["random"]["screen"] is None
        # the screened victim trains from epoch 0, not from the shared prefix that saw the poisons
        assert per["density"]["seconds_prefix"] == 0 and per["none"]["seconds_prefix"] > 0
        # the reference victim never saw a poison
        assert per["clean"]["recall"] == 1.0 and per["clean"]["precision"] == 1.0
        assert per["clean"]["dropped"] == per["clean"]["budget"]
        for r in per.values():
            assert 0 <= r["clean_accuracy"] <= 1 and 0 <= r["target_adv_prob"] <= 1
            # the per-epoch trace covers every epoch (prefix included) and ends at the final value
            assert len(r["target_adv_prob_by_epoch"]) == 3
            assert r["target_adv_prob_by_epoch"][-1] == pytest.approx(r["target_adv_prob"], rel=1e-5)
            assert r["poisons_dropped"] + r["clean_dropped"] == r["dropped"]
            assert r["seconds"] >= r["seconds_prefix"] >= 0 and r["seconds"] > 0

    # Resume: finished pairs are skipped; nothing is crafted or trained again.
    crafted = []
    real_craft = poisoning.craft
    monkeypatch.setattr(poisoning, "craft", lambda *a, **k: crafted.append(a[2]) or real_craft(*a, **k))
    poisoning.run(tiny_preset(), "label_flip", 2, ALL, out, "", cache)
    assert len(victim_rows(out)) == 8 and crafted == []

    # An interrupted trial (a torn last line, one defense missing) is completed, the rest untouched.
    lines = out.read_text().splitlines()
    kept = [line for line in lines if not (json.loads(line).get("trial") == 1
                                            and json.loads(line).get("defense") == "random")]
    out.write_text("\n".join(kept) + '\n{"kind": "victim", "tri')
    poisoning.run(tiny_preset(), "label_flip", 3, DEFENSES, out, "", cache)
    rows = [r for _, r in sorted(((r["trial"], r["defense"]), r) for r in load_rows(out)[1])]
    assert sorted((r["trial"], r["defense"]) for r in rows) == sorted(
        [(t, d) for t in range(3) for d in DEFENSES] + [(t, "clean") for t in range(2)])
    assert crafted == [1, 2]  # trial 1 re-read from the poison cache, trial 2 crafted
    again = {r["defense"]: r for r in rows if r["trial"] == 1}
    assert again["random"]["dropped_per_round"] == again["density"]["dropped_per_round"]


def test_report_has_every_defense_and_plots(tiny_run, tmp_path):
    out = tmp_path / "run.jsonl"
    out.write_text(tiny_run[0].read_text())
    text = report(out)
    for d in ALL:
        assert f"| {d} | 2 |" in text
    assert (tmp_path / "run_asr_vs_acc.png").stat().st_size > 1000
    assert (tmp_path / "run_time_ratio.png").stat().st_size > 1000
    rows = load_rows(out)[1]
    summary = {s["defense"]: s for s in summarize(rows)}
    assert summary["none"]["time_ratio"] == pytest.approx(1.0)
    # hits beyond the poison-free model: a trial counts only if the clean victim did not hit its target too
    clean_hit = {r["trial"]: r["target_hit"] for r in rows if r["defense"] == "clean"}
    expected = sum(r["target_hit"] and not clean_hit[r["trial"]] for r in rows if r["defense"] == "none")
    assert summary["none"]["hits_beyond_clean"] == expected and summary["none"]["trials_with_clean"] == 2
    assert summary["clean"]["hits_beyond_clean"] == 0


def test_branching_from_the_prefix_equals_one_continuous_run():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, 1, 1, generator=gen)
    y = (x[:, 0, 0, 0] > 0).long() + 2 * (x[:, 1, 0, 0] > 0).long()
    data = ImageTensorDataset(x, y, None, 4)
    config = TrainConfig(epochs=6, lr=0.1, batch_size=32, augment=False, milestones=(0.5,), seed=3)

    def fresh():
        torch.manual_seed(0)
        model = LinearHead(8, 4)
        return (model, *poisoning.make_optimizer(model, config))

    model, opt, sched = fresh()
    continue_training(model, data, config, opt, sched, Sanitizer(model, data, policy="none", warmup=10**9), 0, 6)

    prefix, popt, psched = fresh()
    continue_training(prefix, data, config, popt, psched, Sanitizer(prefix, data, policy="none", warmup=10**9), 0, 4)
    branches = []
    for _ in range(2):  # two branches must not share optimizer state
        m, o, s = poisoning.branch(prefix, popt, psched, config)
        continue_training(m, data, config, o, s, Sanitizer(m, data, policy="none", warmup=10**9), 4, 6)
        branches.append(m)
    for m in branches:
        for a, b in zip(model.parameters(), m.parameters()):
            torch.testing.assert_close(a, b)
    assert psched.last_epoch == 4  # the prefix itself is untouched


def test_wilson_interval_on_known_values():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.959964**2 / (10 + 1.959964**2), abs=1e-9)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.236593, abs=1e-5), pytest.approx(0.763407, abs=1e-5))
    lo, hi = wilson(81, 263)  # Wikipedia's worked example range: 0.2553 .. 0.3662
    assert (lo, hi) == (pytest.approx(0.2553, abs=5e-4), pytest.approx(0.3662, abs=5e-4))
    # Coverage: for p = 0.3, n = 50 the interval holds the truth about 95% of the time.
    rng = np.random.default_rng(0)
    draws = rng.binomial(50, 0.3, 4000)
    covered = np.mean([lo <= 0.3 <= hi for lo, hi in (wilson(int(k), 50) for k in draws)])
    assert 0.93 < covered < 0.97


def test_defense_specs_parse_and_random_needs_density():
    assert poisoning.parse_defense("density:k=50:threshold=2.5") == ("density", {"k": 50, "threshold": 2.5})
    preset = tiny_preset()
    policy, options = poisoning.build_policy("deep_knn", preset, None)
    assert policy.k == 2 * preset.budget
    assert poisoning.build_policy("epic-0.2", preset, None)[0].fraction == 0.2
    with pytest.raises(SystemExit, match="density"):
        poisoning.build_policy("random", preset, None)
    assert poisoning.schedule_for("spectral", preset)["stop_epoch"] == preset.warmup


def test_auroc_of_scores():
    assert poisoning.auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert poisoning.auroc(np.array([1.0]), np.array([1.0, 0.0, 2.0])) == pytest.approx(0.5)
    assert poisoning.auroc(np.array([]), np.array([1.0])) is None


def test_preset_defense_options_apply_unless_the_spec_overrides_them():
    preset = tiny_preset().with_overrides(['defense_options={"density": {"k": 40, "embedding": "features"}}'])
    assert poisoning.parse_defense("density", preset) == ("density", {"k": 40, "embedding": "features"})
    assert poisoning.parse_defense("density:k=5", preset)[1] == {"k": 5, "embedding": "features"}
    policy, options = poisoning.build_policy("density", preset, None)
    assert policy.k == 40 and "embedding" not in options  # the embedding goes to the Sanitizer


def test_retrain_detects_once_then_trains_a_fresh_victim_without_the_dropped(tmp_path):
    out = tmp_path / "run.jsonl"
    spec = "retrain:threshold=1.5:max_fraction=0.2:warmup=2"
    poisoning.run(tiny_preset(), "label_flip", 1, ["none", spec], out, "", tmp_path / "cache")
    rows = {r["defense"]: r for r in victim_rows(out)}
    row = rows[spec]
    assert row["round_epochs"] == [2] and row["dropped"] == row["dropped_per_round"][0]
    assert row["dropped"] > 0 and row["schedule"] == {"detect_epoch": 2}
    # the fresh victim trains every epoch from scratch: its trace has one value per epoch
    assert len(row["target_adv_prob_by_epoch"]) == 3 and row["seconds"] > row["seconds_detect"] > 0


def test_noise_control_trains_only_the_requested_victims_with_another_seed(tmp_path):
    out = tmp_path / "run.jsonl"
    argv = ["--preset", "digits-scratch-tiny", "--set", "per_class=40", "--set", "epochs=3", "--set", "warmup=1",
            "--attack", "label_flip", "--data-root", "", "--trials", "1", "--defenses", "clean",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-report", "--victim-seed-offset", "100"]
    poisoning.main([*argv, "--skip-undefended"])
    rows = victim_rows(out)
    assert [r["defense"] for r in rows] == ["clean"]
    assert rows[0]["victim_seed"] == rows[0]["seed"] + 100
    poisoning.main(argv)  # without the flag the undefended victim is added (time ratios need it)
    assert sorted(r["defense"] for r in victim_rows(out)) == ["clean", "none"]


def test_clean_screened_trains_without_the_poisons_and_what_the_default_screen_drops(tmp_path):
    out = tmp_path / "run.jsonl"
    preset = tiny_preset().with_overrides(["per_class=60"])
    poisoning.run(preset, "label_flip", 1, ["none", "density", "clean", "clean-screened"], out, "", tmp_path / "c")
    rows = {r["defense"]: r for r in victim_rows(out)}
    screened = rows["clean-screened"]
    assert screened["recall"] == 1.0 and screened["poisons_dropped"] == screened["budget"]
    # the clean images it leaves out are the ones the default's screen dropped before training
    assert screened["clean_dropped"] == rows["density"]["screen"]["clean_dropped"]
    assert screened["dropped"] >= rows["clean"]["dropped"] and screened["seconds_prefix"] == 0

    # Clean images the screen must flag (pure noise among digits) are left out too; the plain clean victim keeps them.
    from benchmarks.presets import VictimData, make_setting

    setting = make_setting(preset, "", tmp_path / "c")
    train = setting.craft_set
    images = train.images.clone()
    noisy = np.arange(10, 16)
    images[noisy] = torch.rand(len(noisy), *images.shape[1:])
    is_poison = np.zeros(len(train), dtype=bool)
    is_poison[:4] = True
    data = VictimData(ImageTensorDataset(images, train.labels, None, train.num_classes), is_poison,
                      setting.test_set.images[:1], setting.test_set)
    config = preset.train_config(0)
    plain = poisoning.clean_victim(setting, data, config, 0)
    row = poisoning.clean_victim(setting, data, config, 0, screened=True)
    assert plain["clean_dropped"] == 0 and plain["recall"] == 1.0
    assert row["recall"] == 1.0 and row["clean_dropped"] >= len(noisy)
