"""Strict reading of certificate files: plain JSON only, nothing executed, hostile input refused clearly.

Beyond :func:`json.loads`, a certificate is refused when it has a duplicate key (two parsers could
read two different certificates from one file), NaN, Infinity or a number too large for a float
(JSON has none of them), nesting deeper than :data:`MAX_DEPTH`, a size above :data:`MAX_BYTES`, text
that is not UTF-8, or a top level that is not an object. A Python pickle is recognised and refused;
it is never loaded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from sanitizer.errors import SanitizerError

MAX_DEPTH = 64
MAX_BYTES = 512 * 1024 * 1024
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


class CertificateFormatError(SanitizerError):
    """The file is not a well-formed certificate JSON; the message says what is wrong with it."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise CertificateFormatError(f"duplicate key {key[:60]!r}: a JSON object may name each key once "
                                         "(different readers would see different certificates)")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise CertificateFormatError(f"{name} is not a JSON number; a certificate holds only finite numbers")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise CertificateFormatError(f"the number {text[:40]} overflows a float; a certificate holds only finite "
                                     "numbers")
    return value


def nesting_depth(text: str) -> int:
    """The deepest nesting of objects and arrays in a JSON text (strings are skipped), without recursion."""
    depth = deepest = 0
    for ch in re.findall(r"[\[\]{}]", _STRING.sub('""', text)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_certificate(data: bytes | str, name: str = "the certificate") -> dict[str, Any]:
    """A certificate's JSON text (bytes or str) as a dict, refusing everything the module docstring lists.

    Example:
        >>> parse_certificate('{"a": 1, "a": 2}')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sanitizer.certificate.strict.CertificateFormatError: the certificate: duplicate key 'a': ...
    """
    if isinstance(data, bytes):
        if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise CertificateFormatError(f"{name} is a Python pickle, not JSON; pickles are never loaded "
                                         "(they can run code)")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CertificateFormatError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}); a "
                                         "certificate is a JSON file") from None
    if len(data) > MAX_BYTES:
        raise CertificateFormatError(f"{name} is larger than {MAX_BYTES // 2 ** 20} MiB; not a certificate")
    depth = nesting_depth(data)
    if depth > MAX_DEPTH:
        raise CertificateFormatError(f"{name} nests objects and arrays {depth} levels deep; at most {MAX_DEPTH} "
                                     "are allowed")
    try:
        value = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                           parse_float=_finite_float)
    except CertificateFormatError as exc:
        raise CertificateFormatError(f"{name}: {exc}") from None
    except json.JSONDecodeError as exc:
        hint = "" if exc.pos else " (the file is empty)" if not data.strip() else " (is it a JSON file at all?)"
        raise CertificateFormatError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                                     f"{exc.colno}{hint}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer with more digits than Python converts
        raise CertificateFormatError(f"{name} is not a readable certificate: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise CertificateFormatError(f"{name} holds a JSON {type(value).__name__}, not an object; is it a "
                                     "certificate?")
    return value


def read_certificate(path: str | Path) -> dict[str, Any]:
    """Read and parse a certificate file strictly (see :func:`parse_certificate`)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise CertificateFormatError(f"{path} is larger than {MAX_BYTES // 2 ** 20} MiB; not a certificate")
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_certificate(data, str(path))
