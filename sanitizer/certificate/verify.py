"""Verification of a certificate: strict parsing, schema, hash chain, seal, signature, and everything
that can be recomputed from the certificate's own numbers or from the data.

    from sanitizer.certificate import verify_certificate
    result = verify_certificate("cert.json", train_set, public_key="issuer.pub.pem")
    result.ok, result.problems, result.notes

What is recomputed: the totals and per-class sums of every round from the rounds; the bound's µ̂ and
slack of every round and its summary from the rounds; every rate and Wilson interval from its
successes and trials; the partition's predictions and radii from its votes, and its certified
accuracy curve's internal limits. Given the training data: the dataset fingerprint and the sizes of
the partition's hash parts; given the test data: the partition's clean and certified accuracy.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from sanitizer.certificate.audit import dataset_fingerprint, header_of, seal_of, sha256_of
from sanitizer.certificate.bound import bound_section, slack_terms
from sanitizer.certificate.partition import certified_accuracy, certify_votes, dataset_part_sizes
from sanitizer.certificate.schema import validate
from sanitizer.certificate.signing import check_signature, load_public_key
from sanitizer.certificate.strict import CertificateFormatError, parse_certificate, read_certificate
from sanitizer.embeddings import iterate_batches
from sanitizer.noise_screen import gradient_rounds
from sanitizer.stats import wilson_interval


@dataclass
class Verification:
    """Outcome of :func:`verify_certificate`: ``ok`` and a list of ``problems`` (empty when ok), what was
    ``checked``, and ``notes`` on what the result does not show (e.g. an unsigned certificate's origin)."""

    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    certificate: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def signed(self) -> bool:
        return bool(self.certificate and self.certificate.get("signature"))


def _close(a: float | None, b: float | None, rel: float = 1e-9, abs_tol: float = 1e-12) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol)


def as_certificate(cert: Any) -> dict[str, Any]:
    """A certificate from a path, JSON text/bytes or a dict, parsed strictly (a dict is round-tripped
    through JSON so NaN, deep nesting and non-JSON values are refused the same way as in a file)."""
    if isinstance(cert, (str, os.PathLike)) and not (isinstance(cert, str) and cert.lstrip().startswith("{")):
        return read_certificate(cert)
    if isinstance(cert, (str, bytes)):
        return parse_certificate(cert)
    if not isinstance(cert, dict):
        raise CertificateFormatError(f"expected a certificate path or dict, got {type(cert).__name__}")
    try:
        text = json.dumps(cert, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise CertificateFormatError(f"the certificate holds a value JSON cannot: {exc}") from None
    except TypeError as exc:
        raise CertificateFormatError(f"the certificate holds a non-JSON value: {exc}") from None
    except RecursionError:
        raise CertificateFormatError("the certificate nests too deeply to be JSON") from None
    return parse_certificate(text)


def verify_certificate(cert: Any, dataset: Dataset | None = None, *, public_key=None, seal: str | None = None,
                       test_dataset: Dataset | None = None) -> Verification:
    """Check a certificate (a path or a dict): strict JSON, schema, hash chain, seal, signature, and
    every number that can be recomputed (see the module docstring).

    ``dataset``: the training set it was made on (checks the fingerprint and the partition's parts);
    ``public_key``: the issuer's ed25519 public key (a PEM path, PEM bytes or a key object): the
    certificate must carry a valid signature by exactly that key; ``seal``: a seal published
    elsewhere, which the certificate's seal must equal; ``test_dataset``: the test set of the
    partition certificate (recomputes its accuracies). Problems with the certificate are returned in
    ``.problems``, never raised; an unreadable ``public_key`` raises :class:`SanitizerError`.

    Example:
        >>> from sanitizer.certificate import verify_certificate
        >>> result = verify_certificate("cert.json", train_set, public_key="issuer.pub.pem")  # doctest: +SKIP
        >>> result.ok, result.problems, result.notes  # doctest: +SKIP
    """
    key = load_public_key(public_key) if public_key is not None else None  # the caller's error: raise it
    result = Verification()
    try:
        cert = as_certificate(cert)
    except CertificateFormatError as exc:
        result.problems.append(str(exc))
        return result
    result.certificate = cert
    schema_errors = validate(cert)
    if schema_errors:
        result.problems += [f"schema: {e}" for e in schema_errors[:10]]
        return result
    result.checked.append("strict JSON and schema")
    result.problems += _chain(cert)
    result.checked.append(f"hash chain ({len(cert['audit']['rounds'])} rounds)")
    if cert["seal"]["hash"] != seal_of(cert):
        result.problems.append("the seal does not match the certificate (a section outside the rounds was edited)")
    result.checked.append("seal")
    if seal is not None:
        result.problems += _published_seal(cert, seal)
        result.checked.append("seal against the published one")
    problems, notes, checked = check_signature(cert, key)
    result.problems += problems
    result.notes += [n for n in notes if seal is None or "UNSIGNED" not in n]
    if seal is not None and not cert.get("signature") and not problems:
        result.notes.append("unsigned, checked against the published seal: it is the certificate that was "
                            "published; its origin rests on where that seal was published")
    result.checked.append(checked)
    result.problems += _rounds(cert) + _sections(cert)
    result.checked.append("recomputed: rounds' totals, bound summary, rates and intervals, partition radii")
    if dataset is not None:
        actual = dataset_fingerprint(dataset)
        result.problems += _dataset(cert, actual)
        result.checked.append("dataset fingerprint")
        if cert["partition"] is not None:
            result.problems += _partition_parts(cert["partition"], dataset, actual["fingerprint"])
            result.checked.append("partition hash parts of the dataset")
    if test_dataset is not None and cert["partition"] is not None:
        result.problems += _partition_accuracy(cert["partition"], test_dataset)
        result.checked.append("partition accuracies on the test set")
    return result


def _published_seal(cert: dict[str, Any], seal: str) -> list[str]:
    published = seal.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", published):
        return [f"the published seal {seal[:70]!r} is not a SHA-256 hex digest (64 hex characters)"]
    if cert["seal"]["hash"] != published:
        return [f"the certificate's seal {cert['seal']['hash'][:16]}… is not the published seal {published[:16]}…: "
                "this is not the certificate that was published"]
    return []


def _chain(cert: dict[str, Any]) -> list[str]:
    audit, problems = cert["audit"], []
    genesis = sha256_of(header_of(cert))
    if audit["genesis_hash"] != genesis:
        problems.append("the header (dataset, configuration, versions, seeds) was edited: its hash is "
                        f"{genesis[:16]}…, the chain starts from {audit['genesis_hash'][:16]}…")
    prev = audit["genesis_hash"]
    for i, record in enumerate(audit["rounds"]):
        if record["prev_hash"] != prev:
            problems.append(f"round {i}: prev_hash does not match the previous link (a round was removed, "
                            "inserted or reordered)")
        body = {k: v for k, v in record.items() if k != "hash"}
        if sha256_of(body) != record["hash"]:
            problems.append(f"round {i} (epoch {record.get('epoch')}): its content was edited (hash mismatch)")
        prev = record["hash"]
    if cert["seal"]["head"] != prev:
        problems.append("the seal's head is not the last round's hash (rounds were added or removed)")
    return problems


def _rounds(cert: dict[str, Any]) -> list[str]:
    """The totals must follow from the rounds (catches a chain rebuilt around a forged summary)."""
    audit, problems = cert["audit"], []
    size = audit["dataset"]["size"]
    if sum(audit["dataset"]["class_counts"].values()) != size:
        problems.append("dataset: the class counts do not add up to its size")
    dropped: set[int] = set()
    cumulative = audit["configuration"].get("cumulative", True)
    epoch = -1
    for i, record in enumerate(audit["rounds"]):
        now = record["dropped_now"]
        if record["round"] != i or record["epoch"] < epoch:
            problems.append(f"round {i}: its number or epoch is out of sequence")
        epoch = record["epoch"]
        if any(j >= size for j in now):
            problems.append(f"round {i}: drops an index beyond the dataset's {size} examples")
        dropped = (dropped | set(now)) if cumulative else set(now)
        if record["dropped_total"] != len(dropped):
            problems.append(f"round {i}: dropped_total {record['dropped_total']} but the rounds drop {len(dropped)}")
        per_class = record["per_class"].values()
        if sum(c["dropped_now"] for c in per_class) != len(now):
            problems.append(f"round {i}: per-class drops sum to {sum(c['dropped_now'] for c in per_class)}, "
                            f"dropped_now lists {len(now)}")
        if sum(c["candidates"] for c in per_class) != record["candidates"]:
            problems.append(f"round {i}: per-class candidates do not add up to its candidates")
        if sum(c["kept"] for c in per_class) != size - record["dropped_total"]:
            problems.append(f"round {i}: per-class kept examples do not add up to the size minus the drops")
    if sorted(dropped) != audit["dropped"]:
        problems.append("the list of dropped examples does not follow from the rounds")
    if any(j >= size for j in audit["dataset"].get("poison_indices") or []):
        problems.append(f"dataset: a known poison index lies beyond the dataset's {size} examples")
    return problems


def _sections(cert: dict[str, Any]) -> list[str]:
    """The checks of the optional sections the certificate has."""
    checks = (("bound", _bound), ("robustness", _robustness), ("partition", _partition))
    return [p for name, check in checks if cert[name] is not None for p in check(cert[name], cert)]


def _bound(bound: dict[str, Any], cert: dict[str, Any]) -> list[str]:
    """Every round's µ̂ and slack follow from its ρ, ∇max, ‖∇L‖ and L; the summary follows from the rounds."""
    rounds = gradient_rounds(cert["audit"]["rounds"])
    stats = [r.get("extras", {}).get("bound") for r in rounds]
    if not stats or None in stats:
        return ["bound: a round lacks its measured quantities (extras.bound), so the bound does not follow"]
    problems = []
    for i, b in enumerate(stats):
        expected = slack_terms(b["rho"], b["grad_max"], b["grad_norm"], b["loss"])
        wrong = [k for k in ("mu_estimate", "slack") if not _close(expected[k], b[k])]
        if wrong:
            problems.append(f"round {i}: bound {' and '.join(wrong)} do not follow from its ρ, ∇max, ‖∇L‖ and L")
        if b["grad_norm"] > b["grad_max"] * (1 + 1e-9) + 1e-12:
            problems.append(f"round {i}: ‖∇L‖ exceeds ∇max (a mean gradient cannot exceed the largest one)")
        if b["n"] != cert["audit"]["dataset"]["size"] or b["n_kept"] > b["n"]:
            problems.append(f"round {i}: the bound's example counts do not match the dataset")
    expected = bound_section(rounds)
    wrong = [k for k in ("max_rho", "max_grad_max", "min_mu_estimate", "max_slack", "conservative_slack")
             if not _close(expected[k], bound.get(k))]
    if wrong:
        problems.append(f"bound: {', '.join(wrong)} do not follow from the rounds")
    return problems


def _robustness(rob: dict[str, Any], _cert: dict[str, Any]) -> list[str]:
    """Every rate and interval follows from its counts; trial counts agree between the arms and runs."""
    problems, proxy = [], rob["proxy"]
    for attack in rob["attacks"]:
        name = str(attack["attack"])[:40]
        arms = [attack[arm] for arm in ("undefended", "sanitized", "clean") if arm in attack]
        rates = [arm[k] for arm in arms for k in ("attack_success", "clean_accuracy")]
        for r in rates + [attack.get("poisons_dropped")]:
            if r is None:
                continue
            expected = wilson_interval(r["successes"], r["trials"])
            if r["successes"] > r["trials"] or not _close(r["rate"], r["successes"] / r["trials"] if r["trials"]
                                                          else None) \
                    or (expected is None) != (r["wilson95"] is None) \
                    or (expected and not all(_close(a, b) for a, b in zip(expected, r["wilson95"]))):
                problems.append(f"robustness of {name}: a rate or interval does not follow from its successes "
                                "and trials")
                break
        if len({arm["attack_success"]["trials"] for arm in arms}) > 1:
            problems.append(f"robustness of {name}: the arms (undefended, sanitized, clean) have different trial "
                            "counts")
        runs, test_size = proxy.get("runs"), proxy.get("test_size")
        if runs is not None and attack["runs"] != runs:
            problems.append(f"robustness of {name}: {attack['runs']} runs, the proxy records {runs}")
        if isinstance(runs, int) and isinstance(test_size, int) and any(
                arm["clean_accuracy"]["trials"] != runs * test_size for arm in arms):
            problems.append(f"robustness of {name}: clean accuracy is not measured on runs × test images")
    return problems


def _partition(part: dict[str, Any], _cert: dict[str, Any]) -> list[str]:
    """Predictions and radii follow from the votes; the certified-accuracy curve is within its limits."""
    problems = []
    k, n = part["partitions"], part["test_size"]
    radii = np.asarray(part["radii"], dtype=np.int64)
    if len(radii) != n or len(part.get("predictions", radii)) != n:
        return ["partition: the number of radii or predictions is not the test size"]
    if len(radii) and radii.max() > k // 2:
        problems.append(f"partition: a radius of {int(radii.max())} is impossible with {k} parts (at most {k // 2})")
    sizes = part.get("part_sizes")
    if sizes is not None and len(sizes) != k:
        problems.append(f"partition: {len(sizes)} part sizes for {k} parts")
    if len(part.get("part_accuracies") or []) not in (0, k):
        problems.append(f"partition: {len(part['part_accuracies'])} part accuracies for {k} parts")
    votes = part.get("votes")
    if votes is not None:
        voters = sum(1 for s in sizes if s > 0) if sizes is not None else k
        counts = np.asarray(votes, dtype=np.int64) if votes else np.zeros((0, 2), dtype=np.int64)
        if counts.ndim != 2 or len(counts) != n or (n and counts.shape[1] < 2):
            problems.append("partition: the votes are not one row of class counts per test example")
        elif n and (counts.sum(1) > voters).any():
            problems.append(f"partition: a test example has more votes than the {voters} part models")
        elif n:
            pred, radius = certify_votes(counts)
            if pred.tolist() != list(part.get("predictions", pred.tolist())) or radius.tolist() != radii.tolist():
                problems.append("partition: the predictions or certified radii do not follow from the votes")
    problems += _curve(part, radii)
    return problems


def _curve(part: dict[str, Any], radii: np.ndarray) -> list[str]:
    """Limits of the certified-accuracy curve that hold whatever the test labels are."""
    curve, n = part["certified_accuracy"], part["test_size"]
    acc = [c["accuracy"] for c in curve]
    if [c["radius"] for c in curve] != list(range(len(curve))) or (n and len(curve) != int(radii.max()) + 1):
        return ["partition: the certified-accuracy curve does not list radii 0 … the largest radius"]
    if acc and "clean_accuracy" in part and not _close(acc[0], part["clean_accuracy"]):
        return ["partition: the certified accuracy at radius 0 is not the clean accuracy"]
    for r, a in enumerate(acc):
        correct = a * n
        nxt = acc[r + 1] * n if r + 1 < len(acc) else 0.0
        if abs(correct - round(correct)) > 1e-6 or correct - nxt < -1e-6 or \
                correct - nxt > int((radii == r).sum()) + 1e-6:
            return [f"partition: the certified accuracy at radius {r} does not follow from the radii (it must count "
                    "whole test examples whose radius is at least r)"]
    return []


def _dataset(cert: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """The training set's fingerprint ``actual`` is the one the certificate records."""
    recorded = cert["audit"]["dataset"]
    if actual["fingerprint"] == recorded["fingerprint"]:
        return []
    what = [name for key, name in (("images_sha256", "images"), ("labels_sha256", "labels"))
            if actual[key] != recorded.get(key)]
    if actual["size"] != recorded.get("size"):
        what.insert(0, f"size ({actual['size']} vs {recorded.get('size')})")
    hint = (" (the certificate records known poisons: it was made on a poisoned training set, so verify against "
            "the same poisoned view, e.g. with --poisons)") if recorded.get("poison_indices") else ""
    return ["the dataset does not match the certificate's fingerprint"
            + (f": {', '.join(what)} differ" if what else "") + hint]


def _partition_parts(part: dict[str, Any], dataset: Dataset, fingerprint: str) -> list[str]:
    """The part sizes follow from hashing the training set (when the partition was trained on it)."""
    if part.get("train_fingerprint") is None or part.get("part_sizes") is None:
        return []
    if fingerprint != part["train_fingerprint"]:
        return []  # the partition was trained on another set (the Python API allows it); nothing to recompute
    if dataset_part_sizes(dataset, part["partitions"]) != part["part_sizes"]:
        return ["partition: the part sizes do not follow from hashing the training set"]
    return []


def _partition_accuracy(part: dict[str, Any], test_dataset: Dataset) -> list[str]:
    """Clean and certified accuracy follow from the predictions, the radii and the test labels."""
    fingerprint = dataset_fingerprint(test_dataset)["fingerprint"]
    if part.get("test_fingerprint") not in (None, fingerprint):
        return ["partition: the test set given is not the one the partition certificate was measured on"]
    if part.get("predictions") is None:
        return []
    labels = np.concatenate([np.asarray(y) for _x, y in iterate_batches(test_dataset, 4096)])
    pred, radii = np.asarray(part["predictions"]), np.asarray(part["radii"])
    if len(labels) != len(pred):
        return [f"partition: {len(pred)} predictions for {len(labels)} test examples"]
    clean = float((pred == labels).mean()) if len(labels) else 0.0
    curve = [c["accuracy"] for c in certified_accuracy(pred, radii, labels)]
    if not _close(clean, part.get("clean_accuracy", clean)) or len(curve) != len(part["certified_accuracy"]) or \
            not all(_close(a, c["accuracy"]) for a, c in zip(curve, part["certified_accuracy"])):
        return ["partition: the clean or certified accuracy does not follow from the predictions, radii and test "
                "labels"]
    return []
