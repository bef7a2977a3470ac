"""The policy interface: embeddings + labels in, a keep mask and per-example scores out."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sanitizer.errors import SanitizerError, check_embeddings, check_labels, check_seed
from sanitizer.options import parse_policy_spec

_REGISTRY: dict[str, type[Policy]] = {}


@dataclass
class Selection:
    """What a policy decided: ``keep`` (bool [N]), ``scores`` (float [N], higher = more suspicious)."""

    keep: np.ndarray
    scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dropped(self) -> np.ndarray:
        return np.flatnonzero(~self.keep)


class Policy:
    """Base class. Subclasses implement :meth:`select_class` or override :meth:`select`.

    ``embedding`` names the embedding the policy was designed for (``None``: whatever the
    sanitizer computes; the same names as ``Sanitizer(embedding=...)`` and ``gradient_embeddings``);
    ``min_class_size`` classes smaller than this are kept untouched.
    """

    name: str = ""
    embedding: str | None = None
    min_class_size: int = 3
    # True: the Sanitizer runs the input-noise screen (sanitizer.noise_screen) once, when training
    # starts, with the policy's ``screen_threshold``
    screen: bool = False
    screen_threshold: float = 3.5
    # True: the screen also drops the images of a class that share an exact stamped window (sanitizer.shared_patterns)
    screen_patterns: bool = False
    _num_classes: int = 0  # set by select() for select_class implementations that read the embedding's layout

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "embedding_kind" in vars(cls):  # the attribute's old name would be ignored without a word
            raise SanitizerError(f"{cls.__name__}.embedding_kind is now called embedding; rename the attribute")

    def select(self, embeddings, labels, num_classes: int | None = None, seed: int = 0) -> Selection:
        y = check_labels(labels, num_classes)
        x = check_embeddings(embeddings, len(y))
        selection = self.select_by_class(x, y, num_classes, seed)
        self.gate_classes(selection, y)
        features = self.cross_class_features(x, self._num_classes)
        if features is not None:
            self.select_across(features, y, selection, self._num_classes)
        return selection

    def select_by_class(self, x: np.ndarray, y: np.ndarray, num_classes: int | None = None,
                        seed: int = 0) -> Selection:
        """The class-by-class part of :meth:`select`, on checked embeddings ``x`` and labels ``y``."""
        self._num_classes = num_classes if num_classes is not None else (int(y.max()) + 1 if len(y) else 0)
        keep = np.ones(len(y), dtype=bool)
        scores = np.zeros(len(y), dtype=np.float64)
        info: dict[str, Any] = {"per_class": {}, "skipped_classes": []}
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            if len(members) < self.min_class_size:
                info["skipped_classes"].append(int(c))
                continue
            drop_c, score_c, info_c = self.select_class(x[members], int(c), seed)
            keep[members[drop_c]] = False
            scores[members] = score_c
            info["per_class"][int(c)] = info_c
        if info["skipped_classes"]:
            warnings.warn(f"classes {info['skipped_classes']} have fewer than {self.min_class_size} examples; "
                          f"the {self.name!r} policy keeps them all", stacklevel=2)
        return Selection(keep, scores, info)

    def gate_classes(self, selection: Selection, labels: np.ndarray) -> None:
        """After the class-by-class decision, with every class's scores in view: policies may withdraw a
        class's drops here (in place). Runs on the gathered selection in class-sharded rounds too."""

    def cross_class_features(self, x: np.ndarray, num_classes: int) -> np.ndarray | None:
        """What a cross-class step (:meth:`select_across`) needs of each embedding row, or None when the policy
        has no such step this round. Small per-row features, so a class-sharded DDP round
        (:func:`~sanitizer.distributed.select_sharded`) can gather them instead of the embeddings."""
        return None

    def select_across(self, features: np.ndarray, labels: np.ndarray, selection: Selection,
                      num_classes: int) -> None:
        """After the class-by-class decision, look across classes and update ``selection`` in place."""

    def start_round(self, index: int, candidates: np.ndarray | None = None) -> None:
        """Called by the Sanitizer before round ``index`` (0-based) is selected, with the dataset indices of
        the rows it will pass (``candidates``); policies whose decision depends on the stage of training, or
        on what earlier rounds saw of the same examples, override it."""

    def state_dict(self) -> dict:
        """What the policy remembers between rounds, for a checkpoint (tensors and plain types); most
        policies remember nothing."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`."""

    def select_class(self, x: np.ndarray, label: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """Return (positions to drop within the class, scores, info) for one class."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def start_policy_round(policy: Policy, index: int, candidates: np.ndarray) -> None:
    """``policy.start_round(index, candidates)``, or ``start_round(index)`` for a policy written before the
    candidates were passed (an override that takes the index only keeps working)."""
    params = inspect.signature(policy.start_round).parameters.values()
    if len(params) >= 2 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        policy.start_round(index, candidates)
    else:
        policy.start_round(index)


def register_policy(name: str):
    """Class decorator: make a policy available to :func:`make_policy` under ``name``."""

    def wrap(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(policy: str | Policy, **options) -> Policy:
    """A policy instance from a name such as ``"density"``, ``"epic"``, ``"epic-0.2"`` or ``"random"``, with
    options as keywords or written into the name: ``make_policy("density:k=50:two_sided=true")``."""
    if isinstance(policy, Policy):
        if options:
            raise SanitizerError("options given together with a policy instance; configure the instance instead")
        return policy
    if not isinstance(policy, str):
        raise SanitizerError(f"policy must be a name such as 'density' or a Policy instance, got "
                             f"{type(policy).__name__}; available: {', '.join(available_policies())}")
    name = policy
    if ":" in name:  # "density:k=50:threshold=2.5": options written into the name (sanitizer.options)
        name, written = parse_policy_spec(name)
        clash = sorted(set(written) & set(options))
        if clash:
            raise SanitizerError(f"option(s) {clash} given both in {policy!r} and as keywords; give each once")
        options = {**written, **options}
        policy = name
    if name.startswith("epic-"):  # "epic-0.2" is EPIC with subset fraction 0.2, as in the paper
        try:
            fraction = float(policy.split("-", 1)[1])
        except ValueError:
            raise SanitizerError(f"unknown policy {policy!r}: write epic-<fraction>, e.g. 'epic-0.1'") from None
        name, options = "epic", {"fraction": fraction, **options}
    if name not in _REGISTRY:
        raise SanitizerError(f"unknown policy {policy!r}; available: {', '.join(available_policies())}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as exc:
        raise SanitizerError(f"bad options for policy {name!r}: {exc}") from exc


def select(embeddings: torch.Tensor | np.ndarray, labels, policy: str | Policy = "density",
           num_classes: int | None = None, seed: int = 0, **options) -> Selection:
    """Functional entry point: decide which examples to keep.

    Example:
        >>> sel = select(torch.randn(200, 8), torch.arange(200) % 2, policy="density")
        >>> sel.keep.shape, sel.scores.shape
        ((200,), (200,))
    """
    seed = check_seed(seed)  # policies that ignore the seed would otherwise accept seed="a" without a word
    return make_policy(policy, **options).select(embeddings, labels, num_classes=num_classes, seed=seed)


def cap_count(n: int, fraction: float) -> int:
    return int(math.floor(fraction * n + 1e-9))
