"""The cleanlab baseline policy on planted label flips, and benchmarks/simple_attacks.py end to end (seconds)."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest

from sanitizer.errors import SanitizerError
from sanitizer.policies import available_policies, make_policy
from tests.planted import NUM_CLASSES, planted_blobs

pytest.importorskip("cleanlab")


def test_cleanlab_policy_flags_planted_flips():
    images, labels, planted = planted_blobs(per_class=60, planted_per_class=6, seed=1)
    policy = make_policy("cleanlab")
    assert "cleanlab" in available_policies() and policy.embedding == "features"
    sel = policy.select(images.flatten(1), labels, num_classes=NUM_CLASSES)
    hits = np.isin(planted, sel.dropped).sum()
    assert hits / len(planted) >= 0.9                   # recall
    assert hits / max(len(sel.dropped), 1) >= 0.8       # precision
    # score = 1 - out-of-fold probability of the given label: the flipped examples rank on top
    assert set(np.argsort(-sel.scores)[:len(planted)]) == set(planted.tolist())
    assert sel.info["folds"] == 5 and policy.config()["filter_by"] == "prune_by_noise_rate"


def test_cleanlab_policy_small_classes_and_missing_package(monkeypatch):
    x = np.random.default_rng(0).normal(size=(13, 4))
    y = np.array([0] * 6 + [1] * 6 + [2])               # class 2 has one example: kept, left out of the fit
    with pytest.warns(UserWarning, match=r"classes \[2\]"):
        sel = make_policy("cleanlab").select(x, y)
    assert sel.keep[-1] and sel.info["skipped_classes"] == [2] and sel.info["folds"] == 5
    with pytest.warns(UserWarning, match="keeps every example"):
        assert make_policy("cleanlab").select(x[:6], y[:6]).keep.all()   # one class: nothing to compare
    real_import = builtins.__import__

    def no_cleanlab(name, *args, **kwargs):
        if name.startswith("cleanlab"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cleanlab)
    with pytest.raises(SanitizerError, match="pip install cleanlab"):
        make_policy("cleanlab").select(x, y)


def test_simple_attacks_smallest_run_writes_rows_and_resumes(tmp_path, monkeypatch):
    from benchmarks import simple_attacks as sa

    out, cache = tmp_path / "r.jsonl", tmp_path / "cache"
    argv = ["--seeds", "1000", "--per-class", "6", "--epochs", "2", "--width", "2", "--attacks",
            "label_flip,badnets-10", "--defenses", "none,cleanlab", "--out", str(out), "--cache-dir", str(cache)]
    sa.main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    head, victims = rows[0], rows[1:]
    assert head["kind"] == "run" and head["recipe"]["seed_kind"] == "tuning" and "commit" in head
    assert [(r["attack"], r["defense"]) for r in victims] == [
        ("label_flip", "none"), ("label_flip", "cleanlab"), ("badnets-10", "none"), ("badnets-10", "cleanlab")]
    for r in victims:
        for key in ("poison_recall", "poison_precision", "clean_dropped", "clean_accuracy"):
            assert {"successes", "trials", "rate", "wilson95"} <= set(r[key])
        assert r["commit"] and r["seed"] == 1000
    flip, _, bad, bad_cl = victims
    assert flip["budget"] == 6 and flip["backdoor"] is None and flip["sanitizer"] is None
    assert bad["budget"] == 1 and bad["clean_accuracy"]["trials"] == 449
    assert {"success", "victim_unpatched", "clean_model_patched"} <= set(bad["backdoor"])
    assert bad_cl["sanitizer"]["policy"] == "cleanlab" and bad_cl["sanitizer"]["rounds"]
    assert bad_cl["sanitizer"]["policy_config"] == make_policy("cleanlab").config()

    # a rerun redoes nothing: no victim is trained again, no row is added
    def refuse(*args, **kwargs):
        raise AssertionError("a finished row was redone")

    monkeypatch.setattr(sa, "run_victim", refuse)
    sa.main(argv)
    assert len(out.read_text().splitlines()) == len(rows)
    # tuning and reported seeds stay apart
    with pytest.raises(SystemExit, match="mixes"):
        sa.main(["--seeds", "999-1000", "--out", str(out)])
    table = sa.summary([out])
    assert "| label_flip | cleanlab | 1 (1000–1000) | cleanlab |" in table
