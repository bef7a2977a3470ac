"""Certificates of sanitized training runs: audit trail, EPIC bound, measured robustness, partition
aggregation, and an HTML report. See ``docs/certificate.md``.

Example:
    >>> from sanitizer.certificate import BoundRecorder
    >>> recorder = BoundRecorder.attach(sanitizer)  # doctest: +SKIP
    >>> train_classifier(model, train_set, config, sanitizer=sanitizer)  # doctest: +SKIP
    >>> cert = sanitizer.certificate("cert.json", train_config=config, report_dir="report")  # doctest: +SKIP
"""

from sanitizer.certificate.audit import Verification, dataset_fingerprint, verify_certificate
from sanitizer.certificate.bound import BoundRecorder, last_layer_statistics
from sanitizer.certificate.build import build_certificate, load_certificate, sanitizer_options
from sanitizer.certificate.partition import certify_votes, hash_partition, partition_certificate
from sanitizer.certificate.robustness import measure_robustness, wilson_interval
from sanitizer.certificate.schema import load_schema, validate

__all__ = [
    "BoundRecorder",
    "Verification",
    "build_certificate",
    "certify_votes",
    "dataset_fingerprint",
    "hash_partition",
    "last_layer_statistics",
    "load_certificate",
    "load_schema",
    "measure_robustness",
    "partition_certificate",
    "sanitizer_options",
    "validate",
    "verify_certificate",
    "wilson_interval",
]
