"""The audit trail: dataset fingerprint, canonical hashing, the chain of round records, verification.

Hashes are SHA-256 over canonical JSON (sorted keys, no spaces, no NaN). Each round record holds
``prev_hash`` (the previous round's ``hash``, or the hash of the certificate's header for the first
round) and its own ``hash`` over everything else in the record, so editing, removing, inserting or
reordering a round breaks the chain. A final ``seal`` hashes the whole certificate. The chain proves
integrity only relative to a seal published elsewhere (a log, a ticket): without a signature
(:mod:`sanitizer.certificate.signing`) anyone can rebuild a consistent chain and seal from scratch.
Verification lives in :mod:`sanitizer.certificate.verify`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sanitizer.embeddings import iterate_batches
from sanitizer.errors import SanitizerError, check_map_dataset
from sanitizer.options import json_safe

FINGERPRINT_VERSION = "sanitizer-dataset-v1"


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
    """Hash of the whole certificate except the seal itself and the signature (which covers the seal)."""
    return sha256_of({k: v for k, v in cert.items() if k not in ("seal", "signature")})


def seal_certificate(cert: dict[str, Any]) -> dict[str, Any]:
    """(Re)compute ``cert``'s genesis hash, round chain and seal in place; return ``cert``.

    Anyone can do this after editing a certificate, which is why an unsigned seal proves only that a
    file is self-consistent; a signature made before the edit no longer matches.
    """
    audit = cert["audit"]
    audit["genesis_hash"], audit["rounds"] = chain_rounds(header_of(cert), audit["rounds"])
    cert["seal"] = {"algorithm": "sha256", "head": audit["rounds"][-1]["hash"] if audit["rounds"]
                    else audit["genesis_hash"], "hash": ""}
    cert["seal"]["hash"] = seal_of(cert)
    return cert
