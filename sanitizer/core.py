"""The Sanitizer: schedule, rounds, cumulative drops, history, checkpoint state and loader wrapping."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sanitizer.config import FIELDS as CONFIG_FIELDS
from sanitizer.config import SanitizerConfig, default_schedule
from sanitizer.distributed import (
    all_reduce_sum,
    broadcast_mask,
    decides_by_class,
    gather_embeddings,
    gather_rows_by_position,
    is_distributed,
    is_main_process,
    position_holders,
    rank,
    select_sharded,
    unwrap_model,
    world_size,
)
from sanitizer.embeddings import check_embedding_name, embed_outputs, gradient_embeddings, last_linear_of
from sanitizer.errors import SanitizerError, check_labels, check_map_dataset, check_positive_int
from sanitizer.harvest import PASSED_TO_SHRINK, SMALL_PROBE, Harvester, label_fit_check, label_fit_counts
from sanitizer.harvest import PROBE as HARVEST_PROBE
from sanitizer.noise_screen import (
    GROUP_CUT,
    PATCH,
    SMALLEST,
    gradient_rounds,
    image_dataset_noise_floor,
    screen_decision,
)
from sanitizer.policies import Policy, available_policies, make_policy
from sanitizer.policies.base import start_policy_round
from sanitizer.progress import log
from sanitizer.sampler import KeepSampler, SamplerRegistry, loader_settings, sampler_layout
from sanitizer.shared_patterns import WindowCollector
from sanitizer.stats import mix_seed
from sanitizer.unlearn import unlearn

STATE_VERSION = 1
STATE_KEYS = ("version", "size", "keep", "history", "epoch", "seed", "policy")
# drop: flagged examples leave the training set; unlearn: they also get gradient ascent until the
# model is at chance on them (sanitizer.unlearn), undoing what they already taught it.
HARVESTABLE = ("last_layer", "logits", "features")  # embeddings computable from the last layer's input and output
# harvest=None harvests from this many training examples on. On small sets the train-mode rows are noisier than a
# pass (planted images, 240: 21 drops against 12 with a pass; digits: the label side's gate needs the pass) and a
# pass costs seconds; at CIFAR-10 size the rows agree with a pass and the pass is a third of an epoch (docs/harvest.md)
AUTO_HARVEST_MIN_EXAMPLES = 10_000


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of every example as given (``.labels`` / ``.targets`` when present, else by indexing), not cast:
    :func:`~sanitizer.errors.check_labels` refuses 1.7, NaN or strings instead of a cast truncating them."""
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            labels = getattr(dataset, attr)
            return np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, Mapping) and ("labels" in item or "label" in item):
            out.append(_label_value(item["labels"] if "labels" in item else item["label"]))
            continue
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise SanitizerError(f"the dataset yields {type(item).__name__} items; the sanitizer understands "
                                 "(input, label, ...) tuples and dicts with a 'labels' entry. For other items pass "
                                 "to_xy=lambda item: (input, label), e.g. to_xy=lambda d: (d['image'], d['target'])")
        out.append(_label_value(item[1]))
    return np.asarray(out)


def _label_value(label: Any) -> Any:
    """One item's label as a Python scalar (a one-element tensor or array is unwrapped), uncast."""
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        return label.item()
    if isinstance(label, np.ndarray) and label.size == 1:
        return label.item()
    return label


def _state_int(state: Mapping[str, Any], key: str, minimum: int) -> int:
    """An integer entry of a saved state (1.5 or "a" is refused, not cast)."""
    value = state[key]
    try:
        return check_positive_int(value.item() if isinstance(value, torch.Tensor) else value, f"the state's {key!r}",
                                  minimum)
    except SanitizerError as exc:
        raise SanitizerError(f"{exc}; the state is corrupt or was edited") from None


class XYView(Dataset):
    """``dataset`` seen through ``to_xy``: item ``i`` is ``to_xy(dataset[i])``, an ``(input, label)`` pair.

    What :class:`Sanitizer` embeds when it is given ``to_xy=`` (items it cannot read by itself, such
    as ``{"image": ..., "label": ...}`` dicts whose keys are not the model's keyword arguments).

    Example:
        >>> rows = [{"image": torch.zeros(2), "label": 1}]
        >>> XYView(rows, lambda d: (d["image"], d["label"]))[0]
        (tensor([0., 0.]), 1)
    """

    def __init__(self, dataset: Dataset, to_xy: Callable[[Any], tuple[Any, Any]]) -> None:
        if not callable(to_xy):
            raise SanitizerError(f"to_xy must be a function item -> (input, label), got {type(to_xy).__name__}")
        self.dataset, self.to_xy = dataset, to_xy

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        try:
            xy = self.to_xy(self.dataset[index])
        except Exception as exc:
            raise SanitizerError(f"to_xy raised {type(exc).__name__}: {exc} on item {index}; it must turn one "
                                 "dataset item into (input, label)") from exc
        if not isinstance(xy, (tuple, list)) or len(xy) != 2:
            raise SanitizerError(f"to_xy must return an (input, label) pair, got {type(xy).__name__} for item {index}")
        return xy[0], xy[1]


# The keys a round record's one-line summary shows; the rest are named as details.
_SUMMARY_KEYS = ("round", "epoch", "policy", "embedding", "candidates", "dropped_total",
                 "seconds_embed", "seconds_select")


class RoundRecord(dict):
    """What one sanitization round did: a plain dict (JSON, indexing) that prints as one line.

    ``print(sanitizer.history[-1])`` shows the counts; ``record["per_class"]``,
    ``record["dropped_now"]`` (the indices) and ``dict(record)`` give the details.

    Example:
        >>> RoundRecord(round=0, epoch=3, policy="density", embedding="last_layer", candidates=300,
        ...             dropped_now=[4, 9], dropped_total=2, seconds_embed=0.1, seconds_select=0.02)
        RoundRecord(round 0 at epoch 3, density on last_layer: dropped 2 of 300 candidates, 2 in total; 0.12 s)
    """

    def dropped_count(self) -> int:
        """Examples this round dropped (in audit mode: those the sanitizer's policy would drop)."""
        audit = self.get("audit") or {}
        if audit.get("mode") == "audit":
            return len(audit["policies"].get(self.get("policy"), {}).get("would_drop", []))
        return len(self.get("dropped_now", []))

    def metrics(self) -> dict[str, float]:
        """The round as scalar metrics for a logger (``sanitizer/dropped_now``, ``sanitizer/dropped_total``, ...)."""
        return {"sanitizer/round": float(self.get("round", -1)), "sanitizer/dropped_now": float(self.dropped_count()),
                "sanitizer/dropped_total": float(self.get("dropped_total", 0)),
                "sanitizer/candidates": float(self.get("candidates", 0))}

    def __repr__(self) -> str:
        audit = (self.get("audit") or {}).get("mode") == "audit"
        what = (f"would drop {self.dropped_count()} of {self.get('candidates')} candidates (audit: nothing dropped)"
                if audit else f"dropped {self.dropped_count()} of {self.get('candidates')} candidates, "
                f"{self.get('dropped_total')} in total")
        seconds = float(self.get("seconds_embed", 0.0)) + float(self.get("seconds_select", 0.0))
        details = [k for k in self if k not in _SUMMARY_KEYS and k != "dropped_now"]
        return (f"RoundRecord(round {self.get('round')} at epoch {self.get('epoch')}, {self.get('policy')} on "
                f"{self.get('embedding')}: {what}; {seconds:.2f} s" + (f"; details: {', '.join(details)}" if details
                                                                        else "") + ")")

    __str__ = __repr__


def _differs(a: Any, b: Any) -> bool:
    """Whether two fetches of the same dataset item differ (tensors compared exactly)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape != b.shape or not torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() != b.keys() or any(_differs(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    try:
        return bool(a != b)
    except Exception:  # objects without a usable comparison: assume equal
        return False


def _state_keep(keep: Any, size: int) -> np.ndarray:
    """A saved keep mask as a bool array of ``size``, refusing other lengths, shapes and dtypes."""
    arr = keep.detach().cpu().numpy() if isinstance(keep, torch.Tensor) else np.asarray(keep)
    if arr.dtype != np.bool_:
        raise SanitizerError(f"the saved keep mask has dtype {arr.dtype}, expected bool; the state is corrupt or "
                             "was edited: save it again with Sanitizer.state_dict()")
    if arr.shape != (size,):
        raise SanitizerError(f"the saved keep mask has shape {arr.shape}, expected ({size},) (one flag per "
                             "example); the state is corrupt or was edited: save it again with Sanitizer.state_dict()")
    return arr.copy()


class KeptLoader(DataLoader):
    """What :meth:`Sanitizer.wrap` returns: a DataLoader over the kept examples (``loader.sanitizer`` is its
    sanitizer) that refuses to run an epoch without batches, which a ``drop_last`` loader would do without
    a word once fewer examples are kept than one batch holds."""

    sanitizer: Sanitizer

    def __iter__(self):
        if len(self) == 0:
            raise SanitizerError(
                f"epoch {self.sanitizer.epoch} has no batches: {int(self.sanitizer.keep.sum())} examples are kept "
                f"and the loader has batch_size={self.batch_size} with drop_last=True. Use a smaller batch size "
                "or drop_last=False")
        return super().__iter__()


class Sanitizer:
    """Drops isolated examples from a training set on a schedule while the model trains.

    Rounds run at the start of epochs ``warmup, warmup + every, ...`` (up to ``stop_epoch``). Each
    round embeds the examples still kept, asks the policy which to drop and, by default, drops them
    for the rest of training (``cumulative=True``).

    With ``audit=True`` every round is scored exactly as it would be for dropping, but nothing is
    dropped: the history records what the policy (and each of ``audit_policies``, every one on its
    own embedding kind) *would* drop, and :meth:`scores` returns every example's score per round.
    Look before you let a defense remove anything.

    Args (the most used; the rest are documented in README.md):
        policy, policy_options: a policy name (``"density"``, ``"epic-0.1"``, ...) or instance, and its options.
        embedding: ``"last_layer"`` (default), ``"logits"``, ``"features"`` or ``"params"``.
        epochs: the planned number of epochs; sets the default schedule (first round after 30 %,
            then every fifth) and lets the sanitizer warn when no round would run.
        warmup, every, stop_epoch: an explicit schedule (rounds at warmup, warmup + every, ...).
        embed_dataset: the same examples without random augmentation (what is embedded).
        to_xy: a function item -> (input, label) for datasets whose items the sanitizer cannot read by
            itself (e.g. ``to_xy=lambda d: (d["image"], d["label"])``); applied to ``embed_dataset``'s items.
        audit, audit_policies: score without dropping; also score these policies each round.
        screen_dataset: the images the input-noise screen reads, when the training data are not images
            (e.g. features precomputed by a frozen backbone); the same examples in the same order.
        harvest: take each example's last-layer input and logits from the training steps of the epoch
            before a round instead of a separate pass over the data (:mod:`sanitizer.harvest`): rounds
            cost almost nothing. Needs the sanitizer's sampler (``wrap`` / ``sampler``) and one
            training forward per batch; embeddings ``last_layer``, ``logits`` and ``features``.
            ``None`` (default): on for training sets of at least ``AUTO_HARVEST_MIN_EXAMPLES`` (10,000)
            examples where the model and embedding allow it, else the separate pass.
        check: embed one example at construction so that problems surface before training.
        action: ``"drop"`` (default) or ``"unlearn"``: drop, then gradient ascent on the dropped examples
            until the model is at chance on them (``unlearn_options``: ``lr``, ``max_passes``).
        verbose: one log line per round through the ``sanitizer`` logger (``verbose=False``: none).

    Example (a plain training loop; one added call per epoch)::

        sanitizer = Sanitizer(model, train_set, embed_dataset=train_set_without_augmentation,
                              warmup=5, every=5)
        loader = sanitizer.wrap(DataLoader(train_set, batch_size=128, shuffle=True))
        for epoch in range(epochs):
            sanitizer.start_epoch(epoch)          # the one added call
            for x, y in loader:
                ...
        print(sanitizer.dropped)
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        policy: str | Policy = "density",
        policy_options: dict[str, Any] | None = None,
        embedding: str | None = None,
        warmup: int | None = None,
        every: int | None = None,
        stop_epoch: int | None = None,
        cumulative: bool = True,
        embed_dataset: Dataset | None = None,
        batch_size: int = 512,
        device: str | torch.device | None = None,
        last_layer: nn.Linear | None = None,
        max_dim: int = 2048,
        num_classes: int | None = None,
        seed: int = 0,
        keep_embeddings: bool = False,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        embed_collate: Callable | None = None,
        round_hooks: list[Callable[..., dict[str, Any] | None]] | None = None,
        verbose: bool = True,
        audit: bool = False,
        audit_policies: Sequence[str | Policy] = (),
        epochs: int | None = None,
        check: bool = True,
        action: str = "drop",
        unlearn_options: dict[str, Any] | None = None,
        to_xy: Callable[[Any], tuple[Any, Any]] | None = None,
        screen_dataset: Dataset | None = None,
        harvest: bool | None = None,
    ) -> None:
        if epochs is None and warmup is None:
            warnings.warn("the sanitizer does not know how long training is: its first round is at epoch 10, then "
                          "every 5 epochs, so a shorter run drops nothing. Pass epochs=<your number of epochs> "
                          "(first round after 30 % of training) or warmup= and every=.", stacklevel=2)
        # every plain-value option is validated in one place (sanitizer.config)
        options = SanitizerConfig(
            policy=policy, policy_options=policy_options or {}, embedding=embedding, epochs=epochs, warmup=warmup,
            every=every, stop_epoch=stop_epoch, cumulative=cumulative, batch_size=batch_size, max_dim=max_dim,
            num_classes=num_classes, seed=seed, action=action, unlearn_options=unlearn_options or {},
            harvest=harvest, audit=audit, audit_policies=audit_policies, keep_embeddings=keep_embeddings,
            check=check, verbose=verbose)
        warmup, every, stop_epoch = options.warmup, options.every, options.stop_epoch
        if epochs is not None and warmup >= epochs:
            suggested = default_schedule(None, None, epochs)
            warnings.warn(f"warmup={warmup} but training has {epochs} epochs: no sanitization round will run and "
                          f"nothing will be dropped. Lower warmup, or leave warmup and every unset for the "
                          f"default (warmup={suggested[0]}, every={suggested[1]}).", stacklevel=2)
        self.model = model
        self.dataset = dataset
        self.embed_dataset = embed_dataset if embed_dataset is not None else dataset
        if to_xy is not None:
            self.embed_dataset = XYView(self.embed_dataset, to_xy)
        self.size = check_map_dataset(dataset)
        if check_map_dataset(self.embed_dataset) != self.size:
            raise SanitizerError(f"embed_dataset has {len(self.embed_dataset)} examples but the training "
                                 f"dataset has {self.size}; they must be the same examples in the same order")
        self.screen_dataset = screen_dataset if screen_dataset is not None else self.embed_dataset
        if screen_dataset is not None and to_xy is not None:
            self.screen_dataset = XYView(screen_dataset, to_xy)
        if check_map_dataset(self.screen_dataset) != self.size:
            raise SanitizerError(f"screen_dataset has {len(self.screen_dataset)} examples but the training "
                                 f"dataset has {self.size}; it must hold the same examples' images in the same order")
        self.labels = check_labels(dataset_labels(self.embed_dataset), num_classes)
        self.num_classes = options.num_classes or int(self.labels.max()) + 1
        self.action = action
        self.unlearn_options = options.unlearn_options
        self.policy = options.make_policy()
        self.embedding = check_embedding_name(embedding or self.policy.embedding or "last_layer")
        self.warmup, self.every, self.stop_epoch, self.cumulative = warmup, every, stop_epoch, cumulative
        self.batch_size, self.device, self.last_layer, self.max_dim = options.batch_size, device, last_layer, \
            options.max_dim
        self.seed = options.seed
        self.keep_embeddings, self.check, self.harvest = keep_embeddings, check, harvest
        # Under torch.distributed (world size > 1) and with no gather hook, every rank embeds its
        # shard of the candidates and the rows are all-gathered (sanitizer.distributed).
        self.gather = gather
        self.embed_collate = embed_collate  # collate_fn for the embedding pass (e.g. padding text)
        # Called as hook(sanitizer, epoch, candidates, embeddings, selection) after each round's
        # decision; a returned dict is stored in the round's record under "extras" (e.g. the
        # certificate's per-round gradient statistics). Hooks must not change the keep mask.
        self.round_hooks = list(round_hooks or [])
        self.verbose = verbose
        self.audit = audit
        self.audit_policies = self._name_policies(audit_policies)
        # (epoch, policy label) -> float32 [size] scores (NaN where not a candidate), for every round
        self.audit_scores: dict[tuple[int, str], np.ndarray] = {}
        self.keep = np.ones(self.size, dtype=bool)
        self.history: list[RoundRecord] = []
        self.last_scores: np.ndarray | None = None
        self.screen_scores: np.ndarray | None = None  # the noise screen's z per example, once it ran
        self._screened = False
        self.last_embeddings: np.ndarray | None = None
        self.epoch = -1
        self.epochs = epochs
        # held weakly: a loader dropped by the user frees its sampler (wrap() every epoch does not grow this)
        self._samplers = SamplerRegistry()
        self.harvester: Harvester | None = None
        self._harvest_counts: dict[str, Any] | None = None  # what the last harvested embedding took from where
        self._harvest_check_warned = False
        self._harvest_checks_passed = 0  # label-fit checks passed in a row (then the probe shrinks)
        if harvest and self.embedding not in HARVESTABLE:
            raise SanitizerError(f"harvest=True works with the embeddings {', '.join(HARVESTABLE)}, not "
                                 f"{self.embedding!r} (it needs a pass of its own); use harvest=False")
        if check:
            self._check_model_and_data()
        if harvest or (harvest is None and self.embedding in HARVESTABLE and self.size >= AUTO_HARVEST_MIN_EXAMPLES):
            self._start_harvest(required=bool(harvest))

    @classmethod
    def from_config(cls, model: nn.Module, dataset: Dataset, config: SanitizerConfig, **objects: Any) -> Sanitizer:
        """A sanitizer from a :class:`~sanitizer.config.SanitizerConfig`; ``objects`` are the keywords that are
        not configuration (``embed_dataset``, ``to_xy``, ``gather``, ``round_hooks``, ``device``, ...)."""
        if not isinstance(config, SanitizerConfig):
            raise SanitizerError(f"config must be a SanitizerConfig, got {type(config).__name__} "
                                 "(SanitizerConfig.from_dict(d) reads a dict)")
        clash = sorted(set(objects) & set(CONFIG_FIELDS))
        if clash:
            raise SanitizerError(f"{clash} are configuration: set them in the SanitizerConfig, not beside it")
        return cls(model, dataset, **config.sanitizer_keywords(), **objects)

    @property
    def config(self) -> SanitizerConfig:
        """The resolved configuration (the policy's full options, the schedule in use): what a certificate
        records, and what :meth:`from_config` rebuilds an equivalent sanitizer from."""
        registered = self.policy.name in available_policies()
        return SanitizerConfig(
            policy=self.policy.name if registered else self.policy,
            policy_options=dict(self.policy.config()) if registered else {}, embedding=self.embedding,
            epochs=self.epochs, warmup=self.warmup, every=self.every, stop_epoch=self.stop_epoch,
            cumulative=self.cumulative, batch_size=self.batch_size, max_dim=self.max_dim,
            num_classes=self.num_classes, seed=self.seed, action=self.action, unlearn_options=self.unlearn_options,
            harvest=self.harvest, audit=self.audit, audit_policies=tuple(self.audit_policies),
            keep_embeddings=self.keep_embeddings, check=self.check, verbose=self.verbose)

    # -- checks at construction (fail before training, not at the first round) -----------------------
    def _check_model_and_data(self) -> None:
        """Embed one example now: a model without a usable last layer or data the model cannot take
        fails here, not after the warm-up epochs. Also warns when ``embed_dataset`` is augmented."""
        rows = np.arange(min(1, self.size))  # one example: no padding needed yet (a trainer may add the collate later)
        try:
            self._embed_rows(rows)
        except SanitizerError as exc:
            hint = ("" if self.embedding == "params" else
                    " Or use embedding='params' (sketched gradients of the parameters, no nn.Linear needed).")
            raise SanitizerError(f"the sanitizer cannot embed this model and data ({exc}).{hint}") from exc
        except Exception as exc:  # the user's model or collate raised: say where it happened
            raise SanitizerError(
                f"running the model on one example of embed_dataset failed with {type(exc).__name__}: {exc}. "
                "The dataset must yield (input, label, ...) or a dict with a 'labels' entry whose other entries "
                "are the model's keyword arguments. For other items pass to_xy=lambda item: (input, label), "
                "e.g. to_xy=lambda d: (d['image'], d['label']); pass embed_collate= for inputs that need "
                "padding.") from exc
        if _differs(self.embed_dataset[0], self.embed_dataset[0]):
            warnings.warn("embed_dataset returns a different example each time it is indexed (random augmentation?). "
                          "Pass embed_dataset= the same examples without random transforms: embeddings of random "
                          "views are noisy and the certificate's fingerprint would not be reproducible.",
                          stacklevel=3)

    # -- what is kept ---------------------------------------------------------------------------
    @property
    def dropped(self) -> np.ndarray:
        """Sorted original indices of every dropped example."""
        return np.flatnonzero(~self.keep)

    def keep_mask(self) -> np.ndarray:
        self._check_size()
        return self.keep

    def _check_size(self) -> None:
        if len(self.dataset) != self.size:
            raise SanitizerError(f"the dataset changed length from {self.size} to {len(self.dataset)} during "
                                 "training; the sanitizer tracks examples by index, so the dataset must not change")

    # -- schedule -------------------------------------------------------------------------------
    def is_round_epoch(self, epoch: int) -> bool:
        if epoch < self.warmup or (self.stop_epoch is not None and epoch > self.stop_epoch):
            return False
        return (epoch - self.warmup) % self.every == 0

    def start_epoch(self, epoch: int) -> RoundRecord | None:
        """Call at the start of every epoch: runs a round if one is due, then reseeds the samplers."""
        record = None
        if self.policy.screen and not self._screened and not any(r.get("kind") == "screen" for r in self.history):
            self.run_screen(epoch)
        if self.is_round_epoch(epoch) and not any(r["epoch"] == epoch for r in gradient_rounds(self.history)):
            record = self.run_round(epoch)
        if self.epochs is not None and epoch == self.epochs - 1 and not gradient_rounds(self.history):
            warnings.warn(f"the last epoch ({epoch}) has started and no sanitization round has run "
                          f"(warmup={self.warmup}, every={self.every}); nothing was dropped", stacklevel=2)
        self.epoch = epoch
        self._samplers.set_epoch(epoch)
        return record

    # -- one round ------------------------------------------------------------------------------
    def run_round(self, epoch: int) -> RoundRecord:
        """Embed the candidates, apply the policy, update the keep mask and record the round."""
        self._check_size()
        candidates = np.flatnonzero(self.keep) if self.cumulative else np.arange(self.size)
        t0 = time.perf_counter()
        class_sharded = self._class_sharded()
        if class_sharded:  # each rank embeds its shard and owns some classes' kNN; no rank holds all rows
            emb, positions = self._shard_rows(candidates)
        else:
            emb = self._embed(candidates)
        t1 = time.perf_counter()
        start_policy_round(self.policy, len(gradient_rounds(self.history)), candidates)
        if class_sharded:  # every rank gathers the same keep flags and scores
            selection = select_sharded(self.policy, emb, positions, self.labels[candidates],
                                       num_classes=self.num_classes, seed=self._round_seed(epoch))
        else:
            self._offer_clean_views(candidates)
            try:
                selection = self.policy.select(emb, self.labels[candidates], num_classes=self.num_classes,
                                               seed=self._round_seed(epoch))
            finally:
                if hasattr(self.policy, "use_clean_views"):
                    self.policy.use_clean_views(None)
        if self._sharded() and not class_sharded:  # rank 0's decision everywhere (select_sharded already
            selection.keep = broadcast_mask(selection.keep)  # gathered one mask): even if a policy is not bit-exact
        t2 = time.perf_counter()
        dropped_now = candidates[~selection.keep] if not self.audit else candidates[:0]
        self._check_leaves_examples(epoch, dropped_now)
        audit = self._audit_round(epoch, candidates, emb, selection)
        if self.cumulative:
            self.keep[dropped_now] = False
        else:
            self.keep[:] = True
            self.keep[dropped_now] = False
        self.last_scores = np.full(self.size, np.nan)
        self.last_scores[candidates] = selection.scores
        if self.keep_embeddings:
            self.last_embeddings = np.full((self.size, emb.shape[1]), np.nan, dtype=np.float32)
            self.last_embeddings[candidates] = emb.numpy()
        record = self._record(epoch, candidates, dropped_now, selection.scores, t1 - t0, t2 - t1)
        if self.harvester is not None:
            record["harvest"] = self._harvest_counts
        if self._sharded():
            record["class_sharded"] = class_sharded
        if audit is not None:
            record["audit"] = audit
        if "label_side" in selection.info:  # why the density policy's label side did or did not act
            record["label_side"] = selection.info["label_side"]
        if self.action == "unlearn" and len(dropped_now):
            record["unlearn"] = unlearn(unwrap_model(self.model), self.embed_dataset, dropped_now, self.num_classes,
                                        retain=np.flatnonzero(self.keep), batch_size=min(self.batch_size, 128),
                                        collate_fn=self.embed_collate, seed=self._round_seed(epoch),
                                        **self.unlearn_options)
        for hook in self.round_hooks:
            extra = hook(self, epoch, candidates, emb, selection)
            if extra:
                record.setdefault("extras", {}).update(extra)
        self.history.append(record)
        if self.verbose and is_main_process():
            what = (f"would drop {int((~selection.keep).sum())} (audit: nothing dropped)" if self.audit else
                    f"dropped {len(dropped_now)} now, {len(self.dropped)} in total")
            log(f"[sanitizer] epoch {epoch}: {what} (embed {t1 - t0:.2f}s, select {t2 - t1:.2f}s)")
        return record

    def run_screen(self, epoch: int) -> RoundRecord | None:
        """The input-noise screen (:mod:`sanitizer.noise_screen`), once, when training starts: drop the
        images whose patch noise floor is an outlier for their class. Recorded in the history as a
        round with ``kind == "screen"``. Inputs that are not images are not screened (no record)."""
        self._check_size()
        self._screened = True
        candidates = np.flatnonzero(self.keep)
        t0 = time.perf_counter()
        collate = self.embed_collate if self.screen_dataset is self.embed_dataset else None
        windows = WindowCollector() if self.policy.screen_patterns else None
        floor = image_dataset_noise_floor(self.screen_dataset, self.batch_size, collate, on_images=windows)
        if floor is None:
            if self.verbose and is_main_process():
                log("[sanitizer] noise screen: the inputs are not float image tensors; not screened (training on "
                    "features of images? pass screen_dataset=<the images, same order> to screen them)")
            return None
        flagged, z, attacked = screen_decision(floor, self.labels, self.policy.screen_threshold)
        patterns = None
        if windows is not None:  # stamped triggers (sanitizer.shared_patterns); their score is put just over the cut
            stamped, patterns = windows.decide(self.labels)
            flagged |= stamped
            z = np.where(stamped, np.maximum(z, np.nextafter(self.policy.screen_threshold, np.inf)), z)
        if self._sharded():  # every rank computed the same; take rank 0's mask anyway, as rounds do
            flagged = broadcast_mask(flagged)
        t1 = time.perf_counter()
        would_drop = candidates[flagged[candidates]]
        dropped_now = would_drop if not self.audit else would_drop[:0]
        self._check_leaves_examples(epoch, dropped_now)
        self.keep[dropped_now] = False
        self.screen_scores = z
        if self.audit:
            self.audit_scores[(int(epoch), "noise_screen")] = z.astype(np.float32)
        record = self._record(epoch, candidates, dropped_now, z[candidates], t1 - t0, 0.0)
        record.update(kind="screen", policy="noise_screen", embedding="input_noise",
                      screen={"threshold": self.policy.screen_threshold, "flagged": int(len(would_drop)),
                              "patch": PATCH, "smallest": SMALLEST, "group_cut": GROUP_CUT,
                              "classes_cut_lower": attacked, "shared_patterns": patterns})
        self.history.append(record)
        if self.verbose and is_main_process():
            what = "would drop" if self.audit else "dropped"
            group = f"; class(es) {attacked} hold a group of them (cut at z > {GROUP_CUT})" if attacked else ""
            if patterns and patterns.get("flagged"):
                group += f"; {patterns['flagged']} of them share a stamped window in their class"
            log(f"[sanitizer] noise screen at epoch {epoch}: {what} {len(would_drop)} images with an abnormal "
                f"noise floor for their class{group} ({t1 - t0:.1f}s)")
        return record

    def _check_leaves_examples(self, epoch: int, dropped_now: np.ndarray) -> None:
        """Refuse a round that would drop every remaining example (the loader would yield nothing; the
        keep mask is left untouched), and warn when it drops the last examples of a class."""
        before = self.keep if self.cumulative else np.ones(self.size, dtype=bool)
        after = before.copy()
        after[dropped_now] = False
        if not after.any():
            raise SanitizerError(
                f"the round at epoch {epoch} would drop all {int(before.sum())} remaining examples "
                f"(policy {self.policy.name!r}), leaving nothing to train on; nothing was dropped. Use a less "
                "aggressive policy or threshold, or audit=True to look at the scores before dropping anything")
        emptied = sorted(set(np.unique(self.labels[before]).tolist()) - set(np.unique(self.labels[after]).tolist()))
        if emptied:
            warnings.warn(f"the round at epoch {epoch} drops every remaining example of class(es) {emptied}: the "
                          "model can no longer learn them. Check those labels, or use a less aggressive policy "
                          "or threshold", stacklevel=3)

    def _round_seed(self, epoch: int) -> int:
        """The seed a policy gets in the round at ``epoch`` (the same for the own and audited policies)."""
        return mix_seed(self.seed, epoch)

    # -- audit --------------------------------------------------------------------------------
    def _name_policies(self, policies: Sequence[str | Policy]) -> dict[str, Policy]:
        """Audit policies by label: the spec string given (``"epic-0.1"``) or the policy's name."""
        named: dict[str, Policy] = {}
        for spec in policies:
            policy = make_policy(spec)
            label = spec if isinstance(spec, str) else policy.name
            if label in named or label == self.policy.name:
                raise SanitizerError(f"audit policy {label!r} is listed twice (the sanitizer's own policy is always "
                                     "audited); give each policy once")
            named[label] = policy
        return named

    def _audit_round(self, epoch: int, candidates: np.ndarray, emb: torch.Tensor, selection) -> dict | None:
        """Record every audited policy's scores and would-be drops (the own policy's from ``selection``)."""
        if not self.audit and not self.audit_policies:
            return None
        labels = self.labels[candidates]
        decisions = {self.policy.name: (self.embedding, selection)}
        embeddings = {self.embedding: emb}
        for label, policy in self.audit_policies.items():
            embedding_name = policy.embedding or self.embedding
            if embedding_name not in embeddings:
                embeddings[embedding_name] = self._embed(candidates, embedding_name)
            start_policy_round(policy, len(self.history), candidates)
            sel = policy.select(embeddings[embedding_name], labels, num_classes=self.num_classes,
                                seed=self._round_seed(epoch))
            decisions[label] = (embedding_name, sel)
        out = {"mode": "audit" if self.audit else "drop", "policies": {}}
        for label, (embedding_name, sel) in decisions.items():
            scores = np.full(self.size, np.nan, dtype=np.float32)
            scores[candidates] = sel.scores
            self.audit_scores[(int(epoch), label)] = scores
            would = candidates[~sel.keep]
            out["policies"][label] = {
                "embedding": embedding_name, "would_drop": [int(i) for i in would],
                "per_class": {str(c): int((self.labels[would] == c).sum()) for c in range(self.num_classes)}}
        return out

    def summary(self, top: int = 3) -> str:
        """A plain-text table of the last round: per class, examples kept and dropped so far, the
        score quantiles, and the ``top`` highest-scored example indices.

        Example:
            >>> print(sanitizer.summary())  # doctest: +SKIP
        """
        if not self.history:
            return (f"no sanitization round has run yet (rounds start at epoch {self.warmup}, every {self.every}); "
                    f"{self.size} examples kept")
        last = self.history[-1]
        scores = self.screen_scores if last.get("kind") == "screen" else self.last_scores
        scores = scores if scores is not None else np.full(self.size, np.nan)
        lines = [f"round {last['round']} at epoch {last['epoch']} ({last['policy']} on {last['embedding']}"
                 + (", audit: nothing dropped" if self.audit else "") + f"): {len(self.dropped)} of {self.size} "
                 "dropped in total",
                 f"{'class':>5} {'kept':>7} {'dropped':>7} {'score p50':>9} {'p95':>7} {'max':>7}  top-scored indices"]
        for c in range(self.num_classes):
            members = np.flatnonzero(self.labels == c)
            s = scores[members]
            finite = np.isfinite(s)
            order = members[finite][np.argsort(-s[finite], kind="stable")][:top]
            q = np.percentile(s[finite], [50, 95]) if finite.any() else [np.nan, np.nan]
            mx = s[finite].max() if finite.any() else np.nan
            lines.append(f"{c:>5} {int(self.keep[members].sum()):>7} {int((~self.keep[members]).sum()):>7} "
                         f"{q[0]:>9.2f} {q[1]:>7.2f} {mx:>7.2f}  {', '.join(str(int(i)) for i in order)}")
        return "\n".join(lines)

    def scores(self, policy: str | None = None, epoch: int | None = None) -> np.ndarray:
        """Per-example scores of an audited round (higher = more suspicious; NaN: not a candidate).

        ``policy``: a label from ``audit_policies`` or the sanitizer's own policy (default);
        ``epoch``: a round's epoch (default: the last round).

        Example:
            >>> s = Sanitizer(model, data, audit=True, audit_policies=["epic-0.1"])  # doctest: +SKIP
            >>> s.scores("epic-0.1")  # doctest: +SKIP
        """
        if not self.audit_scores:
            raise SanitizerError("no audited round yet: build the Sanitizer with audit=True or audit_policies=[...] "
                                 "and run a round first")
        policy = policy or self.policy.name
        epoch = max(e for e, _ in self.audit_scores) if epoch is None else int(epoch)
        if (epoch, policy) not in self.audit_scores:
            known = sorted({f"{p}@{e}" for e, p in self.audit_scores})
            raise SanitizerError(f"no audited scores for policy {policy!r} at epoch {epoch}; recorded: {known}")
        return self.audit_scores[(epoch, policy)]

    def _sharded(self) -> bool:
        """Distributed rounds: on under torch.distributed unless a ``gather`` hook is given (pass
        ``gather=lambda e: e`` for independent per-process sanitizers in one process group)."""
        return self.gather is None and is_distributed()

    def _class_sharded(self) -> bool:
        """Distributed rounds shard the classes over the ranks (:func:`~sanitizer.distributed.select_sharded`)
        when the policy decides class by class and nothing in the round needs every row on every rank: not
        audit mode, ``keep_embeddings`` or round hooks (they read the full matrix)."""
        return (self._sharded() and decides_by_class(self.policy) and not self.audit
                and not self.keep_embeddings and not self.round_hooks)

    def _shard_rows(self, candidates: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """(this rank's rows, their positions in ``candidates``) for a class-sharded round: its interleaved
        shard embedded by a pass or, in harvest mode, the rows it harvested (a position two ranks hold counts
        once) plus its share of the candidates no rank harvested."""
        if self.harvester is None or self.embedding not in HARVESTABLE:
            positions = np.arange(len(candidates))[rank()::world_size()]
            return (self._embed_rows(candidates[positions]) if len(positions) else torch.zeros(0, 0)), positions
        h, z, have = self.harvester.rows(candidates, since_epoch=self.epoch)
        check = self._check_harvest(candidates[have], z, reduce=True)
        if not check["ok"]:
            have[:] = False
        holders = position_holders(np.flatnonzero(have), len(candidates))
        mine = holders[have] == rank()  # among this rank's harvested rows, those it is the holder of
        positions = np.flatnonzero(have)[mine]
        parts = []
        if len(positions):
            take = torch.from_numpy(mine)
            y = torch.from_numpy(self.labels[candidates[positions]])
            parts.append(embed_outputs(z[take], y, h[take], self.embedding, self.num_classes, self.max_dim,
                                       self.seed)[0])
        gaps = np.flatnonzero(holders < 0)[rank()::world_size()]  # every rank knows the same gaps
        if len(gaps):
            parts.append(self._embed_rows(candidates[gaps]))
        self._harvest_counts = {"harvested": int((holders >= 0).sum()), "embedded": int((holders < 0).sum()),
                                "off": self.harvester.broken, "check": check}
        if not parts:
            return torch.zeros(0, 0), positions
        dtype = parts[0].dtype
        return torch.cat([part.to(dtype) for part in parts]), np.concatenate([positions, gaps])

    def _offer_clean_views(self, candidates: np.ndarray) -> None:
        """When this round's rows were harvested, let a policy that can use them (the density policy's label
        side) ask for a pass over the same candidates (eval mode, un-augmented): it does so only when the
        harvested rows hint that labels are flipped. Single-process rounds only: under DDP the ranks would
        have to agree on the pass before the policy runs, so there the label side decides on harvested rows."""
        counts = self._harvest_counts or {}
        if (not hasattr(self.policy, "use_clean_views") or self.harvester is None or not counts.get("harvested")
                or self._sharded() or self.gather is not None):
            return
        self.policy.use_clean_views(lambda: self.policy.cross_class_features(self._embed_rows(candidates).numpy(),
                                                                             self.num_classes))

    def _embed(self, candidates: np.ndarray, embedding_name: str | None = None) -> torch.Tensor:
        rows = (lambda idx: self._embed_rows(idx, embedding_name)) if embedding_name else self._embed_rows
        harvested = self.harvester is not None and (embedding_name or self.embedding) in HARVESTABLE
        if self._sharded():
            if harvested:
                return self._embed_harvested_distributed(candidates, embedding_name or self.embedding)
            return gather_embeddings(rows, candidates)
        emb = self._embed_harvested(candidates, embedding_name or self.embedding) if harvested else rows(candidates)
        return self.gather(emb) if self.gather is not None else emb

    def _embed_rows(self, indices: np.ndarray, embedding_name: str | None = None) -> torch.Tensor:
        return gradient_embeddings(unwrap_model(self.model), self.embed_dataset,
                                   embedding=embedding_name or self.embedding,
                                   batch_size=self.batch_size, device=self.device, last_layer=self.last_layer,
                                   max_dim=self.max_dim, seed=self.seed, indices=indices,
                                   num_classes=self.num_classes, collate_fn=self.embed_collate)

    def _embed_harvested(self, candidates: np.ndarray, embedding_name: str) -> torch.Tensor:
        """Rows from the last epoch's training steps; a pass only for the candidates it did not see."""
        h, z, have = self.harvester.rows(candidates, since_epoch=self.epoch)
        check = self._check_harvest(candidates[have], z) if have.any() else None
        if check is not None and not check["ok"]:
            h, z, have = h[:0], z[:0], np.zeros(len(candidates), dtype=bool)
        self._harvest_counts = {"harvested": int(have.sum()), "embedded": int((~have).sum()),
                                "off": self.harvester.broken, "check": check}
        if not have.any():
            return self._embed_rows(candidates, embedding_name)
        y = torch.from_numpy(self.labels[candidates[have]])
        emb, _ = embed_outputs(z, y, h, embedding_name, self.num_classes, self.max_dim, self.seed)
        if have.all():
            return emb
        out = torch.empty(len(candidates), emb.shape[1], dtype=emb.dtype)
        out[torch.from_numpy(have)] = emb
        out[torch.from_numpy(~have)] = self._embed_rows(candidates[~have], embedding_name).to(emb.dtype)
        return out

    def _embed_harvested_distributed(self, candidates: np.ndarray, embedding_name: str) -> torch.Tensor:
        """Each rank trained on its shard: gather the harvested rows by candidate position, then embed
        what no rank saw with the sharded pass (every rank knows the same gaps, so the collectives match)."""
        h, z, have = self.harvester.rows(candidates, since_epoch=self.epoch)
        check = self._check_harvest(candidates[have], z, reduce=True)
        if not check["ok"]:
            h, z, have = h[:0], z[:0], np.zeros(len(candidates), dtype=bool)
        local = torch.zeros(0, 0)
        if have.any():
            y = torch.from_numpy(self.labels[candidates[have]])
            local, _ = embed_outputs(z, y, h, embedding_name, self.num_classes, self.max_dim, self.seed)
        out, filled = gather_rows_by_position(local, np.flatnonzero(have), len(candidates))
        self._harvest_counts = {"harvested": int(filled.sum()), "embedded": int((~filled).sum()),
                                "off": self.harvester.broken, "check": check}
        if filled.all():
            return out
        rest = gather_embeddings(lambda idx: self._embed_rows(idx, embedding_name), candidates[~filled])
        if not filled.any():
            return rest
        out[torch.from_numpy(~filled)] = rest.to(out.dtype)
        return out

    def _check_harvest(self, harvested: np.ndarray, z: torch.Tensor, reduce: bool = False) -> dict:
        """:func:`~sanitizer.harvest.label_fit_check` on a random probe of the ``harvested`` indices (rows ``z``)
        against a pass over the same examples; when it fails, this round embeds with a pass (checked again
        every round: rows from the first epoch of training can fail where later ones pass). After
        :data:`~sanitizer.harvest.PASSED_TO_SHRINK` passed checks in a row the probe is
        :data:`~sanitizer.harvest.SMALL_PROBE` examples, until one fails.
        ``reduce``: sum the counts over the ranks (each rank probes its own rows), so all ranks decide alike."""
        rng = np.random.default_rng([self.seed, max(self.epoch, 0)])
        probe = SMALL_PROBE if self._harvest_checks_passed >= PASSED_TO_SHRINK else HARVEST_PROBE
        take = np.sort(rng.choice(len(harvested), min(probe // (world_size() if reduce else 1),
                                                      len(harvested)), replace=False))
        indices = harvested[take]
        check = label_fit_counts(0, 0, 0)
        if len(indices):
            labels = torch.from_numpy(self.labels[indices]).long()
            harvested_error, _ = embed_outputs(z[torch.from_numpy(take)], labels, None, "logits", self.num_classes,
                                               self.max_dim, self.seed)
            passed_error = self._embed_rows(indices, "logits").to(harvested_error.dtype)
            check = label_fit_check(harvested_error, passed_error, labels)
        if reduce:
            counts = torch.tensor([check["probe"], check["pass_only"], check["harvest_only"]], dtype=torch.float64)
            total = all_reduce_sum(counts)
            check = label_fit_counts(*(int(v) for v in total))
        self._harvest_checks_passed = self._harvest_checks_passed + 1 if check["ok"] and check["probe"] else 0
        if not check["ok"] and not self._harvest_check_warned:
            self._harvest_check_warned = True
            warnings.warn(f"at epoch {self.epoch} the harvested rows fit their labels {check['gap']:.0%} worse than a "
                          f"pass over the same {check['probe']} examples does (blended inputs such as mixup or cutmix, "
                          "or rows from a model that changed a lot during the epoch): such rounds embed with a "
                          "separate pass instead (correct, but slower)", stacklevel=4)
        return check

    def _start_harvest(self, required: bool) -> None:
        """Hook the last linear layer; in automatic mode (``harvest=None``) a model without a recognisable
        one keeps the separate pass instead of failing."""
        try:
            layer = self._last_linear()
        except (SanitizerError, RuntimeError, TypeError, ValueError):
            # automatic mode: e.g. text batches that need a collate the integration sets later
            if required:
                raise
            return
        self.harvester = Harvester(self.size)
        self.harvester.attach(layer)

    def harvest_unmatched(self, reason: str) -> None:
        """The training rows cannot be matched to examples in this setup: rounds embed with a separate pass
        (``reason`` goes to every round's record). Silent when harvesting was automatic (``harvest=None``),
        a warning when it was asked for (``harvest=True``). Integrations call it when they detect such a setup."""
        if self.harvester is not None and not self.harvester.broken:
            self.harvester.turn_off(reason, warn=bool(self.harvest))

    def _last_linear(self) -> nn.Linear:
        """The layer whose input and output harvest mode captures (found on one example when not given)."""
        if self.last_layer is None:
            self.last_layer = last_linear_of(unwrap_model(self.model), self.embed_dataset, self.num_classes,
                                             self.embed_collate)
        return self.last_layer

    def _record(self, epoch, candidates, dropped_now, scores, t_embed, t_select) -> RoundRecord:
        labels = self.labels[candidates]
        per_class = {}
        for c in range(self.num_classes):
            in_c = labels == c
            s = scores[in_c]
            per_class[str(c)] = {
                "candidates": int(in_c.sum()),
                "dropped_now": int(np.isin(candidates[in_c], dropped_now).sum()),
                "kept": int((self.keep & (self.labels == c)).sum()),
                "score_median": float(np.median(s)) if len(s) else None,
                "score_p95": float(np.percentile(s, 95)) if len(s) else None,
                "score_max": float(s.max()) if len(s) else None,
            }
        return RoundRecord(
            round=len(self.history), epoch=int(epoch), policy=self.policy.name, embedding=self.embedding,
            candidates=int(len(candidates)), dropped_now=[int(i) for i in dropped_now],
            dropped_total=int((~self.keep).sum()), per_class=per_class, seconds_embed=round(t_embed, 4),
            seconds_select=round(t_select, 4),
        )

    # -- loaders --------------------------------------------------------------------------------
    def sampler(self, shuffle: bool = True, seed: int | None = None, num_replicas: int = 1, rank: int = 0,
                drop_last: bool = False, length: int | None = None) -> KeepSampler:
        """A sampler over the kept indices that follows this sanitizer's rounds and epochs
        (``length``: a fixed epoch length, see :class:`~sanitizer.sampler.KeepSampler`)."""
        s = KeepSampler(self.keep_mask, shuffle, self.seed if seed is None else seed, num_replicas, rank, drop_last,
                        length)
        if num_replicas == 1 and world_size() > 1:
            self.harvest_unmatched("under torch.distributed this sampler yields every rank's indices and another "
                                   "sampler (e.g. accelerate's) splits them, so harvested rows cannot be matched to "
                                   "examples; pass num_replicas and rank to sampler() to harvest")
        if self.harvester is not None:
            s.on_order = self.harvester.start_order
        s.set_epoch(max(self.epoch, 0))
        # without its own seed it follows the sanitizer's, also when load_state_dict adopts another one
        return self._samplers.add(s, follows_seed=seed is None)

    def wrap(self, loader: DataLoader) -> KeptLoader:
        """A DataLoader like ``loader`` (same dataset, batch size, workers, collate, ...) over kept indices."""
        return self._wrap(loader, KeptLoader)

    def _wrap(self, loader: DataLoader, loader_class: type[KeptLoader]) -> KeptLoader:
        if loader.dataset is not self.dataset and check_map_dataset(loader.dataset) != self.size:
            raise SanitizerError(f"the loader's dataset has {len(loader.dataset)} examples but the sanitizer "
                                 f"was built on {self.size}")
        layout = sampler_layout(loader)
        sampler = self.sampler(**layout)
        wrapped = loader_class(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                               **loader_settings(loader))
        wrapped.sanitizer = self
        return wrapped

    # -- certificate ----------------------------------------------------------------------------
    def certificate(self, path: str | None = None, **options: Any) -> dict[str, Any]:
        """The certificate of this run (audit, bound, optional robustness and partition sections) as a
        dict, written to ``path`` as JSON when given; see :func:`sanitizer.certificate.build_certificate`."""
        from sanitizer.certificate import build_certificate

        # Under torch.distributed every rank gets the dict; only rank 0 writes the file.
        return build_certificate(self, path=path if is_main_process() else None, **options)

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the keep mask, the history and the epoch (tensors and plain types)."""
        return {"version": STATE_VERSION, "size": self.size, "keep": torch.from_numpy(self.keep.copy()),
                "history": [dict(r) for r in self.history], "epoch": self.epoch, "seed": self.seed,
                "policy": self.policy.name, "policy_state": self.policy.state_dict(),
                "audit_scores": {f"{e}:{p}": torch.from_numpy(v.copy()) for (e, p), v in self.audit_scores.items()},
                **({"harvest": self.harvester.state_dict()} if self.harvester is not None else {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`. The state must come from a Sanitizer with the same dataset size
        and policy; a different seed is adopted with a warning (the samplers that follow the sanitizer's
        seed are reseeded), so the resumed run shuffles and drops exactly as the saved one would have.

        Example:
            >>> sanitizer.load_state_dict(torch.load("ckpt.pt", weights_only=True)["sanitizer"])  # doctest: +SKIP
        """
        self._check_state(state)
        self.keep = _state_keep(state["keep"], self.size)
        self.history = [RoundRecord(r) for r in state["history"]]
        self.epoch = _state_int(state, "epoch", -1)
        self._adopt_seed(_state_int(state, "seed", -(2**63)))
        self.audit_scores = self._state_audit_scores(state.get("audit_scores", {}))
        self.policy.load_state_dict(state.get("policy_state") or {})  # older states have none
        if self.harvester is not None and state.get("harvest") is not None:
            self.harvester.load_state_dict(state["harvest"])
        self._samplers.set_epoch(max(self.epoch, 0))

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Refuse a state that is not a sanitizer state, or one saved by an incompatible Sanitizer."""
        if not isinstance(state, Mapping):
            raise SanitizerError(f"load_state_dict takes the dict returned by Sanitizer.state_dict(), got "
                                 f"{type(state).__name__}")
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise SanitizerError(f"the sanitizer state lacks {', '.join(map(repr, missing))}; pass the dict returned "
                                 "by Sanitizer.state_dict() (e.g. checkpoint['sanitizer']), not the model's or "
                                 "the trainer's state")
        history = state["history"]
        if not isinstance(history, (list, tuple)) or not all(isinstance(r, Mapping) for r in history):
            raise SanitizerError("the state's history must be a list of round dicts, as Sanitizer.state_dict() "
                                 "saves it; the state is corrupt or was edited")
        if state["version"] != STATE_VERSION:
            raise SanitizerError(f"unsupported sanitizer state version {state['version']!r} (this sanitizer reads "
                                 f"version {STATE_VERSION}); resume with the sanitizer version that saved it")
        if any(not isinstance(r.get("epoch"), int) for r in history):
            raise SanitizerError("every round record in the state's history needs its integer 'epoch', as "
                                 "Sanitizer.state_dict() saves it; the state is corrupt or was edited")
        if _state_int(state, "size", 0) != self.size:
            raise SanitizerError(f"the checkpoint was taken on a dataset of {state['size']} examples, "
                                 f"this one has {self.size}; resume on the same dataset")
        if state["policy"] != self.policy.name:
            raise SanitizerError(f"the state was saved by a Sanitizer with policy {state['policy']!r}, this one uses "
                                 f"{self.policy.name!r}; build it with policy={state['policy']!r} to resume that run")

    def _state_audit_scores(self, saved: Mapping[str, Any]) -> dict[tuple[int, str], np.ndarray]:
        """The audit scores of a state, keyed ``"<epoch>:<policy>"``, each one score per example."""
        out = {}
        for key, value in saved.items():
            epoch, sep, label = str(key).partition(":")
            if not sep or not epoch.lstrip("-").isdigit():
                raise SanitizerError(f"audit score key {key!r} in the state is not '<epoch>:<policy>'; the state "
                                     "is corrupt or was edited")
            scores = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float32)
            if scores.shape != (self.size,):
                raise SanitizerError(f"audit scores {key!r} in the state have shape {scores.shape}, not "
                                     f"({self.size},) (one per example); the state is corrupt or was edited")
            out[(int(epoch), label)] = scores
        return out

    def _adopt_seed(self, seed: int) -> None:
        """Take the saved run's seed (loudly when it differs) so rounds and shuffles continue that run."""
        if seed == self.seed:
            return
        warnings.warn(f"the resumed state was saved with seed={seed} but this Sanitizer was built with "
                      f"seed={self.seed}; adopting seed={seed} so the run continues as it would have. Build the "
                      f"Sanitizer with seed={seed} to silence this", stacklevel=3)
        self.seed = seed
        self._samplers.reseed(seed)
