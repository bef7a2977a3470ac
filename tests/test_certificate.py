"""Certificates: schema, hash chain and tampering, the EPIC bound's quantities, partition radii, report."""

from __future__ import annotations

import argparse
import copy
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sanitizer.attacks import available_attacks, make_attack
from sanitizer.certificate import (
    BoundRecorder,
    certify_votes,
    hash_partition,
    last_layer_statistics,
    measure_robustness,
    partition_certificate,
    validate,
    verify_certificate,
    wilson_interval,
)
from sanitizer.certificate import command as cert_command
from sanitizer.certificate.audit import chain_rounds, header_of, seal_of, sha256_of
from sanitizer.certificate.bound import slack_terms
from sanitizer.certificate.partition import certified_accuracy, dataset_part_sizes
from sanitizer.certificate.report import browser_check, find_browser, write_report
from sanitizer.core import Sanitizer
from sanitizer.data import ImageTensorDataset, load_digits_split, subset_by_class
from sanitizer.errors import SanitizerError
from sanitizer.models import CompactCNN
from sanitizer.noise_screen import gradient_rounds
from sanitizer.train import TrainConfig, train_classifier

SAN_OPTIONS = {"warmup": 1, "every": 2, "policy_options": {"threshold": 2.0, "max_fraction": 0.05}}


def small_digits(per_class: int = 30):
    train, test = load_digits_split()
    idx = torch.from_numpy(subset_by_class(train, per_class, seed=0))
    train = ImageTensorDataset(train.images[idx], train.labels[idx], None, 10)
    return train, ImageTensorDataset(test.images[:150], test.labels[:150], None, 10)


def factory():
    return CompactCNN(1, 10, 4)


@pytest.fixture(scope="module")
def run():
    """A small real sanitized run on digits with 15 flipped labels and the bound recorder attached."""
    torch.manual_seed(0)
    train, test = small_digits()
    poisons = make_attack("label_flip", budget=15).craft(train, seed=0) if "label_flip" in available_attacks() \
        else None
    data = poisons.apply(train) if poisons is not None else train
    model = factory()
    sanitizer = Sanitizer(model, data, seed=0, **SAN_OPTIONS)
    recorder = BoundRecorder.attach(sanitizer)
    config = TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=0)
    train_classifier(model, data, config, sanitizer=sanitizer)
    cert = sanitizer.certificate(train_config=config, dataset_source={"name": "digits"},
                                 poison_indices=None if poisons is None else poisons.indices)
    return {"train": train, "test": test, "data": data, "poisons": poisons, "sanitizer": sanitizer,
            "recorder": recorder, "config": config, "cert": cert}


# -- schema and audit ------------------------------------------------------------------------------
def test_certificate_of_a_real_run_validates(run):
    cert = run["cert"]
    assert validate(cert) == []
    # the input-noise screen when training starts, then the density rounds at epochs 1 and 3
    assert [r.get("kind", "round") for r in cert["audit"]["rounds"]] == ["screen", "round", "round"]
    assert [r["epoch"] for r in cert["audit"]["rounds"]] == [0, 1, 3]
    assert cert["audit"]["dataset"]["size"] == len(run["data"])
    assert cert["audit"]["dropped"] == [int(i) for i in run["sanitizer"].dropped]
    # The validator is not vacuous: a wrong type, a missing field and a bad hash are all reported.
    broken = copy.deepcopy(cert)
    broken["audit"]["rounds"][0]["epoch"] = "one"
    del broken["audit"]["versions"]["torch"]
    broken["seal"]["head"] = "xyz"
    errors = validate(broken)
    assert any("rounds[0].epoch" in e for e in errors)
    assert any("'torch'" in e for e in errors)
    assert any("seal.head" in e for e in errors)


def test_intact_certificate_verifies_after_a_json_round_trip(run, tmp_path):
    path = tmp_path / "cert.json"
    path.write_text(json.dumps(run["cert"]))
    loaded = json.loads(path.read_text())
    result = verify_certificate(loaded, run["data"])
    assert result.ok, result.problems
    assert "dataset fingerprint" in result.checked


def _edits(cert):
    """(description, function that edits a copy) for every round and several fields."""
    for i in range(len(cert["audit"]["rounds"])):
        yield f"round {i} epoch", lambda c, i=i: c["audit"]["rounds"][i].__setitem__("epoch", 99)
        yield f"round {i} scores", lambda c, i=i: c["audit"]["rounds"][i]["per_class"]["0"].__setitem__(
            "score_max", 0.5)
        if "extras" in cert["audit"]["rounds"][i]:  # the screen embeds no gradients: no bound quantities
            yield f"round {i} rho", lambda c, i=i: c["audit"]["rounds"][i]["extras"]["bound"].__setitem__("rho", 0.0)
        if cert["audit"]["rounds"][i]["dropped_now"]:  # (removing nothing from an empty list is no edit)
            yield f"round {i} undrop", lambda c, i=i: c["audit"]["rounds"][i].__setitem__(
                "dropped_now", c["audit"]["rounds"][i]["dropped_now"][1:])
    yield "delete a round", lambda c: c["audit"]["rounds"].pop(0)
    yield "reorder rounds", lambda c: c["audit"]["rounds"].reverse()
    yield "policy threshold", lambda c: c["audit"]["configuration"]["policy_options"].__setitem__("threshold", 9.0)
    yield "fingerprint", lambda c: c["audit"]["dataset"].__setitem__("fingerprint", "0" * 64)
    yield "bound summary", lambda c: c["bound"].__setitem__("max_rho", 0.0)
    yield "dropped list", lambda c: c["audit"]["dropped"].pop()


def test_tampering_with_any_round_or_section_fails(run):
    cert = run["cert"]
    # the noise screen (round 0) finds nothing to drop among label flips; every gradient round drops
    assert all(r["dropped_now"] for r in gradient_rounds(cert["audit"]["rounds"])), "the fixture must drop"
    for what, edit in _edits(cert):
        bad = copy.deepcopy(cert)
        edit(bad)
        assert not verify_certificate(bad).ok, f"editing {what} went unnoticed"


def test_a_rebuilt_chain_is_caught_by_the_consistency_check_or_the_seal(run):
    """Recomputing every hash after an edit makes a self-consistent chain; the new seal differs from
    the published one, and removing a drop is also caught by the totals."""
    bad = copy.deepcopy(run["cert"])
    first = next(i for i, r in enumerate(bad["audit"]["rounds"]) if r["dropped_now"])
    bad["audit"]["rounds"][first]["dropped_now"] = bad["audit"]["rounds"][first]["dropped_now"][1:]
    _genesis, bad["audit"]["rounds"] = chain_rounds(header_of(bad), bad["audit"]["rounds"])
    bad["seal"]["head"] = bad["audit"]["rounds"][-1]["hash"]
    bad["seal"]["hash"] = seal_of(bad)
    result = verify_certificate(bad)
    assert not result.ok and any("drop" in p for p in result.problems)
    assert bad["seal"]["hash"] != run["cert"]["seal"]["hash"]


def test_tampering_with_the_dataset_fails(run):
    data = run["data"]
    images = data.images.clone()
    images[7, 0, 3, 3] += 1e-3
    pixel = verify_certificate(run["cert"], ImageTensorDataset(images, data.labels, None, 10))
    assert not pixel.ok and "images" in pixel.problems[0]
    labels = data.labels.clone()
    labels[5] = (labels[5] + 1) % 10
    label = verify_certificate(run["cert"], ImageTensorDataset(data.images, labels, None, 10))
    assert not label.ok and "labels" in label.problems[0]
    order = torch.arange(len(data))
    order[[0, 1]] = order[[1, 0]]
    swapped = ImageTensorDataset(data.images[order], data.labels[order], None, 10)
    assert not verify_certificate(run["cert"], swapped).ok
    shorter = ImageTensorDataset(data.images[:-1], data.labels[:-1], None, 10)
    assert "size" in verify_certificate(run["cert"], shorter).problems[0]


def test_verify_command(run, tmp_path):
    parser = argparse.ArgumentParser()
    cert_command.register(parser.add_subparsers())
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(run["cert"]))
    tampered = copy.deepcopy(run["cert"])
    tampered["audit"]["rounds"][-1]["dropped_total"] += 1
    bad.write_text(json.dumps(tampered))
    args = parser.parse_args(["verify", str(good)])
    assert args.handler(args) == 0
    args = parser.parse_args(["verify", str(bad)])
    assert args.handler(args) == 1


def test_certificate_before_any_round_is_refused():
    train, _ = small_digits(5)
    sanitizer = Sanitizer(factory(), train, warmup=3)
    with pytest.raises(SanitizerError, match="no rounds"):
        sanitizer.certificate()


# -- the bound -------------------------------------------------------------------------------------
def test_bound_quantities_match_autograd():
    torch.manual_seed(1)
    train, _ = small_digits(6)
    model = factory()
    model.train()
    with torch.no_grad():  # move the batch-norm statistics off their defaults so eval mode matters
        model(train.images)
    rng = np.random.default_rng(0)
    kept = rng.random(len(train)) > 0.2
    candidates = np.flatnonzero(rng.random(len(train)) > 0.3)
    round_kept = rng.random(len(candidates)) > 0.25
    stats = last_layer_statistics(model, train, kept, candidates, round_kept, batch_size=17)
    assert model.training  # the mode is restored

    model.eval()
    layer = model.classifier
    grads, losses = [], []
    for x, y in zip(train.images, train.labels):
        loss = F.cross_entropy(model(x[None]), y[None])
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        grads.append(torch.cat([gw, gb[:, None]], 1).flatten().double())
        losses.append(loss.item())
    g = torch.stack(grads)
    full = g.mean(0)
    rho = float((full - g[torch.from_numpy(kept)].mean(0)).norm())
    cand = g[torch.from_numpy(candidates)]
    rho_round = float((cand.mean(0) - cand[torch.from_numpy(round_kept)].mean(0)).norm())
    grad_max = float(g.norm(dim=1).max())
    loss = float(np.mean(losses))
    mu = float(full.norm()) ** 2 / (2 * loss)
    slack = (2 * rho * grad_max - rho ** 2) / (2 * mu)
    for name, direct in [("rho", rho), ("rho_round", rho_round), ("grad_max", grad_max), ("loss", loss),
                         ("grad_norm", float(full.norm())), ("mu_estimate", mu), ("slack", slack)]:
        assert stats[name] == pytest.approx(direct, rel=2e-4, abs=1e-7), name
    assert rho > 0 and rho_round > 0


def test_slack_terms_edge_cases():
    assert slack_terms(0.0, 3.0, 1.0, 0.5)["slack"] == 0.0
    assert slack_terms(0.1, 3.0, 1.0, 0.0) == {"mu_estimate": None, "slack": None}


def test_recorder_writes_the_bound_into_every_round(run):
    rounds = gradient_rounds(run["cert"]["audit"]["rounds"])
    assert len(rounds) == len(run["recorder"].rounds) == 2
    for record, seen in zip(rounds, run["recorder"].rounds):
        b = record["extras"]["bound"]
        assert b["n"] == len(run["data"]) and b["rho"] >= 0 and b["grad_max"] >= b["grad_norm"]
        assert record["epoch"] == seen["epoch"]
    assert run["cert"]["bound"]["max_rho"] == max(r["extras"]["bound"]["rho"] for r in rounds)
    assert len(run["cert"]["bound"]["assumptions_not_verified"]) >= 4


# -- partition aggregation -------------------------------------------------------------------------
def _min_changes_to_flip(counts: tuple[int, ...]) -> int:
    """Brute force: fewest single-vote moves (one part changes its vote) that change the plurality winner."""
    start = np.array(counts)
    winner = int(start.argmax())
    frontier, seen, steps = {tuple(start)}, {tuple(start)}, 0
    while frontier:
        steps += 1
        nxt = set()
        for state in frontier:
            for a, b in itertools.permutations(range(len(state)), 2):
                if state[a] == 0:
                    continue
                moved = list(state)
                moved[a] -= 1
                moved[b] += 1
                if int(np.argmax(moved)) != winner:
                    return steps
                if tuple(moved) not in seen:
                    seen.add(tuple(moved))
                    nxt.add(tuple(moved))
        frontier = nxt
    return 10 ** 9


def test_partition_radii_on_constructed_votes():
    pred, radius = certify_votes(np.array([[5, 0, 0], [2, 2, 1], [1, 3, 1], [0, 3, 3], [0, 4, 1], [1, 1, 5]]))
    assert pred.tolist() == [0, 0, 1, 1, 1, 2]
    assert radius.tolist() == [2, 0, 0, 0, 1, 1]
    # Every vote vector of 6 parts over 3 classes: the radius is exactly one less than the fewest
    # changed parts that flip the vote (sound and tight).
    for counts in itertools.product(range(7), repeat=3):
        if sum(counts) != 6:
            continue
        _, r = certify_votes(np.array([counts]))
        assert int(r[0]) == _min_changes_to_flip(counts) - 1, counts


def test_certified_accuracy_counts_correct_and_robust():
    curve = certified_accuracy(np.array([0, 1, 2, 1]), np.array([0, 2, 1, 3]), np.array([0, 1, 0, 1]))
    assert [c["accuracy"] for c in curve] == [0.75, 0.5, 0.5, 0.25]


def test_hash_partition_is_order_independent():
    images = torch.rand(40, 1, 4, 4)
    part, order = hash_partition(images, 4)
    perm = torch.randperm(40)
    part2, order2 = hash_partition(images[perm], 4)
    assert np.array_equal(part2, part[perm.numpy()])
    assert np.array_equal(perm.numpy()[order2], order)
    assert len(set(part.tolist())) > 1


def test_partition_certificate_end_to_end(run):
    section = partition_certificate(factory, run["train"], run["test"], 3,
                                    TrainConfig(epochs=3, batch_size=32, lr=0.05), SAN_OPTIONS)
    assert sum(section["part_sizes"]) == len(run["train"])
    radii, acc = np.array(section["radii"]), [c["accuracy"] for c in section["certified_accuracy"]]
    assert radii.max() <= 1  # 3 parts: a radius of 2 would need a gap of 4 votes
    assert acc[0] == pytest.approx(section["clean_accuracy"])
    assert all(a >= b for a, b in zip(acc, acc[1:]))
    # The evidence behind the radii travels with them, so verify can recompute them.
    votes = np.array(section["votes"])
    assert votes.shape == (len(run["test"]), 10) and (votes.sum(1) <= 3).all()
    pred, radius = certify_votes(votes)
    assert pred.tolist() == section["predictions"] and radius.tolist() == section["radii"]
    assert len(section["part_accuracies"]) == 3 and all(0 <= a <= 1 for a in section["part_accuracies"])
    assert dataset_part_sizes(run["train"], 3) == section["part_sizes"]
    run["partition"] = section


# -- measured robustness ---------------------------------------------------------------------------
def test_wilson_interval_reference_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_measured_robustness_with_a_bundled_attack(run):
    names = ["label_flip", "badnets"]
    assert set(names) <= set(available_attacks()), "the bundled label_flip and badnets attacks must be registered"
    section = measure_robustness(factory, run["train"], run["test"], TrainConfig(epochs=2, batch_size=32, lr=0.05),
                                 attacks=[(n, {"budget": 10}, {}) for n in names], runs=1, proxy_per_class=20,
                                 sanitizer_options=SAN_OPTIONS)
    assert section["proxy"]["train_size"] == 200 and "proxy" in section["label"]
    for result in section["attacks"]:
        assert result["poisons_dropped"]["trials"] == 10
        for arm in ("undefended", "sanitized", "clean"):
            r = result[arm]["attack_success"]
            lo, hi = r["wilson95"]
            assert r["trials"] > 0 and lo <= r["rate"] <= hi
            assert result[arm]["clean_accuracy"]["trials"] == len(run["test"])
    run["robustness"] = section


def test_robustness_refuses_a_proxy_that_never_sanitizes(run):
    with pytest.raises(ValueError, match="never sanitize"):
        measure_robustness(factory, run["train"], run["test"], TrainConfig(epochs=1), attacks=[], runs=1,
                           sanitizer_options={"warmup": 5})


# -- report ----------------------------------------------------------------------------------------
def test_report_renders_in_the_browser_with_every_image(run, tmp_path):
    cert = copy.deepcopy(run["cert"])
    for name in ("robustness", "partition"):  # the sections computed above, when those tests ran
        cert[name] = run.get(name)
    cert["seal"]["hash"] = seal_of(cert)
    sanitizer = run["sanitizer"]
    html = write_report(cert, tmp_path, recorder=run["recorder"], images=run["data"].images,
                        labels=sanitizer.labels, poison_indices=cert["audit"]["dataset"]["poison_indices"])
    expected = {"rounds.png", "scores.png", "projection.png", "dropped.png", "rho.png"}
    expected |= {"robustness.png"} if cert["robustness"] else set()
    expected |= {"certified.png"} if cert["partition"] else set()
    assert {p.name for p in tmp_path.glob("*.png")} == expected
    text = html.read_text()
    assert text.count("data:image/png;base64,") == len(expected)
    assert "Not verified by this run" in text
    if find_browser() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    shot = tmp_path / "screenshot.png"
    seen = browser_check(html, shot)
    assert seen["images"] == len(expected) and seen["images_ok"] == len(expected)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)[..., :3]
    assert (pixels.mean(-1) < 0.5).mean() > 0.01  # text and figures drew something dark


def test_header_hash_covers_configuration(run):
    header = header_of(run["cert"])
    assert run["cert"]["audit"]["genesis_hash"] == sha256_of(header)
    assert "configuration" in header["audit"] and "dataset" in header["audit"]


def test_certify_and_verify_commands_on_a_poisoned_subset(tmp_path, capsys):
    assert "label_flip" in available_attacks(), "the bundled label_flip attack must be registered"
    train, _ = load_digits_split()
    poison_file = tmp_path / "poisons.npz"
    make_attack("label_flip", budget=60).craft(train, seed=1).save(poison_file)
    parser = argparse.ArgumentParser()
    cert_command.register(parser.add_subparsers())
    out = tmp_path / "run" / "cert.json"
    args = parser.parse_args(["certify", "--data", "digits", "--subset-per-class", "20", "--width", "4",
                              "--epochs", "3", "--warmup", "1", "--every", "1", "--poisons", str(poison_file),
                              "--out", str(out)])
    assert args.handler(args) == 0
    cert = json.loads(out.read_text())
    poisons = cert["audit"]["dataset"]["poison_indices"]
    assert cert["audit"]["dataset"]["size"] == 200 and 0 < len(poisons) < 60  # poisons inside the subset
    assert (tmp_path / "run" / "report" / "report.html").exists()
    verify = parser.parse_args(["verify", str(out), "--data", "digits", "--poisons", str(poison_file)])
    assert verify.handler(verify) == 0
    without = parser.parse_args(["verify", str(out), "--data", "digits"])
    capsys.readouterr()
    assert without.handler(without) == 2
    err = capsys.readouterr().err  # one line on stderr, as every command's bad input
    assert err.startswith("sanitizer verify: error: cannot rebuild the dataset") and "--poisons" in err


def _measured(name: str, undefended: tuple[int, int], sanitized: tuple[int, int],
              clean: tuple[int, int] | None = None) -> dict:
    from sanitizer.certificate.robustness import rate

    result = {"attack": name, "goal": "backdoor", "runs": 2, "measure": "patched image classified as the target",
              "undefended": {"attack_success": rate(*undefended), "clean_accuracy": rate(9, 10)},
              "sanitized": {"attack_success": rate(*sanitized), "clean_accuracy": rate(9, 10)},
              "poisons_dropped": rate(5, 10)}
    if clean is not None:
        result["clean"] = {"attack_success": rate(*clean), "clean_accuracy": rate(9, 10)}
    return result


def test_the_report_says_plainly_which_attack_the_sanitizer_did_not_stop(run, tmp_path):
    """The verdict is computed from the certificate's own counts: intervals apart -> stopped, lower but
    overlapping -> lower, not lower -> not stopped (listed by name in the summary)."""
    from sanitizer.certificate.report import not_stopped, robustness_verdict, text_summary

    attacks = [_measured("badnets", (30, 40), (1, 40)), _measured("label_flip", (6, 20), (4, 20)),
               _measured("sleeper_agent", (3, 20), (5, 20)), _measured("none_run", (0, 0), (0, 0))]
    assert [robustness_verdict(a) for a in attacks] == ["stopped", "lower", "not stopped", "not measured"]
    robustness = {"proxy": {"runs": 2}, "attacks": attacks}
    assert not_stopped(robustness) == ["sleeper_agent"]
    cert = {**run["cert"], "robustness": {**robustness, "label": "measured", "proxy": {"runs": 2}}}
    summary = text_summary(cert)
    assert "NOT STOPPED by this sanitizer: sleeper_agent" in summary and "stopped" in summary
    html = write_report(cert, tmp_path / "report").read_text()
    assert "Not stopped by this sanitizer:</b> sleeper_agent" in html


def test_an_attack_a_clean_model_matches_is_reported_as_without_effect(run, tmp_path):
    """With a clean arm, an attack whose success with and without the sanitizer is within the clean model's
    interval (label flips that cost a small CNN nothing) is 'no effect', not 'not stopped'; one the clean
    model does not explain keeps its verdict."""
    from sanitizer.certificate.report import not_stopped, robustness_verdict, text_summary, without_effect

    attacks = [_measured("label_flip", (71, 1347), (84, 1347), clean=(70, 1347)),
               _measured("badnets", (490, 1200), (7, 1200), clean=(6, 1200)),
               _measured("sleeper_agent", (30, 200), (60, 200), clean=(29, 200))]
    assert [robustness_verdict(a) for a in attacks] == ["no effect", "stopped", "not stopped"]
    robustness = {"label": "measured", "proxy": {"runs": 2}, "attacks": attacks}
    assert without_effect(robustness) == ["label_flip"] and not_stopped(robustness) == ["sleeper_agent"]
    cert = {**run["cert"], "robustness": robustness}
    summary = text_summary(cert)
    assert "NO MEASURABLE EFFECT: label_flip" in summary and "NOT STOPPED by this sanitizer: sleeper_agent" in summary
    html = write_report(cert, tmp_path / "report").read_text()
    assert "No measurable effect:</b> label_flip" in html and "success clean model" in html


def test_the_report_says_whether_the_label_side_acted_in_each_round(run, tmp_path):
    from sanitizer.certificate.report import label_side_summary

    opened = {"gate_ratio": 1.44, "gate": 1.0, "open": True, "flagged": 171, "dropped_by_label_side_only": 30}
    assert label_side_summary(opened) == "open (gate ratio 1.44, cut 1): 171 flagged, 30 dropped by it alone"
    assert label_side_summary({"gate_ratio": 0.5, "gate": 1.0, "open": False}).startswith("closed (gate ratio 0.50")
    assert label_side_summary(None) == "–"
    sampled = {"gate_ratio": 0.55, "gate_ratio_upper": 0.6, "sampled": 8192, "gate": 1.0, "open": False}
    assert label_side_summary(sampled) == "closed (gate ratio 0.55 on 8,192 sampled examples, at most 0.60, cut 1)"
    cert = copy.deepcopy(run["cert"])
    cert["audit"]["rounds"][-1]["label_side"] = opened
    html = write_report(cert, tmp_path / "report").read_text()
    assert "<th>label side</th>" in html and "171 flagged" in html
