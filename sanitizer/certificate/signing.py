"""Ed25519 signatures of certificates: who issued a certificate, not only that it is self-consistent.

The seal is a hash over the certificate itself, so anyone who edits a certificate can recompute it.
A signature cannot be recomputed without the issuer's private key. It covers the canonical JSON
(sorted keys, no spaces, UTF-8, no NaN) of the whole certificate except the ``signature`` section:
every section (audit, bound, robustness, partition, seal, ...) and every field in them.

The signature section also carries the public key, so a signed certificate can be checked on its
own; that shows it is intact relative to the key inside it, and anyone can sign with a key of their
own. Origin needs the issuer's public key from somewhere the certificate's holder cannot change:
``sanitizer verify cert.json --public-key issuer.pub.pem``.

Keys are PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key), as written by
``sanitizer keygen --out key.pem`` or by ``openssl genpkey -algorithm ed25519 -out key.pem`` and
``openssl pkey -in key.pem -pubout -out key.pub.pem``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sanitizer.certificate.audit import canonical_json
from sanitizer.errors import SanitizerError

ALGORITHM = "ed25519"
COVERS = ("canonical JSON (sorted keys, separators ',' and ':', UTF-8, no NaN) of the whole certificate "
          "without its 'signature' section")
UNSIGNED_NOTE = ("UNSIGNED: this certificate proves only integrity (it is self-consistent), not origin: anyone "
                 "who edits it can recompute its seal. Check it against a seal published elsewhere (--seal) or "
                 "have the issuer sign it (certify --signing-key) and verify with their --public-key.")

KeyLike = str | os.PathLike | bytes | Ed25519PublicKey


def public_key_path(private_path: str | Path) -> Path:
    """Where :func:`generate_key_pair` puts the public key of ``private_path``: key.pem -> key.pub.pem."""
    p = Path(private_path)
    return p.with_name((p.name[:-4] if p.name.endswith(".pem") else p.name) + ".pub.pem")


def generate_key_pair(out: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new ed25519 private key to ``out`` (PEM, readable by its owner only) and its public key
    beside it (:func:`public_key_path`); return both paths.

    Example:
        >>> private, public = generate_key_pair("keys/issuer.pem")  # doctest: +SKIP
    """
    private_path, public_path = Path(out), public_key_path(out)
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing and not overwrite:
        raise SanitizerError(f"{' and '.join(existing)} already exist; refusing to overwrite a key (pass "
                             "--force to replace it)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(public_pem(key.public_key()))
    return private_path, public_path


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte public key: the name a certificate gives its signer."""
    return hashlib.sha256(_raw(key)).hexdigest()


def _pem_bytes(source, what: str) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        return source, f"the {what} given"
    try:
        return Path(source).read_bytes(), str(source)
    except OSError as exc:
        raise SanitizerError(f"cannot read the {what} {source}: {exc.strerror or exc}") from None


def load_private_key(source: str | os.PathLike | bytes | Ed25519PrivateKey) -> Ed25519PrivateKey:
    """An ed25519 private key from a PEM file, PEM bytes or a key object, with a clear error otherwise."""
    if isinstance(source, Ed25519PrivateKey):
        return source
    data, name = _pem_bytes(source, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SanitizerError(f"{name} is encrypted with a passphrase; write it unencrypted (e.g. openssl pkey "
                             "-in key.pem -out plain.pem) and keep that file private") from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " (that is a public key; sign with the private one)" if b"PUBLIC KEY" in data else ""
        raise SanitizerError(f"{name} is not a PEM private key{hint}; make one with `sanitizer keygen --out "
                             "key.pem`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SanitizerError(f"{name} is a {type(key).__name__.lstrip('_')}, not an ed25519 key; make one with "
                             "`sanitizer keygen --out key.pem`")
    return key


def load_public_key(source: KeyLike) -> Ed25519PublicKey:
    """An ed25519 public key from a PEM file, PEM bytes or a key object, with a clear error otherwise."""
    if isinstance(source, Ed25519PublicKey):
        return source
    data, name = _pem_bytes(source, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        hint = " (that is a private key: pass the .pub.pem file)" if b"PRIVATE KEY" in data else ""
        raise SanitizerError(f"{name} is not a PEM public key{hint}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SanitizerError(f"{name} is not an ed25519 public key")
    return key


def signed_bytes(cert: dict[str, Any]) -> bytes:
    """Exactly the bytes the signature covers (see :data:`COVERS`)."""
    return canonical_json({k: v for k, v in cert.items() if k != "signature"}).encode("utf-8")


def sign_certificate(cert: dict[str, Any], private_key) -> dict[str, Any]:
    """Add (or replace) ``cert["signature"]``, signing every other section with ``private_key``
    (a path, PEM bytes or an :class:`Ed25519PrivateKey`); return ``cert``."""
    key = load_private_key(private_key)
    public = key.public_key()
    value = key.sign(signed_bytes(cert))
    cert["signature"] = {"algorithm": ALGORITHM, "key_id": key_id(public),
                         "public_key": base64.b64encode(_raw(public)).decode("ascii"), "covers": COVERS,
                         "value": base64.b64encode(value).decode("ascii")}
    return cert


def _b64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SanitizerError(f"the signature's {what} is not base64") from None
    if len(raw) != size:
        raise SanitizerError(f"the signature's {what} has {len(raw)} bytes, an ed25519 {what} has {size}")
    return raw


def check_signature(cert: dict[str, Any], public_key: KeyLike | None = None) -> tuple[list[str], list[str], str]:
    """``(problems, notes, checked)`` of a (schema-valid) certificate's signature.

    With ``public_key`` the certificate must be signed by exactly that key; without one a signature
    is checked against the key it carries, and the notes say what that does and does not show.
    """
    expected = load_public_key(public_key) if public_key is not None else None
    sig = cert.get("signature")
    if sig is None:
        if expected is not None:
            return ([f"the certificate is not signed, but a public key was given (key {key_id(expected)[:16]}…): "
                     "it cannot show that this key's holder issued it (a signature may have been stripped)"], [],
                    "signature (none)")
        return [], [UNSIGNED_NOTE], "signature (none: unsigned)"
    try:
        embedded = Ed25519PublicKey.from_public_bytes(_b64(sig["public_key"], 32, "public key"))
        value = _b64(sig["value"], 64, "value")
    except (SanitizerError, ValueError) as exc:
        return [f"signature: {exc}"], [], "signature"
    problems, notes = [], []
    if sig["key_id"] != key_id(embedded):
        problems.append("signature: its key_id is not the hash of its public key")
    if expected is not None and _raw(expected) != _raw(embedded):
        problems.append(f"signed by key {key_id(embedded)[:16]}…, not by the given public key "
                        f"{key_id(expected)[:16]}…: someone other than that key's holder signed it")
    try:
        (expected or embedded).verify(value, signed_bytes(cert))
    except InvalidSignature:
        problems.append("the ed25519 signature does not match the certificate: it was edited after signing "
                        "(recomputing the seal does not help)")
    if expected is None and not problems:
        notes.append(f"signed by key {key_id(embedded)[:16]}… carried inside the certificate: this shows the file "
                     "is intact since that key signed it, not who holds the key; pass the issuer's --public-key "
                     "to check origin")
    return problems, notes, f"ed25519 signature (key {key_id(expected or embedded)[:16]}…)"
