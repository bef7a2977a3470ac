"""A sampler over the kept indices of a dataset, and the DataLoader wrapper that installs it."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from sanitizer.errors import SanitizerError, check_map_dataset
from sanitizer.stats import mix_seed


class KeepSampler(Sampler[int]):
    """Yields the indices where ``keep_mask()`` is True, shuffled with ``(seed, epoch)``.

    The shuffle permutes *all* indices and then skips the dropped ones, so dropping examples does not
    reshuffle the rest: an epoch visits the kept examples in the order the run would have visited them
    with nothing dropped. A defended run and its undefended twin (same seed) see the same sequence of
    examples apart from the dropped ones, which keeps paired comparisons between them tight.

    Rank-aware like ``DistributedSampler``: with ``num_replicas > 1`` the kept indices are padded
    (by repeating from the start) to a multiple of ``num_replicas`` so every rank gets the same
    number of examples, then rank ``r`` takes every ``num_replicas``-th index starting at ``r``.

    ``length`` fixes the number of indices per epoch (before the split between replicas): the
    shuffled kept indices are repeated from the start until ``length`` is reached, so an epoch still
    contains only kept examples but keeps its original size. Trainers that compute the number of
    steps per epoch once (Hugging Face ``Trainer``) need this.

    Example:
        >>> mask = np.array([True, False, True, True])
        >>> sorted(KeepSampler(lambda: mask, shuffle=False))
        [0, 2, 3]
    """

    def __init__(self, keep_mask: Callable[[], np.ndarray], shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = False, length: int | None = None) -> None:
        if not 0 <= rank < num_replicas:
            raise SanitizerError(f"rank {rank} is out of range for {num_replicas} replicas")
        if length is not None and length < 1:
            raise SanitizerError(f"length must be a positive number of indices, got {length}")
        self.length = length
        self.keep_mask = keep_mask
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        # called with (this process's indices, epoch) each time an epoch's iteration starts (harvest mode)
        self.on_order: Callable[[np.ndarray, int], None] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_indices(self) -> np.ndarray:
        mask = np.asarray(self.keep_mask(), dtype=bool)
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(len(mask), generator=gen).numpy()
            kept = order[mask[order]]
        else:
            kept = np.flatnonzero(mask)
        if self.length is not None:
            if not len(kept):
                raise SanitizerError("every example has been dropped; there is nothing left to train on")
            kept = np.resize(kept, self.length)
        if self.num_replicas > 1:
            if self.drop_last:
                kept = kept[: len(kept) - len(kept) % self.num_replicas]
            elif len(kept) % self.num_replicas:
                pad = self.num_replicas - len(kept) % self.num_replicas
                kept = np.concatenate([kept, np.resize(kept, pad)])
        return kept

    def __iter__(self) -> Iterator[int]:
        order = self._all_indices()[self.rank::self.num_replicas]
        if self.on_order is not None:
            self.on_order(order, self.epoch)
        return iter(order.tolist())

    def __len__(self) -> int:
        n = int(self.keep_mask().sum()) if self.length is None else self.length
        if self.num_replicas == 1:
            return n
        if self.drop_last:
            return n // self.num_replicas
        return -(-n // self.num_replicas)


class SamplerRegistry:
    """The samplers a Sanitizer hands out, held weakly so that a dropped loader's sampler is freed
    (``wrap()`` in every epoch no longer grows the sanitizer). ``set_epoch`` reaches every live
    sampler; ``reseed`` only those registered with ``follows_seed=True`` (made without an explicit
    seed, so they follow the sanitizer's).

    Example:
        >>> registry = SamplerRegistry()
        >>> s = registry.add(KeepSampler(lambda: np.ones(3, bool)), follows_seed=True)
        >>> registry.set_epoch(4); registry.reseed(7); (s.epoch, s.seed, len(registry))
        (4, 7, 1)
        >>> del s; len(registry)
        0
    """

    def __init__(self) -> None:
        self._all: weakref.WeakSet[KeepSampler] = weakref.WeakSet()
        self._seeded: weakref.WeakSet[KeepSampler] = weakref.WeakSet()

    def add(self, sampler: KeepSampler, follows_seed: bool = False) -> KeepSampler:
        self._all.add(sampler)
        if follows_seed:
            self._seeded.add(sampler)
        return sampler

    def set_epoch(self, epoch: int) -> None:
        for sampler in list(self._all):
            sampler.set_epoch(epoch)

    def reseed(self, seed: int) -> None:
        for sampler in list(self._seeded):
            sampler.seed = seed

    def __getstate__(self) -> dict:
        # WeakSets do not pickle (Lightning's ddp_spawn pickles the callback and its sanitizer): pickle the
        # live samplers themselves; the unpickled loaders that share them keep them alive in the child.
        return {"all": list(self._all), "seeded": list(self._seeded)}

    def __setstate__(self, state: dict) -> None:
        self._all, self._seeded = weakref.WeakSet(state["all"]), weakref.WeakSet(state["seeded"])

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[KeepSampler]:
        return iter(list(self._all))


_COPIED = ("num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
           "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers", "pin_memory_device")


def loader_settings(loader: DataLoader) -> dict:
    """The settings of ``loader`` that a replacement loader must keep."""
    settings = {name: getattr(loader, name) for name in _COPIED if hasattr(loader, name)}
    if settings.get("num_workers", 0) == 0:
        settings.pop("prefetch_factor", None)
        settings["persistent_workers"] = False
    if not settings.get("pin_memory_device"):
        settings.pop("pin_memory_device", None)
    return settings


def sampler_layout(loader: DataLoader) -> dict:
    """How the user's loader samples: shuffle, and the DDP layout when it has a DistributedSampler."""
    check_map_dataset(loader.dataset)
    if loader.batch_size is None:
        raise SanitizerError(
            "the loader uses a custom batch_sampler (batch_size is None); Sanitizer.wrap supports loaders "
            "built with batch_size and an ordinary sampler. Build the loader with batch_size=..., or use "
            "Sanitizer.sampler() inside your own batch sampler."
        )
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler._num_samples is not None:
            raise SanitizerError("RandomSampler with replacement or num_samples is not supported by wrap()")
        return {"shuffle": True}
    if isinstance(sampler, SequentialSampler):
        return {"shuffle": False}
    if isinstance(sampler, DistributedSampler):
        return {"shuffle": sampler.shuffle, "num_replicas": sampler.num_replicas, "rank": sampler.rank,
                "drop_last": sampler.drop_last, "seed": sampler.seed}
    raise SanitizerError(
        f"the loader uses a custom sampler ({type(sampler).__name__}); wrap() supports shuffle=True/False "
        "and DistributedSampler. Use Sanitizer.sampler() to get the keep-mask sampler and compose it yourself."
    )
