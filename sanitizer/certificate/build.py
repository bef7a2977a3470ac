"""Assemble a certificate from a sanitizer (audit + bound) and optional robustness/partition sections."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sanitizer.certificate.audit import dataset_fingerprint, json_safe, seal_certificate
from sanitizer.certificate.bound import BoundRecorder, bound_section
from sanitizer.certificate.schema import SCHEMA_VERSION, validate
from sanitizer.certificate.signing import load_private_key, sign_certificate
from sanitizer.certificate.strict import read_certificate
from sanitizer.errors import SanitizerError


def library_versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "sanitizer": version("sanitizer"), "torch": torch.__version__,
            "numpy": np.__version__, "faiss": version("faiss-cpu") or version("faiss-gpu-cu12"),
            "scikit-learn": version("scikit-learn"), "cuda": torch.version.cuda, "platform": platform.platform()}


def sanitizer_options(sanitizer) -> dict[str, Any]:
    """The options that rebuild an equivalent :class:`~sanitizer.Sanitizer` on other data (for proxy and
    partition runs): its :class:`~sanitizer.config.SanitizerConfig` without the run-specific fields."""
    return sanitizer.config.portable()


def find_recorder(sanitizer) -> BoundRecorder | None:
    return next((h for h in getattr(sanitizer, "round_hooks", []) if isinstance(h, BoundRecorder)), None)


def build_certificate(
    sanitizer,
    path: str | Path | None = None,
    *,
    train_config=None,
    dataset_source: dict[str, Any] | None = None,
    poison_indices=None,
    seeds: dict[str, int | None] | None = None,
    robustness: dict[str, Any] | None = None,
    partition: dict[str, Any] | None = None,
    report_dir: str | Path | None = None,
    signing_key=None,
) -> dict[str, Any]:
    """The certificate of ``sanitizer``'s run as a dict (written to ``path`` when given).

    ``robustness`` and ``partition`` are sections from :func:`measure_robustness` and
    :func:`partition_certificate`; ``dataset_source`` says how to reload the data for
    ``sanitizer verify`` (e.g. ``{"name": "digits"}``); ``poison_indices`` marks known poisons
    in the report. The bound section needs a :class:`BoundRecorder` attached before training.
    ``signing_key`` (an ed25519 private key: a PEM path, PEM bytes or a key object) signs every
    section (see :mod:`sanitizer.certificate.signing`); it is loaded before anything is computed.

    Example:
        >>> BoundRecorder.attach(sanitizer)  # doctest: +SKIP
        >>> train_classifier(model, train_set, config, sanitizer=sanitizer)  # doctest: +SKIP
        >>> cert = sanitizer.certificate("cert.json", train_config=config, report_dir="report")  # doctest: +SKIP
    """
    key = load_private_key(signing_key) if signing_key is not None else None
    if not sanitizer.history:
        raise SanitizerError("the sanitizer has run no rounds yet; certify after training (rounds start at "
                             f"epoch warmup={sanitizer.warmup})")
    dataset = dataset_fingerprint(sanitizer.embed_dataset)
    dataset["source"] = dataset_source
    dataset["poison_indices"] = sorted(int(i) for i in poison_indices) if poison_indices is not None else None
    configuration = {**sanitizer.config.to_dict(),
                     "train_config": train_config.to_dict() if hasattr(train_config, "to_dict") else train_config}
    cert: dict[str, Any] = {
        "schema": "sanitizer-certificate", "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "audit": json_safe({
            "dataset": dataset, "configuration": configuration, "versions": library_versions(),
            "seeds": {"sanitizer": sanitizer.seed,
                      "train": getattr(train_config, "seed", None), **(seeds or {})},
        }),
    }
    cert["audit"].update({"genesis_hash": "", "rounds": json_safe(sanitizer.history),
                          "dropped": [int(i) for i in sanitizer.dropped]})
    cert["bound"] = json_safe(bound_section(sanitizer.history))
    cert["robustness"] = json_safe(robustness)
    cert["partition"] = json_safe(partition)
    seal_certificate(cert)
    if key is not None:
        sign_certificate(cert, key)
    errors = validate(cert)
    if errors:  # a bug on our side, not the user's
        raise RuntimeError("the certificate does not match its schema: " + "; ".join(errors[:5]))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(cert, indent=1, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    if report_dir is not None:
        from sanitizer.certificate.report import write_report

        ds = sanitizer.embed_dataset
        write_report(cert, report_dir, recorder=find_recorder(sanitizer), images=getattr(ds, "images", None),
                     labels=sanitizer.labels, poison_indices=poison_indices, last_scores=sanitizer.last_scores,
                     keep=sanitizer.keep, audit_scores=getattr(sanitizer, "audit_scores", None))
    return cert


def load_certificate(path: str | Path) -> dict[str, Any]:
    """Read a certificate JSON file strictly (plain JSON; nothing is executed; duplicate keys, NaN and
    deep nesting are refused with a :class:`~sanitizer.certificate.strict.CertificateFormatError`)."""
    return read_certificate(path)


