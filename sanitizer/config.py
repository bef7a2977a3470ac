"""One object for a Sanitizer's plain-value options: :class:`SanitizerConfig`.

The Sanitizer's keywords, the certificate (which records them and rebuilds an equivalent sanitizer for
its proxy and partition runs), ``sanitizer certify`` and the benchmarks' defense specs all go through
it, so the options are validated in one place and written the same way everywhere. The objects a
sanitizer also takes (model, datasets, hooks, collate functions) are not configuration and stay
keywords of :class:`~sanitizer.Sanitizer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sanitizer.embeddings import check_embedding_name
from sanitizer.errors import SanitizerError, check_positive_int
from sanitizer.options import json_safe, parse_policy_spec
from sanitizer.policies import Policy, make_policy
from sanitizer.unlearn import check_unlearn_options

ACTIONS = ("drop", "unlearn")


def default_schedule(warmup: int | None, every: int | None, epochs: int | None) -> tuple[int, int]:
    """The round schedule: given values win; otherwise (``epochs`` known) the first round starts after
    30 % of the training and the next ones every fifth of it, or after 10 epochs and every 5 when
    ``epochs`` is not given. 30 %: on CIFAR-10 from scratch, poisons that are learned abnormally fast
    stand out from 30 % to 50 % of the training (the dense side of the ``density`` policy acts in
    that first round) and not yet after 20 % (benchmarks/RESULTS.md)."""
    if epochs is not None:
        epochs = check_positive_int(epochs, "epochs")
    if epochs is None:
        return (10 if warmup is None else warmup), (5 if every is None else every)
    return (max(1, round(0.3 * epochs)) if warmup is None else warmup,
            max(1, round(0.2 * epochs)) if every is None else every)


@dataclass
class SanitizerConfig:
    """Every plain-value option of a :class:`~sanitizer.Sanitizer`, validated once.

    ``warmup`` and ``every`` left at ``None`` follow :func:`default_schedule`; ``sanitizer.config`` holds
    the values a sanitizer resolved (its policy's name and full options, its schedule).

    Example:
        >>> cfg = SanitizerConfig.from_spec("density:k=50:every=2", epochs=10)
        >>> cfg.policy, cfg.policy_options, cfg.warmup, cfg.every
        ('density', {'k': 50}, 3, 2)
        >>> SanitizerConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> sanitizer = Sanitizer.from_config(model, train_set, cfg)  # doctest: +SKIP
    """

    policy: str | Policy = "density"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    embedding: str | None = None
    epochs: int | None = None
    warmup: int | None = None
    every: int | None = None
    stop_epoch: int | None = None
    cumulative: bool = True
    batch_size: int = 512
    max_dim: int = 2048
    num_classes: int | None = None
    seed: int = 0
    action: str = "drop"
    unlearn_options: Mapping[str, Any] = field(default_factory=dict)
    harvest: bool | None = None
    audit: bool = False
    audit_policies: Sequence[str] = ()
    keep_embeddings: bool = False
    check: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.epochs is not None:
            self.epochs = check_positive_int(self.epochs, "epochs")
        warmup, every = default_schedule(self.warmup, self.every, self.epochs)
        self.warmup, self.every = check_positive_int(warmup, "warmup", 0), check_positive_int(every, "every")
        if self.stop_epoch is not None:
            self.stop_epoch = check_positive_int(self.stop_epoch, "stop_epoch", 0)
        if self.embedding is not None:
            check_embedding_name(self.embedding)
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        self.max_dim = check_positive_int(self.max_dim, "max_dim")
        if self.num_classes is not None:
            self.num_classes = check_positive_int(self.num_classes, "num_classes")
        self.seed = check_positive_int(self.seed, "seed", minimum=-(2**63))
        if self.action not in ACTIONS:
            raise SanitizerError(f"unknown action {self.action!r}: choose one of {', '.join(ACTIONS)}")
        for name in ("cumulative", "audit", "keep_embeddings", "check", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise SanitizerError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.harvest is None or isinstance(self.harvest, bool)):
            raise SanitizerError(f"harvest must be True, False or None (the default: on from 10,000 examples where "
                                 f"the model allows it), got {self.harvest!r}")
        for name in ("policy_options", "unlearn_options"):
            if not isinstance(getattr(self, name), Mapping):
                raise SanitizerError(f"{name} must be a dict of options, got {type(getattr(self, name)).__name__}")
            setattr(self, name, dict(getattr(self, name)))
        self.unlearn_options = check_unlearn_options(self.unlearn_options)
        if isinstance(self.audit_policies, (str, Policy)):  # one policy, not the letters of its name
            self.audit_policies = (self.audit_policies,)
        if not isinstance(self.audit_policies, Sequence):
            raise SanitizerError(f"audit_policies must be a list of policy names or instances, got "
                                 f"{type(self.audit_policies).__name__}")
        self.audit_policies = tuple(self.audit_policies)
        # an unknown policy or a bad option fails here, not at the first round
        for policy in (self.policy, *self.audit_policies):
            make_policy(policy, **(self.policy_options if policy is self.policy else {}))

    def make_policy(self) -> Policy:
        """The policy this configuration names (the instance itself when one was given)."""
        return make_policy(self.policy, **self.policy_options)

    @classmethod
    def from_spec(cls, spec: str, **options: Any) -> SanitizerConfig:
        """A configuration from one spec string: ``"density:k=50:every=2:harvest=true"``. Keys that name a
        configuration field (``every``, ``embedding``, ``harvest``, ...) go there, the rest to the policy;
        ``options`` add or override fields."""
        name, written = parse_policy_spec(spec)
        mine = {key: written.pop(key) for key in list(written) if key in FIELDS and key not in ("policy",)}
        policy_options = {**written, **dict(mine.pop("policy_options", {}))}
        return cls(policy=name, policy_options=policy_options, **{**mine, **options})

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON values (a policy instance is written as its name and options)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.policy, Policy):
            out["policy"], out["policy_options"] = self.policy.name, self.policy.config()
        out["audit_policies"] = [p.name if isinstance(p, Policy) else p for p in self.audit_policies]
        return json_safe(out)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SanitizerConfig:
        """The inverse of :meth:`to_dict`; unknown keys are refused (a typo would otherwise vanish)."""
        if not isinstance(values, Mapping):
            raise SanitizerError(f"a sanitizer configuration is a dict of options, got {type(values).__name__}")
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise SanitizerError(f"unknown sanitizer option(s) {unknown}; the options are {', '.join(FIELDS)}")
        return cls(**values)

    def portable(self) -> dict[str, Any]:
        """The options that carry over to another run of the same defense on other data (the certificate's
        proxy and partition runs): :meth:`to_dict` without what belongs to one run (``RUN_SPECIFIC``)."""
        return {key: value for key, value in self.to_dict().items() if key not in RUN_SPECIFIC}

    def sanitizer_keywords(self) -> dict[str, Any]:
        """The keywords that build an equivalent :class:`~sanitizer.Sanitizer`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FIELDS = tuple(f.name for f in dataclasses.fields(SanitizerConfig))
# set per run (by the data, the caller's seed and training length, or what the user watches), not by the defense
RUN_SPECIFIC = ("num_classes", "seed", "epochs", "audit", "audit_policies", "keep_embeddings", "check", "verbose")
