"""The audit trail: dataset fingerprint, canonical hashing, the chain of round records, verification.

Hashes are SHA-256 over canonical JSON (sorted keys, no spaces, no NaN). Each round record holds
``prev_hash`` (the previous round's ``hash``, or the hash of the certificate's header for the first
round) and its own ``hash`` over everything else in the record, so editing, removing, inserting or
reordering a round breaks the chain. A final ``seal`` hashes the whole certificate. The chain proves
integrity only relative to a seal published elsewhere (a log, a ticket): without a signature anyone
can rebuild a consistent chain from scratch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sanitizer.embeddings import iterate_batches
from sanitizer.errors import SanitizerError, check_map_dataset

FINGERPRINT_VERSION = "sanitizer-dataset-v1"


def json_safe(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays become Python ones, non-finite floats become None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return json_safe(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_of(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


# -- dataset fingerprint ---------------------------------------------------------------------------
def dataset_fingerprint(dataset: Dataset, batch_size: int = 1024) -> dict[str, Any]:
    """SHA-256 fingerprint of the examples (float32 bytes, C order) and labels (int64), in order.

    Images and labels are hashed as two streams so a mismatch can say which of them changed; the
    ``fingerprint`` combines both with the size and the example shape. Pass the un-augmented view.

    Example:
        >>> fp = dataset_fingerprint(train_set)  # doctest: +SKIP
        >>> fp["fingerprint"][:12]  # doctest: +SKIP
    """
    n = check_map_dataset(dataset)
    if n == 0:
        raise SanitizerError("cannot fingerprint an empty dataset")
    images, labels = hashlib.sha256(), hashlib.sha256()
    shape: tuple[int, ...] | None = None
    counts: dict[int, int] = {}
    for x, y in iterate_batches(dataset, batch_size):
        x = torch.as_tensor(x).detach().to("cpu", torch.float32).contiguous()
        y = torch.as_tensor(y).detach().to("cpu", torch.int64).contiguous()
        shape = shape or tuple(x.shape[1:])
        if tuple(x.shape[1:]) != shape:
            raise SanitizerError(f"examples of different shapes {shape} and {tuple(x.shape[1:])}: the "
                                 "fingerprint needs a fixed example shape")
        images.update(x.numpy().astype("<f4", copy=False).tobytes())
        labels.update(y.numpy().astype("<i8", copy=False).tobytes())
        for c, k in zip(*np.unique(y.numpy(), return_counts=True)):
            counts[int(c)] = counts.get(int(c), 0) + int(k)
    info = {"version": FINGERPRINT_VERSION, "size": n, "example_shape": list(shape or ()),
            "images_sha256": images.hexdigest(), "labels_sha256": labels.hexdigest()}
    return {**info, "fingerprint": sha256_of(info), "class_counts": {str(c): counts[c] for c in sorted(counts)}}


def example_hashes(images: torch.Tensor) -> list[str]:
    """SHA-256 of each example's float32 bytes (labels excluded): identity independent of position."""
    arr = images.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in arr.reshape(len(arr), -1)]


# -- the chain -------------------------------------------------------------------------------------
def chain_rounds(header: dict[str, Any], rounds: Iterable[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Return ``(genesis_hash, chained_rounds)``: each round gets ``prev_hash`` and ``hash``."""
    genesis = sha256_of(header)
    prev, out = genesis, []
    for record in rounds:
        body = {k: v for k, v in json_safe(record).items() if k not in ("prev_hash", "hash")}
        body["prev_hash"] = prev
        body["hash"] = prev = sha256_of(body)
        out.append(body)
    return genesis, out


def header_of(cert: dict[str, Any]) -> dict[str, Any]:
    """What the genesis hash covers: the schema, creation time and the audit minus its rounds."""
    audit = {k: v for k, v in cert["audit"].items() if k not in ("rounds", "genesis_hash", "dropped")}
    return {"schema": cert["schema"], "schema_version": cert["schema_version"], "created": cert["created"],
            "audit": audit}


def seal_of(cert: dict[str, Any]) -> str:
    """Hash of the whole certificate except the seal itself."""
    return sha256_of({k: v for k, v in cert.items() if k != "seal"})


# -- verification ----------------------------------------------------------------------------------
@dataclass
class Verification:
    """Outcome of :func:`verify_certificate`: ``ok`` and a list of ``problems`` (empty when ok)."""

    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_certificate(cert: dict[str, Any], dataset: Dataset | None = None) -> Verification:
    """Check a certificate's schema, hash chain, seal and internal consistency, and, when ``dataset``
    is given, that it is the dataset the certificate was made on.

    Example:
        >>> result = verify_certificate(json.load(open("cert.json")), dataset=train_set)  # doctest: +SKIP
        >>> result.ok, result.problems  # doctest: +SKIP
    """
    from sanitizer.certificate.schema import validate

    result = Verification()
    schema_errors = validate(cert)
    if schema_errors:
        result.problems += [f"schema: {e}" for e in schema_errors[:10]]
        return result
    result.checked.append("schema")
    audit = cert["audit"]
    genesis = sha256_of(header_of(cert))
    if audit["genesis_hash"] != genesis:
        result.problems.append("the header (dataset, configuration, versions, seeds) was edited: its hash is "
                               f"{genesis[:16]}…, the chain starts from {audit['genesis_hash'][:16]}…")
    prev = audit["genesis_hash"]
    for i, record in enumerate(audit["rounds"]):
        if record["prev_hash"] != prev:
            result.problems.append(f"round {i}: prev_hash does not match the previous link (a round was "
                                   "removed, inserted or reordered)")
        body = {k: v for k, v in record.items() if k != "hash"}
        if sha256_of(body) != record["hash"]:
            result.problems.append(f"round {i} (epoch {record.get('epoch')}): its content was edited "
                                   "(hash mismatch)")
        prev = record["hash"]
    result.checked.append(f"hash chain ({len(audit['rounds'])} rounds)")
    if cert["seal"]["head"] != prev:
        result.problems.append("the seal's head is not the last round's hash (rounds were added or removed)")
    if cert["seal"]["hash"] != seal_of(cert):
        result.problems.append("the seal does not match the certificate (a section outside the rounds "
                               "was edited)")
    result.checked.append("seal")
    result.problems += _consistency(audit) + _section_consistency(cert)
    result.checked.append("consistency of rounds, totals and summaries")
    if dataset is not None:
        recorded, actual = audit["dataset"], dataset_fingerprint(dataset)
        if actual["fingerprint"] != recorded["fingerprint"]:
            what = [name for key, name in (("images_sha256", "images"), ("labels_sha256", "labels"))
                    if actual[key] != recorded.get(key)]
            if actual["size"] != recorded.get("size"):
                what.insert(0, f"size ({actual['size']} vs {recorded.get('size')})")
            hint = (" (the certificate records known poisons: it was made on a poisoned training set, so "
                    "verify against the same poisoned view, e.g. with --poisons)") if recorded.get("poison_indices") \
                else ""
            result.problems.append("the dataset does not match the certificate's fingerprint"
                                   + (f": {', '.join(what)} differ" if what else "") + hint)
        result.checked.append("dataset fingerprint")
    return result


def _consistency(audit: dict[str, Any]) -> list[str]:
    """The totals must follow from the rounds (catches a chain rebuilt around a forged summary)."""
    problems = []
    dropped: set[int] = set()
    cumulative = audit["configuration"].get("cumulative", True)
    for i, record in enumerate(audit["rounds"]):
        now = record["dropped_now"]
        dropped = (dropped | set(now)) if cumulative else set(now)
        if record["dropped_total"] != len(dropped):
            problems.append(f"round {i}: dropped_total {record['dropped_total']} but the rounds drop {len(dropped)}")
        per_class_now = sum(c["dropped_now"] for c in record["per_class"].values())
        if per_class_now != len(now):
            problems.append(f"round {i}: per-class drops sum to {per_class_now}, dropped_now lists {len(now)}")
    if sorted(dropped) != audit["dropped"]:
        problems.append("the list of dropped examples does not follow from the rounds")
    return problems


def _section_consistency(cert: dict[str, Any]) -> list[str]:
    """Summaries that must follow from the recorded numbers: the bound's maxima and every rate."""
    from sanitizer.certificate.robustness import wilson_interval

    problems = []
    bound = cert.get("bound")
    if bound is not None:
        rhos = [r.get("extras", {}).get("bound", {}).get("rho") for r in cert["audit"]["rounds"]]
        if None in rhos or not rhos or not math.isclose(max(rhos), bound["max_rho"], rel_tol=1e-12):
            problems.append("bound.max_rho does not follow from the rounds")
    for attack in (cert.get("robustness") or {}).get("attacks", []):
        rates = [attack[arm][k] for arm in ("undefended", "sanitized") for k in ("attack_success", "clean_accuracy")]
        for r in rates + [attack.get("poisons_dropped")]:
            if r is None:
                continue
            expected = wilson_interval(r["successes"], r["trials"])
            if r["successes"] > r["trials"] or (r["trials"] and not math.isclose(
                    r["rate"], r["successes"] / r["trials"])) or (expected is None) != (r["wilson95"] is None) \
                    or (expected and not all(math.isclose(a, b, abs_tol=1e-12)
                                             for a, b in zip(expected, r["wilson95"]))):
                problems.append(f"robustness of {attack['attack']}: a rate or interval does not follow from its "
                                "successes and trials")
                break
    part = cert.get("partition")
    if part is not None and len(part["radii"]) != part["test_size"]:
        problems.append("partition: the number of radii is not the test size")
    return problems
