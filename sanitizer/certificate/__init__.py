"""Certificates of sanitized training runs: audit trail, EPIC bound, measured robustness, partition
aggregation, and an HTML report. See ``docs/certificate.md``.

Verify with ``from sanitizer.certificate import verify_certificate``:
``verify_certificate("cert.json", public_key="issuer.pub.pem").ok``.

Example:
    >>> from sanitizer.certificate import BoundRecorder
    >>> recorder = BoundRecorder.attach(sanitizer)  # doctest: +SKIP
    >>> train_classifier(model, train_set, config, sanitizer=sanitizer)  # doctest: +SKIP
    >>> cert = sanitizer.certificate("cert.json", train_config=config, report_dir="report")  # doctest: +SKIP
"""

from sanitizer.certificate.audit import dataset_fingerprint
from sanitizer.certificate.bound import BoundRecorder, last_layer_statistics
from sanitizer.certificate.build import build_certificate, load_certificate, sanitizer_options
from sanitizer.certificate.partition import certify_votes, hash_partition, partition_certificate
from sanitizer.certificate.schema import load_schema, validate
from sanitizer.certificate.signing import generate_key_pair, load_public_key, sign_certificate
from sanitizer.certificate.strict import CertificateFormatError, parse_certificate
from sanitizer.certificate.verify import Verification, verify_certificate
from sanitizer.stats import wilson_interval


def __getattr__(name: str):
    # measure_robustness trains victims against the bundled attacks: import them only when it is used,
    # so that building or verifying a certificate does not load all sixteen attack modules
    if name == "measure_robustness":
        from sanitizer.certificate.robustness import measure_robustness

        return measure_robustness
    raise AttributeError(f"module 'sanitizer.certificate' has no attribute {name!r}")

__all__ = [
    "BoundRecorder",
    "CertificateFormatError",
    "Verification",
    "build_certificate",
    "certify_votes",
    "dataset_fingerprint",
    "generate_key_pair",
    "hash_partition",
    "last_layer_statistics",
    "load_certificate",
    "load_public_key",
    "load_schema",
    "measure_robustness",
    "parse_certificate",
    "partition_certificate",
    "sanitizer_options",
    "sign_certificate",
    "validate",
    "verify_certificate",
    "wilson_interval",
]
