"""Bundled poisoning attacks, one file each, behind :func:`make_attack`."""

from sanitizer.attacks.base import (
    Attack,
    PoisonSet,
    ThreatModel,
    available_attacks,
    make_attack,
    project_linf,
    quantize,
    register_attack,
)

__all__ = [
    "Attack",
    "PoisonSet",
    "ThreatModel",
    "available_attacks",
    "make_attack",
    "project_linf",
    "quantize",
    "register_attack",
]
