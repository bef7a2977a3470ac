"""The one option grammar of the package: ``KEY=VALUE`` items and ``name:key=value:...`` policy specs, and
:func:`json_safe`, which writes option values (and certificates) back as plain JSON.

Values are read as JSON (``250``, ``0.5``, ``[1, 2]``, ``"x"``), else ``true``/``false`` in any case as
booleans, else kept as text. The command line (``sanitizer attack --param``, ``sanitizer certify
--policy-option``), policy names (``make_policy("density:k=50")``) and the benchmarks (``--defenses``,
``--set``) all read options this way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sanitizer.errors import SanitizerError


def parse_value(text: str) -> Any:
    """``"250"`` → 250, ``"false"``/``"False"`` → False, ``"[1, 2]"`` → [1, 2], ``"x"`` → ``"x"``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"true": True, "false": False}.get(text.lower(), text)


def parse_key_values(items: list[str], option: str = "--param",
                     error: Callable[[str], BaseException] = SanitizerError) -> dict[str, Any]:
    """``["steps=250", "flip=false", "mode=x"]`` → ``{"steps": 250, "flip": False, "mode": "x"}``; keys are
    stripped. An item without ``=`` raises ``error`` naming ``option``.

    Example:
        >>> parse_key_values(["k=50", "two_sided=true"])
        {'k': 50, 'two_sided': True}
    """
    params = {}
    for item in items:
        if "=" not in item:
            raise error(f"{option} expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        params[key.strip()] = parse_value(text)
    return params


def parse_policy_spec(spec: str, error: Callable[[str], BaseException] = SanitizerError) -> tuple[str, dict[str, Any]]:
    """``"density:k=50:threshold=2.5"`` → ``("density", {"k": 50, "threshold": 2.5})``.

    Example:
        >>> parse_policy_spec("epic-0.2:embedding=features")
        ('epic-0.2', {'embedding': 'features'})
    """
    name, *parts = spec.split(":")
    if not name:
        raise error(f"a policy spec starts with the policy's name, got {spec!r}")
    return name, parse_key_values(parts, f"the options of {spec!r} (write name:key=value)", error)


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
