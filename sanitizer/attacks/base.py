"""Common API of the bundled attacks: the PoisonSet they produce, a registry, and input checks."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.data.views import PoisonedView

FORMAT_VERSION = 1


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round images in [0, 1] to 8-bit levels (what a saved PNG would hold)."""
    return images.clamp(0, 1).mul(255).round().div(255)


def project_linf(poisoned: torch.Tensor, base: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto the L∞ ball of radius ``eps`` around ``base`` and the [0, 1] box, then quantise so
    that the bound still holds after 8-bit rounding."""
    delta = (poisoned - base).clamp(-eps, eps)
    out = quantize(base + delta)
    # Rounding can step past the bound by < 1/510; pull such pixels one level back inside.
    over = (out - base).abs() > eps + 1e-6
    if over.any():
        step = torch.sign(out - base) / 255
        out = torch.where(over, out - step, out)
    return out


@dataclass
class PoisonSet:
    """What an attack crafted: which training examples it replaces and with what.

    ``indices`` index the training set the attack was crafted on; ``images`` (``[P, C, H, W]`` in
    [0, 1]) replace them and ``labels`` give their (possibly changed) labels. Targeted attacks
    record ``target_images``, ``target_labels`` (true classes) and ``adversarial_class``;
    backdoors record ``trigger`` (``[C, h, w]``) and ``source_class``. ``params`` holds every
    parameter and seed used.

    Example:
        >>> poisons = make_attack("gradient_matching", eps=16/255).craft(train_set, ...)  # doctest: +SKIP
        >>> poisons.save("poisons.npz"); same = PoisonSet.load("poisons.npz")  # doctest: +SKIP
        >>> poisoned_train = poisons.apply(train_set)  # doctest: +SKIP
    """

    attack: str
    indices: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    target_images: np.ndarray | None = None
    target_labels: np.ndarray | None = None
    target_indices: np.ndarray | None = None
    adversarial_class: int = -1
    source_class: int = -1
    trigger: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        self.images = np.asarray(self.images, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not (len(self.indices) == len(self.images) == len(self.labels)):
            raise ValueError(f"{len(self.indices)} indices, {len(self.images)} images and {len(self.labels)} "
                             "labels: a PoisonSet needs one of each per poison")

    def __len__(self) -> int:
        return len(self.indices)

    def apply(self, dataset: ImageTensorDataset) -> PoisonedView:
        """The poisoned training set: ``dataset`` with the poisons overlaid (``dataset`` is untouched)."""
        if len(self.indices) and int(self.indices.max()) >= len(dataset):
            raise IndexError(f"poison index {int(self.indices.max())} is outside a dataset of {len(dataset)}")
        return PoisonedView(dataset, torch.from_numpy(self.indices), torch.from_numpy(self.images),
                            torch.from_numpy(self.labels))

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(FORMAT_VERSION), "attack": np.array(self.attack),
            "indices": self.indices, "images": self.images, "labels": self.labels,
            "adversarial_class": np.array(self.adversarial_class), "source_class": np.array(self.source_class),
            "params": np.array(json.dumps(self.params, sort_keys=True, default=_json_default)),
        }
        for name in ("target_images", "target_labels", "target_indices", "trigger"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(value)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> PoisonSet:
        with np.load(path, allow_pickle=False) as f:
            if int(f["format_version"]) != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported PoisonSet format {int(f['format_version'])}")
            optional = {name: f[name] for name in ("target_images", "target_labels", "target_indices", "trigger")
                        if name in f.files}
            return cls(attack=str(f["attack"]), indices=f["indices"], images=f["images"], labels=f["labels"],
                       adversarial_class=int(f["adversarial_class"]), source_class=int(f["source_class"]),
                       params=json.loads(str(f["params"])), **optional)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    return str(value)


@dataclass(frozen=True)
class ThreatModel:
    """How an attack works: ``goal`` is targeted / indiscriminate / backdoor; ``setting`` from-scratch,
    transfer or both; ``clean_label`` is True when poisons keep their correct labels."""

    goal: str
    clean_label: bool
    setting: str
    summary: str = ""


# The calling convention every bundled attack's ``craft`` follows, so that ``sanitizer attack`` and
# the benchmarks can drive any registered attack the same way:
#
#     attack.craft(train_set, *, surrogate=None, test_set=None, target_index=None,
#                  adversarial_class=None, source_class=None, seed=0, **kw) -> PoisonSet
#
# ``surrogate`` is a trained model (or a list of models, an ensemble) to craft against; attacks
# that need none ignore it and set ``needs_surrogate = False``. ``target_index`` indexes
# ``test_set``; when an attack needs a target and none is given it draws one from ``seed``.
# Arguments an attack does not use are accepted and ignored (``**kw``).
CRAFT_ARGUMENTS = ("surrogate", "test_set", "target_index", "adversarial_class", "source_class", "seed")


class Attack(ABC):
    """Base class of every bundled attack. Subclasses set ``name`` and ``threat_model`` and implement craft
    with the calling convention described by :data:`CRAFT_ARGUMENTS`."""

    name: str = ""
    threat_model: ThreatModel
    needs_surrogate: bool = True  # False for attacks that never look at a model (label flips, patches)

    @abstractmethod
    def craft(self, train_set: ImageTensorDataset, **kwargs) -> PoisonSet:
        """Craft poisons against ``train_set``; see each attack for its arguments."""

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


_ATTACKS: dict[str, type[Attack]] = {}


def register_attack(name: str):
    """Class decorator: register an attack under ``name`` for :func:`make_attack`."""

    def wrap(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        _ATTACKS[name] = cls
        return cls

    return wrap


def make_attack(name: str, **params) -> Attack:
    """Instantiate a registered attack by name, e.g. ``make_attack("bullseye_polytope", eps=8/255)``."""
    if name not in _ATTACKS:
        raise ValueError(f"unknown attack {name!r}; available: {', '.join(sorted(_ATTACKS))}")
    return _ATTACKS[name](**params)


def available_attacks() -> dict[str, ThreatModel]:
    """Every registered attack with its threat model."""
    return {name: cls.threat_model for name, cls in sorted(_ATTACKS.items())}


def check_eps(eps: float) -> float:
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (an L∞ bound in [0, 1] pixel units, e.g. 16/255), got {eps}")
    return float(eps)


def check_budget(budget: int, available: int, what: str = "the poison class") -> int:
    if budget < 1:
        raise ValueError(f"the poison budget must be at least 1, got {budget}")
    if budget > available:
        raise ValueError(f"a budget of {budget} poisons exceeds the {available} examples of {what}; "
                         "lower the budget or choose a larger class")
    return int(budget)


def resolve_budget(budget: int | float, n_train: int) -> int:
    """A poison budget given as a count (an int ≥ 1) or a fraction of the training set (a float in (0, 1))."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"budget must be a count (e.g. 25) or a fraction of the training set (e.g. 0.01), "
                         f"got {budget!r}")
    if isinstance(budget, (float, np.floating)) and not float(budget).is_integer():
        if not 0 < budget < 1:
            raise ValueError(f"a fractional budget must lie in (0, 1), got {budget}; pass a count for more")
        return max(1, int(round(float(budget) * n_train)))
    if budget < 1:
        raise ValueError(f"the poison budget must be at least 1 (a count) or a fraction in (0, 1), got {budget}")
    return int(budget)
