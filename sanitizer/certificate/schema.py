"""The certificate's JSON Schema (``schema.json`` beside this file) and a small validator for it.

The validator implements the subset of JSON Schema 2020-12 that ``schema.json`` uses (type, const,
enum, required, properties, additionalProperties, items, minItems, maxItems, minimum, maximum,
pattern, oneOf, $ref to ``#/$defs/...``), so no extra dependency is needed.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMA_VERSION = 1

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The certificate schema as a dict."""
    text = resources.files("sanitizer.certificate").joinpath("schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def validate(instance: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every violation of the schema, as ``"<path>: <problem>"`` strings (empty when valid).

    Example:
        >>> validate({"schema": "sanitizer-certificate"})[:1]
        ['$: missing required property \\'schema_version\\'']
    """
    root = schema or load_schema()
    errors: list[str] = []
    _check(instance, root, root, "$", errors)
    return errors


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str, errors: list[str]) -> None:
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref}")
        _check(value, root["$defs"][ref.split("/")[-1]], root, path, errors)
    if "oneOf" in schema:
        found = []
        for option in schema["oneOf"]:
            sub: list[str] = []
            _check(value, option, root, path, sub)
            found.append(sub)
        matches = sum(not sub for sub in found)
        if matches == 0:  # report the problems of the closest form (e.g. the object, not the null)
            same_type = [sub for sub in found if not any(e.startswith(f"{path}: expected ") for e in sub)]
            errors.extend(min(same_type or found, key=len))
        elif matches > 1:
            errors.append(f"{path}: matches {matches} of the allowed forms, expected exactly 1")
        return
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            errors.append(f"{path}: expected {' or '.join(types)}, got {type(value).__name__}")
            return
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value[:40]!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: needs at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: allows at most {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                _check(item, schema["items"], root, f"{path}[{i}]", errors)
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: missing required property {name!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                _check(item, props[key], root, f"{path}.{key}", errors)
            elif extra is False:
                errors.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                _check(item, extra, root, f"{path}.{key}", errors)
