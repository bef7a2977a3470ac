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

# Importing an attack module registers it.
from sanitizer.attacks import gradient_matching  # noqa: E402,F401  (gradient-matching family)
from sanitizer.attacks import adaptive, metapoison, sleeper_agent  # noqa: E402,F401  (gradient-matching family)
# isort: split
from sanitizer.attacks import (  # noqa: E402,F401  (feature-space, indiscriminate and backdoor attacks)
    adversarial_poisons,
    badnets,
    bullseye_polytope,
    clean_label_backdoor,
    contrastive,
    feature_collision,
    label_flip,
    secure_release,
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
