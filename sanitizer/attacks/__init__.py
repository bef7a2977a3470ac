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
# isort: split
from sanitizer.attacks import (  # noqa: E402,F401  (gradient-matching family)
    adaptive,
    gradient_matching,
    metapoison,
    sleeper_agent,
)

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
