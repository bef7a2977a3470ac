"""Regenerate the hostile certificate corpus in this folder (``python tests/hostile/make_corpus.py``).

A tiny signed certificate (digits, 10 examples per class, with robustness and partition sections)
is made with a fresh issuer key; only the public key is kept (``issuer.pub.pem``), the private key is
thrown away. ``control/genuine.json`` is that certificate, untouched; every other file is an attack on
it: re-sealed edits (the chain and seal recomputed, as anyone can), a stripped or foreign signature,
and files no certificate reader should accept (duplicate keys, NaN, deep nesting, a pickle, ...).
``tests/test_certificate_signing.py`` runs ``sanitizer verify`` on each. The bytes differ between
runs (new key, new timestamps); the test only relies on what each file is.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from sanitizer.certificate import (  # noqa: E402
    BoundRecorder,
    generate_key_pair,
    measure_robustness,
    partition_certificate,
    sign_certificate,
)
from sanitizer.certificate.audit import seal_certificate  # noqa: E402
from sanitizer.certificate.bound import bound_section, slack_terms  # noqa: E402
from sanitizer.certificate.command import load_source  # noqa: E402
from sanitizer.certificate.partition import certified_accuracy, certify_votes  # noqa: E402
from sanitizer.certificate.robustness import rate  # noqa: E402
from sanitizer.core import Sanitizer  # noqa: E402
from sanitizer.models import CompactCNN  # noqa: E402
from sanitizer.train import TrainConfig, train_classifier  # noqa: E402

SOURCE = {"name": "digits", "subset_per_class": 10, "subset_seed": 0, "poisons_sha256": None}
OPTIONS = {"warmup": 1, "every": 1, "policy_options": {"threshold": 1.0, "max_fraction": 0.1}}


class RunsCode:
    """Unpickling this would create the folder HOSTILE_PICKLE_RAN in the current directory."""

    def __reduce__(self):
        return os.mkdir, ("HOSTILE_PICKLE_RAN",)


def genuine(key_path: Path) -> dict:
    torch.manual_seed(0)
    train, test, _ = load_source(SOURCE, "", None)

    def factory():
        return CompactCNN(1, 10, 4)

    model = factory()
    sanitizer = Sanitizer(model, train, seed=0, **OPTIONS)
    BoundRecorder.attach(sanitizer)
    config = TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=0)
    train_classifier(model, train, config, sanitizer=sanitizer)
    small = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    robustness = measure_robustness(factory, train, test, small, [("label_flip", {"budget": 5}, {})], 1, 5, OPTIONS)
    partition = partition_certificate(factory, train, test, 3, small, OPTIONS)
    return sanitizer.certificate(train_config=config, dataset_source=SOURCE, robustness=robustness,
                                 partition=partition, signing_key=key_path)


def resealed(cert: dict, edit) -> dict:
    """An edited copy with its chain and seal recomputed; the issuer's signature is kept (now stale)."""
    bad = copy.deepcopy(cert)
    edit(bad)
    return seal_certificate(bad)


def _set_rates(attack: dict, arm: str, successes: int) -> None:
    attack[arm]["attack_success"] = rate(successes, attack[arm]["attack_success"]["trials"])


def _zero_rho(c: dict) -> None:  # a consistent forgery: ρ = 0 in every round, slack and summary recomputed
    for record in c["audit"]["rounds"]:
        b = record["extras"]["bound"]
        b["rho"] = 0.0
        b.update(slack_terms(0.0, b["grad_max"], b["grad_norm"], b["loss"]))
    summary = bound_section(c["audit"]["rounds"])
    c["bound"].update({k: summary[k] for k in ("max_rho", "max_grad_max", "min_mu_estimate", "max_slack",
                                               "conservative_slack")})


def _raise_accuracy(c: dict) -> None:  # one more correct test image, without touching the predictions
    part = c["partition"]
    n = part["test_size"]
    part["clean_accuracy"] = (round(part["clean_accuracy"] * n) + 1) / n
    part["certified_accuracy"][0]["accuracy"] = part["clean_accuracy"]


def _unanimous_votes(c: dict) -> None:  # a consistent forgery: every part votes for the predicted class
    part = c["partition"]
    k = sum(1 for s in part["part_sizes"] if s > 0)
    part["votes"] = [[k if j == p else 0 for j in range(len(row))] for row, p in zip(part["votes"],
                                                                                       part["predictions"])]
    pred, radius = certify_votes(np.array(part["votes"]))
    part["radii"] = [int(r) for r in radius]
    _train, test, _ = load_source(SOURCE, "", None)
    part["certified_accuracy"] = certified_accuracy(pred, radius, test.labels.numpy())


def _other_key_sign(cert: dict, edit) -> dict:
    bad = resealed(cert, edit)
    with tempfile.TemporaryDirectory() as tmp:
        attacker, _ = generate_key_pair(Path(tmp) / "attacker.pem")
        return sign_certificate(bad, attacker)


def _swap_embedded_key(cert: dict) -> dict:
    bad = resealed(cert, lambda c: c["bound"].__setitem__("max_slack", 0.0))
    other = _other_key_sign(cert, lambda c: None)["signature"]
    bad["signature"]["public_key"] = other["public_key"]
    return bad


def _stripped(cert: dict) -> dict:
    bad = resealed(cert, lambda c: c["robustness"]["attacks"][0].__setitem__("runs", 1))
    del bad["signature"]
    return bad


def _script(c: dict) -> None:
    payload = "<script>alert('certificate')</script>"
    c["created"] = payload
    c["robustness"]["attacks"][0]["attack"] = payload
    c["audit"]["configuration"]["policy_options"][payload] = payload


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def write_corpus(out: Path = HERE) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        key_path, public = generate_key_pair(Path(tmp) / "issuer.pem")
        cert = genuine(key_path)
        (out / "issuer.pub.pem").write_bytes(public.read_bytes())
    (out / "control").mkdir(exist_ok=True)
    (out / "control" / "genuine.json").write_text(json.dumps(cert, indent=1, ensure_ascii=False))
    text = json.dumps(cert, ensure_ascii=False)

    attack = ("robustness", "attacks", 0)
    objects = {
        "resealed_bound_conservative_slack": resealed(cert, lambda c: c["bound"].__setitem__(
            "conservative_slack", c["bound"]["conservative_slack"] / 100)),
        "resealed_bound_rho_consistent": resealed(cert, _zero_rho),
        "resealed_bound_assumptions_removed": resealed(cert, lambda c: c["bound"].__setitem__(
            "assumptions_not_verified", c["bound"]["assumptions_not_verified"][:1])),
        "resealed_robustness_rate_only": resealed(cert, lambda c: c[attack[0]][attack[1]][0]["sanitized"][
            "attack_success"].__setitem__("rate", 0.0)),
        "resealed_robustness_consistent": resealed(cert, lambda c: _set_rates(c[attack[0]][attack[1]][0],
                                                                              "sanitized", 0)),
        "resealed_partition_radii_only": resealed(cert, lambda c: c["partition"].__setitem__(
            "radii", [1] * len(c["partition"]["radii"]))),
        "resealed_partition_votes_consistent": resealed(cert, _unanimous_votes),
        "resealed_partition_accuracy": resealed(cert, _raise_accuracy),
        "resealed_audit_configuration": resealed(cert, lambda c: c["audit"]["configuration"][
            "policy_options"].__setitem__("threshold", 9.0)),
        "resealed_audit_undrop": resealed(cert, lambda c: c["audit"]["rounds"][0].__setitem__(
            "dropped_now", c["audit"]["rounds"][0]["dropped_now"][1:])),
        "resealed_script_strings": resealed(cert, _script),
        "signature_stripped": _stripped(cert),
        "signature_by_other_key": _other_key_sign(cert, lambda c: _set_rates(c[attack[0]][attack[1]][0],
                                                                             "sanitized", 0)),
        "signature_key_swapped": _swap_embedded_key(cert),
        "schema_type_confusion": {**cert, "audit": {**cert["audit"], "rounds": "none"}},
    }
    for name, value in objects.items():
        (out / f"{name}.json").write_text(json.dumps(value, ensure_ascii=False))
    raw = {
        "duplicate_top_level_key": text[:-1] + ', "bound": null}',
        "duplicate_nested_key": text.replace('"successes": ', '"successes": 0, "successes": ', 1),
        "nan_value": text.replace('"max_rho": ', '"max_rho": NaN, "_": ', 1),
        "infinity_value": text.replace('"max_slack": ', '"max_slack": -Infinity, "_": ', 1),
        "overflowing_number": text.replace('"max_rho": ', '"max_rho": 1e999, "_": ', 1),
        "huge_integer": text.replace('"test_size": ', '"test_size": ' + "9" * 10000 + ', "_": ', 1),
        "deep_nesting": text.replace('"policy_options": ', '"policy_options": ' + _nested(100) + ', "_": ', 1),
        "deep_nesting_10k": _nested(10_000),
        "top_level_array": "[" + text + "]",
        "truncated": text[: len(text) // 2],
        "empty": "",
    }
    for name, value in raw.items():
        (out / f"{name}.json").write_text(value, encoding="utf-8")
    (out / "not_utf8.json").write_bytes(text.encode().replace(b'"created": "', b'"created": "\xff', 1))
    (out / "pickle_renamed.json").write_bytes(pickle.dumps({"certificate": RunsCode()}, protocol=4))
    (out / "pickle_protocol0_renamed.json").write_bytes(pickle.dumps(RunsCode(), protocol=0))


if __name__ == "__main__":
    write_corpus()
