"""Common API of the bundled attacks: the PoisonSet they produce, a registry, and input checks."""

from __future__ import annotations

import inspect
import json
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sanitizer.data.tensors import ImageTensorDataset, check_label_array, check_pixels, integer_array, read_npz
from sanitizer.data.views import PoisonedDataset, PoisonedView, dataset_num_classes, map_dataset_length
from sanitizer.errors import SanitizerError, check_positive_int

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
    parameter and seed used; ``num_classes`` the training set's classes when known.

    Everything is checked on construction, on load and before apply/save (:meth:`validate`):
    unique non-negative integer indices, integer labels (below ``num_classes`` when known; against the
    dataset's classes at apply time), finite images in [0, 1], one index, image and label per poison.

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
    num_classes: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalise the dtypes of) every field; a :class:`SanitizerError` names the problem."""
        self.indices = integer_array(self.indices, "poison indices")
        if len(np.unique(self.indices)) != len(self.indices):
            raise SanitizerError("poison indices contain duplicates; each training example is replaced at most once")
        if self.num_classes is not None:
            self.num_classes = check_positive_int(self.num_classes, "num_classes")
        self.labels = check_label_array(self.labels, "poison labels", num_classes=self.num_classes)
        self.images = check_pixels(self.images, "poison images")
        if not (len(self.indices) == len(self.images) == len(self.labels)):
            raise SanitizerError(f"{len(self.indices)} indices, {len(self.images)} images and {len(self.labels)} "
                                 "labels: a PoisonSet needs one of each per poison")
        if self.target_images is not None:
            self.target_images = check_pixels(self.target_images, "target images")
        if self.target_labels is not None:
            self.target_labels = check_label_array(self.target_labels, "target labels", num_classes=self.num_classes)
            if self.target_images is not None and len(self.target_images) != len(self.target_labels):
                raise SanitizerError(f"{len(self.target_images)} target images but {len(self.target_labels)} "
                                     "target labels")
        if self.target_indices is not None:
            self.target_indices = integer_array(self.target_indices, "target indices")
        if self.trigger is not None:
            self.trigger = check_pixels(self.trigger, "the trigger", ndim=3)
        for name in ("adversarial_class", "source_class"):
            value = getattr(self, name)
            try:
                index = -2 if isinstance(value, bool) else operator.index(value)
            except TypeError:
                index = -2
            if index < -1:
                raise SanitizerError(f"{name} must be a class index or -1 (none), got {value!r}")
            if self.num_classes is not None and index >= self.num_classes:
                raise SanitizerError(f"{name}={index} is out of range for {self.num_classes} classes")
            setattr(self, name, index)

    def __len__(self) -> int:
        return len(self.indices)

    def apply(self, dataset: Dataset, *, num_classes: int | None = None,
              transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PoisonedView | PoisonedDataset:
        """The poisoned training set: ``dataset`` with the poisons overlaid (``dataset`` is untouched).

        ``dataset`` is an :class:`ImageTensorDataset` (returns a :class:`PoisonedView`, images in memory)
        or any map-style dataset yielding ``(image tensor, label, ...)``, e.g. a torchvision dataset with a
        ``ToTensor`` transform or a ``TensorDataset`` (returns a :class:`PoisonedDataset`: poisoned indices
        yield the poison image and label, the others the original item). Poison labels are checked
        against ``num_classes``, else the classes the dataset declares. ``transform`` is applied to the
        poison images of a general dataset (e.g. its ``Normalize``); an ImageTensorDataset applies its own.
        """
        self.validate()
        map_dataset_length(dataset)
        classes = num_classes if num_classes is not None else dataset_num_classes(dataset)
        if classes is not None:
            check_label_array(self.labels, "poison labels", num_classes=classes)
        images, labels = torch.from_numpy(self.images), torch.from_numpy(self.labels)
        if isinstance(dataset, ImageTensorDataset):
            if transform is not None:
                raise SanitizerError("an ImageTensorDataset applies its own transform to every image, poisons "
                                     "included; set it with dataset.with_transform(...) instead of transform=")
            return PoisonedView(dataset, torch.from_numpy(self.indices), images, labels)
        return PoisonedDataset(dataset, torch.from_numpy(self.indices), images, labels, transform)

    def save(self, path: str | Path) -> None:
        self.validate()
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(FORMAT_VERSION), "attack": np.array(self.attack),
            "indices": self.indices, "images": self.images, "labels": self.labels,
            "adversarial_class": np.array(self.adversarial_class), "source_class": np.array(self.source_class),
            "params": np.array(json.dumps(self.params, sort_keys=True, default=_json_default)),
        }
        if self.num_classes is not None:
            arrays["num_classes"] = np.array(self.num_classes)
        for name in _OPTIONAL_ARRAYS:
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(value)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> PoisonSet:
        """Read a saved PoisonSet (``allow_pickle=False``) and validate it; errors name the file."""
        f = read_npz(path, "poisons (a saved PoisonSet)")
        missing = [name for name in ("format_version", "attack", "indices", "images", "labels") if name not in f]
        if missing:
            raise SanitizerError(f"{path} is not a PoisonSet: it lacks {', '.join(missing)}")
        try:
            version = _stored_int(f, "format_version")
            if version != FORMAT_VERSION:
                raise SanitizerError(f"unsupported PoisonSet format {version} (this version reads {FORMAT_VERSION})")
            try:
                params = json.loads(str(f.get("params", "{}")))
            except ValueError as exc:
                raise SanitizerError(f"params is not valid JSON ({exc})") from None
            if not isinstance(params, dict):
                raise SanitizerError(f"params must be a JSON object, got a JSON {type(params).__name__}")
            optional = {name: f[name] for name in _OPTIONAL_ARRAYS if name in f}
            return cls(attack=str(f["attack"]), indices=f["indices"], images=f["images"], labels=f["labels"],
                       adversarial_class=_stored_int(f, "adversarial_class", -1),
                       source_class=_stored_int(f, "source_class", -1), params=params,
                       num_classes=_stored_int(f, "num_classes"), **optional)
        except (SanitizerError, TypeError, ValueError) as exc:
            raise SanitizerError(f"{path}: {exc}") from None


def _stored_int(arrays: dict[str, np.ndarray], name: str, default: int | None = None) -> int | None:
    """One integer stored as a 0-d array in a saved PoisonSet (``default`` when absent)."""
    if name not in arrays:
        return default
    value = arrays[name]
    if value.ndim != 0 or value.dtype == np.bool_ or not np.issubdtype(value.dtype, np.integer):
        raise SanitizerError(f"{name} must be one integer, got a {value.dtype} array of shape {value.shape}")
    return int(value)


_OPTIONAL_ARRAYS = ("target_images", "target_labels", "target_indices", "trigger")


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
    #: What :attr:`loss_history` holds for this attack; "" for attacks that keep none on the instance
    #: (gradient matching, MetaPoison and Sleeper Agent record theirs in ``PoisonSet.params`` instead).
    loss_description: str = ""

    @abstractmethod
    def craft(self, train_set: ImageTensorDataset, **kwargs) -> PoisonSet:
        """Craft poisons against ``train_set``; see each attack for its arguments."""

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @property
    def loss_history(self) -> list[float]:
        """The objective at every step of the last craft (see ``loss_description``): a copy of what the
        attack stored in ``self._history``; empty before the first craft and for attacks that keep none."""
        return list(getattr(self, "_history", ()))


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


def default_budget(attack: str | type[Attack]) -> tuple[str, float] | None:
    """An attack's default poison budget, read from its constructor's signature: ``("budget", value)``
    (a count, or a fraction of the training set when below 1), ``("fraction", value)`` for attacks that
    perturb a fraction of the training set instead, or None. Follows ``**kwargs`` to the parent class."""
    cls = _ATTACKS[attack] if isinstance(attack, str) else attack
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters
        for name in ("budget", "fraction"):
            if name in parameters and parameters[name].default is not inspect.Parameter.empty:
                return name, parameters[name].default
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return None
    return None
