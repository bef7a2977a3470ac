"""Signed certificates, strict reading, recomputation, the hostile corpus, the report's escaping, and the
certify command's argument checks and summary.

Most tests reuse ``tests/hostile/control/genuine.json`` (a tiny real certificate with every section,
made by ``tests/hostile/make_corpus.py``), re-signed here with a fresh key, so nothing is trained
except in the one end-to-end ``certify`` test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from sanitizer.certificate import (
    CertificateFormatError,
    generate_key_pair,
    parse_certificate,
    sign_certificate,
    verify_certificate,
)
from sanitizer.certificate import command as cert_command
from sanitizer.certificate.audit import seal_certificate
from sanitizer.certificate.report import write_report
from sanitizer.certificate.signing import check_signature
from sanitizer.cli import main
from sanitizer.stats import wilson_interval

HOSTILE = Path(__file__).parent / "hostile"
ISSUER = HOSTILE / "issuer.pub.pem"
GENUINE = HOSTILE / "control" / "genuine.json"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: the issuer's and an attacker's."""
    folder = tmp_path_factory.mktemp("keys")
    return generate_key_pair(folder / "issuer.pem"), generate_key_pair(folder / "attacker.pem")


@pytest.fixture(scope="module")
def issued(keys, tmp_path_factory):
    """The corpus's genuine certificate signed by our issuer key, as a dict and as a file."""
    cert = json.loads(GENUINE.read_text())
    sign_certificate(cert, keys[0][0])
    path = tmp_path_factory.mktemp("issued") / "cert.json"
    path.write_text(json.dumps(cert))
    return cert, path


def _leaves(value, path=()):
    """Every scalar's path, with long lists sampled (their first two items and the last one)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(value, list):
        for i in sorted({0, 1, len(value) - 1} & set(range(len(value)))):
            yield from _leaves(value[i], path + (i,))
    else:
        yield path, value


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.1
    if isinstance(value, str):
        return value + "x"
    return 0




# -- signing ---------------------------------------------------------------------------------------
def test_keygen_command_writes_a_private_key_only_its_owner_reads(tmp_path, capsys):
    out = tmp_path / "k" / "issuer.pem"
    assert main(["keygen", "--out", str(out)]) == 0
    public = tmp_path / "k" / "issuer.pub.pem"
    assert b"BEGIN PRIVATE KEY" in out.read_bytes() and b"BEGIN PUBLIC KEY" in public.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "key id:" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["keygen", "--out", str(out)]) == 2  # never overwrites a key silently
    assert "refusing to overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["keygen", "--out", str(out), "--force"]) == 0 and out.read_bytes() != before


def test_signed_certificate_verifies_from_a_path_or_a_dict_with_its_public_key(issued, keys):
    cert, path = issued
    for given in (path, str(path), cert):
        result = verify_certificate(given, public_key=keys[0][1])
        assert result.ok, result.problems
        assert result.signed and any(c.startswith("ed25519 signature") for c in result.checked)
        assert not any("UNSIGNED" in n for n in result.notes)
    alone = verify_certificate(path)  # no key: intact relative to the key it carries, and it says so
    assert alone.ok and any("--public-key" in n for n in alone.notes)


def test_every_field_of_every_section_is_covered_by_the_signature(issued, keys):
    """Change any single value anywhere (bound, robustness, partition, audit, seal, ...): the signature
    no longer matches the issuer's key, whatever else is recomputed."""
    cert, _ = issued
    leaves = [(p, v) for p, v in _leaves(cert) if p[0] != "signature"]
    sections = {p[0] for p, _ in leaves}
    assert {"audit", "bound", "robustness", "partition", "seal", "created"} <= sections
    edited = copy.deepcopy(cert)
    for path, value in leaves:
        target = edited
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = _changed(value)
        problems, _, _ = check_signature(edited, keys[0][1])
        target[path[-1]] = value
        assert problems, f"editing {'.'.join(map(str, path))} went unnoticed"
    assert not check_signature(edited, keys[0][1])[0]  # every edit was undone: it verifies again


def test_resealed_edits_of_each_section_fail_verify_with_the_public_key(issued, keys):
    cert, _ = issued
    edits = {
        "bound rho (consistent)": lambda c: c["bound"].__setitem__("max_rho", c["bound"]["max_rho"] * 2),
        "partition radius": lambda c: c["partition"]["radii"].__setitem__(0, 1),
        "robustness success": lambda c: c["robustness"]["attacks"][0]["sanitized"]["attack_success"].__setitem__(
            "successes", 0),
        "configuration": lambda c: c["audit"]["configuration"].__setitem__("warmup", 0),
        "created": lambda c: c.__setitem__("created", "2020-01-01T00:00:00+00:00"),
    }
    for what, edit in edits.items():
        bad = copy.deepcopy(cert)
        edit(bad)
        seal_certificate(bad)  # what anyone can do: the chain and the seal are consistent again
        result = verify_certificate(bad, public_key=keys[0][1])
        assert not result.ok and any("signature does not match" in p for p in result.problems), what


def test_stripped_or_foreign_signatures_fail_with_the_public_key(issued, keys):
    cert, _ = issued
    stripped = {k: v for k, v in cert.items() if k != "signature"}
    result = verify_certificate(stripped, public_key=keys[0][1])
    assert not result.ok and "not signed" in result.problems[0]
    unsigned = verify_certificate(stripped)  # still verifiable, and plain about what that shows
    assert unsigned.ok and any("UNSIGNED" in n and "not origin" in n for n in unsigned.notes)
    forged = sign_certificate(copy.deepcopy(cert), keys[1][0])  # re-signed by someone else
    assert verify_certificate(forged).ok  # consistent with the key inside it ...
    result = verify_certificate(forged, public_key=keys[0][1])  # ... but not the issuer's
    assert not result.ok and any("not by the given public key" in p for p in result.problems)


def test_verify_command_with_public_key_and_published_seal(issued, keys, tmp_path, capsys):
    cert, path = issued
    assert main(["verify", str(path), "--public-key", str(keys[0][1]), "--seal", cert["seal"]["hash"]]) == 0
    out = capsys.readouterr().out
    assert "signed by the given public key" in out and "UNSIGNED" not in out
    assert main(["verify", str(path), "--public-key", str(keys[1][1])]) == 1
    assert "not by the given public key" in capsys.readouterr().out
    assert main(["verify", str(path), "--seal", "0" * 64]) == 1
    assert "not the published seal" in capsys.readouterr().out
    assert main(["verify", str(path), "--seal", "abc"]) == 1
    assert "not a SHA-256 hex digest" in capsys.readouterr().out
    assert main(["verify", str(path), "--public-key", str(keys[0][0])]) == 2  # the private key by mistake
    assert "pass the .pub.pem file" in capsys.readouterr().err
    unsigned = tmp_path / "unsigned.json"
    unsigned.write_text(json.dumps({k: v for k, v in cert.items() if k != "signature"}))
    assert main(["verify", str(unsigned)]) == 0
    assert "warning: UNSIGNED: this certificate proves only integrity" in capsys.readouterr().out
    assert main(["verify", str(unsigned), "--seal", cert["seal"]["hash"]]) == 0
    assert "published seal" in capsys.readouterr().out


def test_verify_certificate_reports_unreadable_paths_instead_of_raising(tmp_path):
    result = verify_certificate(tmp_path / "missing.json")
    assert not result.ok and "cannot read" in result.problems[0]
    result = verify_certificate({"schema": "sanitizer-certificate", "x": float("nan")})
    assert not result.ok and "JSON" in result.problems[0]


# -- strict reading --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": [Infinity]}', "Infinity is not a JSON number"),
    ('{"a": 1e400}', "overflows a float"),
    ('{"a": ' + "[" * 65 + "]" * 65 + "}", "66 levels deep"),
    ('{"a": "' + "[" * 100 + '"}', None),  # brackets inside a string are not nesting
    ("[1, 2]", "not an object"),
    ("", "the file is empty"),
])
def test_strict_parsing(text, message):
    if message is None:
        assert parse_certificate(text)["a"].startswith("[")
        return
    with pytest.raises(CertificateFormatError, match=message):
        parse_certificate(text)


# -- recomputation ---------------------------------------------------------------------------------
def test_unsigned_edits_that_do_not_follow_from_the_data_are_caught_without_a_key(issued):
    from sanitizer.certificate.command import load_source

    cert, _ = issued
    base = {k: v for k, v in cert.items() if k != "signature"}
    train, test, _ = load_source(base["audit"]["dataset"]["source"], "", None)
    result = verify_certificate(base, train, test_dataset=test)
    assert result.ok, result.problems
    assert {"partition hash parts of the dataset", "partition accuracies on the test set"} <= set(result.checked)

    def forged(edit):
        bad = copy.deepcopy(base)
        edit(bad)
        return seal_certificate(bad)

    def part_sizes(c):
        sizes = c["partition"]["part_sizes"]
        sizes[0], sizes[1] = sizes[0] + 1, sizes[1] - 1

    def clean_arm(c):  # the corpus certificate predates the clean arm: give it a consistent one, to break
        attack = c["robustness"]["attacks"][0]
        attack["clean"] = copy.deepcopy(attack["undefended"])
        return attack["clean"]

    def accuracy(c):
        part, n = c["partition"], c["partition"]["test_size"]
        part["clean_accuracy"] = part["certified_accuracy"][0]["accuracy"] = (round(part["clean_accuracy"] * n) + 1) / n

    cases = [
        (lambda c: c["bound"].__setitem__("max_slack", 0.0), "max_slack do not follow"),
        (lambda c: c["audit"]["rounds"][0]["extras"]["bound"].__setitem__("slack", 0.0), "slack do not follow"),
        (lambda c: c["partition"]["radii"].__setitem__(0, 1), "do not follow from the votes"),
        (lambda c: c["partition"]["radii"].__setitem__(0, 5), "impossible with 3 parts"),
        (lambda c: c["robustness"]["attacks"][0]["sanitized"]["attack_success"].__setitem__("rate", 0.0),
         "rate or interval"),
        (lambda c: c["robustness"]["attacks"][0].__setitem__("runs", 7), "runs"),
        (lambda c: clean_arm(c)["attack_success"].__setitem__("rate", 0.0), "rate or interval"),
        (lambda c: clean_arm(c).__setitem__(
            "attack_success", {"successes": 0, "trials": 1, "rate": 0.0, "wilson95": list(wilson_interval(0, 1))}),
         "different trial counts"),
        (part_sizes, "part sizes do not follow from hashing"),
        (accuracy, "does not follow from the predictions, radii and test labels"),
    ]
    for edit, message in cases:
        result = verify_certificate(forged(edit), train, test_dataset=test)
        assert not result.ok and any(message in p for p in result.problems), (message, result.problems)
    other = verify_certificate(base, train, test_dataset=train)
    assert any("test set given is not the one" in p for p in other.problems)


# -- the hostile corpus ----------------------------------------------------------------------------
# file -> what the FAILED line says with the issuer's public key
EXPECTED = {
    "deep_nesting": "levels deep", "deep_nesting_10k": "10000 levels deep",
    "duplicate_nested_key": "duplicate key 'successes'", "duplicate_top_level_key": "duplicate key 'bound'",
    "empty": "the file is empty", "huge_integer": "not a readable certificate",
    "infinity_value": "-Infinity is not a JSON number", "nan_value": "NaN is not a JSON number",
    "not_utf8": "not UTF-8", "overflowing_number": "overflows a float",
    "pickle_renamed": "is a Python pickle", "pickle_protocol0_renamed": "not valid JSON",
    "schema_type_confusion": "schema: $.audit.rounds", "top_level_array": "not an object",
    "truncated": "not valid JSON",
    "signature_stripped": "not signed", "signature_by_other_key": "not by the given public key",
    "signature_key_swapped": "key_id is not the hash",
    **{name: "signature does not match" for name in (
        "resealed_audit_configuration", "resealed_audit_undrop", "resealed_bound_assumptions_removed",
        "resealed_bound_conservative_slack", "resealed_bound_rho_consistent", "resealed_partition_accuracy",
        "resealed_partition_radii_only", "resealed_partition_votes_consistent", "resealed_robustness_consistent",
        "resealed_robustness_rate_only", "resealed_script_strings")},
}
# Forgeries without the issuer's key: stripping the signature or signing with one's own key gives a
# self-consistent file that only --public-key can refuse; verify says so plainly.
ACCEPTED_WITHOUT_KEY = {"signature_stripped": "warning: UNSIGNED", "signature_by_other_key": "carried inside"}


def test_the_corpus_and_the_expectations_match():
    assert {p.stem for p in HOSTILE.glob("*.json")} == set(EXPECTED)


def _verify_cli(capsys, *args):
    code = main(["verify", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_hostile_certificate_is_rejected_with_a_clear_error(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the pickles would create HOSTILE_PICKLE_RAN here if ever loaded
    path = (HOSTILE / f"{name}.json").resolve()
    code, out = _verify_cli(capsys, path, "--public-key", ISSUER.resolve())
    failed = [line for line in out.splitlines() if line.startswith("FAILED: ")]
    assert code == 1 and failed, out
    assert any(EXPECTED[name] in line for line in failed), out
    assert "Traceback" not in out and not (tmp_path / "HOSTILE_PICKLE_RAN").exists()
    code, out = _verify_cli(capsys, path)
    assert (code == 0) == (name in ACCEPTED_WITHOUT_KEY), out
    if name in ACCEPTED_WITHOUT_KEY:
        assert ACCEPTED_WITHOUT_KEY[name] in out
    assert not (tmp_path / "HOSTILE_PICKLE_RAN").exists()


def test_the_genuine_control_passes_every_check(capsys):
    code, out = _verify_cli(capsys, GENUINE, "--public-key", ISSUER, "--data", "digits")
    assert code == 0, out
    assert "checked: partition accuracies on the test set" in out and "FAILED" not in out


# -- the report ------------------------------------------------------------------------------------
def test_report_escapes_every_string_from_the_certificate(tmp_path):
    cert = json.loads((HOSTILE / "resealed_script_strings.json").read_text())
    payload = "<script>alert('certificate')</script>"
    cert["audit"]["configuration"]["policy"] = payload
    cert["audit"]["versions"]["torch"] = payload
    cert["audit"]["seeds"]["x<img src=x onerror=alert(1)>"] = 1
    cert["bound"]["theorem"] = payload
    cert["robustness"]["label"] = cert["robustness"]["attacks"][0]["measure"] = payload
    cert["robustness"]["proxy"]["train_size"] = payload
    cert["partition"]["hash"] = cert["partition"]["guarantee"] = payload
    cert["audit"]["rounds"][0]["audit"] = {"mode": "drop", "policies": {payload: {
        "embedding": payload, "would_drop": [0], "per_class": {}}}}
    text = write_report(cert, tmp_path).read_text()
    assert text.count("<script>") == 1  # the report's own image check, nothing from the certificate
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert text.count("&lt;script&gt;alert(&#x27;certificate&#x27;)&lt;/script&gt;") >= 10


# -- certify ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--subset-per-class", "0"], "--subset-per-class must be >= 1, got 0"),
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
    (["--epochs", "3", "--warmup", "4"], "--epochs 3 ends before the sanitizer's first round"),
    (["--every", "0"], "--every must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--width", "0"], "--width must be >= 1"),
    (["--partitions", "-2"], "--partitions must be >= 0"),
    (["--partitions", "3", "--partition-epochs", "2", "--warmup", "2", "--epochs", "5"], "part models"),
    (["--attacks", "label_flip", "--proxy-epochs", "1", "--warmup", "1"], "proxy arm"),
    (["--attacks", "no_such_attack"], "unknown attacks no_such_attack"),
    (["--policy", "no_such_policy"], "unknown policy"),
    (["--policy-option", "threshold"], "KEY=VALUE"),
    (["--poisons", "missing.npz"], "--poisons missing.npz: no such file"),
    (["--signing-key", "missing.pem"], "cannot read the signing key missing.pem"),
])
def test_certify_refuses_bad_arguments_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    def no_work(*_a, **_k):
        raise AssertionError("certify started work before checking its arguments")

    monkeypatch.setattr(cert_command, "load_source", no_work)
    parser = argparse.ArgumentParser()
    cert_command.register(parser.add_subparsers())
    parsed = parser.parse_args(["certify", "--out", str(tmp_path / "c.json"), *args])
    assert parsed.handler(parsed) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sanitizer certify: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "c.json").exists()


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread (and much faster when the machine is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_certify_signs_and_prints_a_summary_of_every_section(tmp_path, capsys, keys, one_thread):
    out = tmp_path / "run" / "cert.json"
    code = main(["certify", "--data", "digits", "--subset-per-class", "5", "--width", "4", "--epochs", "2",
                 "--warmup", "1", "--every", "1", "--attacks", "label_flip", "--runs", "1", "--proxy-per-class", "5",
                 "--partitions", "2", "--out", str(out), "--signing-key", str(keys[0][0])])
    printed = capsys.readouterr().out
    assert code == 0
    cert = json.loads(out.read_text())
    assert f"signed:      ed25519 key {cert['signature']['key_id']}" in printed
    lines = printed.splitlines()
    assert any(line.startswith("audit       50 examples, 1 rounds") for line in lines)
    assert any(line.startswith("bound       max ρ") for line in lines)
    row = next(line for line in lines if line.strip().startswith("label_flip"))
    success = cert["robustness"]["attacks"][0]["sanitized"]["attack_success"]
    # four intervals: undefended, sanitized, the clean model, poisons dropped
    assert f"({success['successes']}/{success['trials']})" in row and row.count("[") == 4
    assert any(line.startswith("partition   2 part models, mean part accuracy") for line in lines)
    assert any("certified radius: median" in line for line in lines)
    assert len(cert["partition"]["part_accuracies"]) == 2 and len(cert["partition"]["votes"]) == 449
    code, verified = _verify_cli(capsys, out, "--public-key", keys[0][1], "--data", "digits")
    assert code == 0 and "checked: partition hash parts of the dataset" in verified, verified
    assert os.path.exists(out.parent / "report" / "report.html")
