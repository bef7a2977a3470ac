"""Harvest mode: take each example's last-layer input and output from the training step itself.

The last-layer gradient embedding (softmax(z) − onehot(y)) ⊗ [h; 1] needs only the logits ``z`` and
the penultimate features ``h`` of an example, and the training forward pass computes both. A
:class:`Harvester` keeps them (a forward hook on the last linear layer, active only in train mode
with gradients on) and keys them by dataset index through the order in which the sanitizer's sampler
yielded the epoch's indices. A round then embeds from what the last epoch harvested and needs no
pass of its own over the data.

What changes against a separate pass (``benchmarks/harvest_study.py`` measures it): the rows come from
the augmented views the model trained on, in train mode (BatchNorm batch statistics, dropout), and
from different moments of the epoch rather than one model. The rows of one epoch are matched to the
sampler's order by position, which holds when the training loop makes exactly one training forward per
batch, in the loader's order. When more rows arrive than the sampler yielded (a second forward per
batch, gradient checkpointing, two training loaders), the harvester stops trusting the match: it
warns and every later round falls back to a separate pass.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from sanitizer.errors import SanitizerError


class Harvester:
    """Keeps, per dataset index, the last linear layer's input ``h`` and output ``z`` from the latest
    training step that saw the example.

    Example:
        >>> harvester = Harvester(size=len(train_set))               # doctest: +SKIP
        >>> harvester.attach(model.fc)                                # doctest: +SKIP
        >>> harvester.start_order(np.array(list(sampler)), epoch=0)  # doctest: +SKIP (the sampler does this)
        >>> ...train one epoch...                                     # doctest: +SKIP
        >>> h, z, have = harvester.rows(np.arange(len(train_set)))    # doctest: +SKIP
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.h: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.seen_epoch = np.full(self.size, -1, dtype=np.int64)
        self.broken: str | None = None  # why harvested rows can no longer be trusted
        self._order: np.ndarray | None = None
        self._filled = 0  # positions of the current order already stored (a checkpoint flushes mid-epoch)
        self._epoch = -1
        self._buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle = None
        self._layer: nn.Module | None = None

    # -- capture ----------------------------------------------------------------------------------
    def attach(self, layer: nn.Linear) -> None:
        """Start capturing the training forwards of ``layer`` (idempotent)."""
        if self._handle is None:
            self._layer = layer
            self._handle = layer.register_forward_hook(self._capture)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __getstate__(self) -> dict:
        # a hook handle does not pickle (Lightning's ddp_spawn pickles the model and the sanitizer): the model's
        # copied hook calls this copy, which adopts the layer it first fires on (see _capture)
        return {**self.__dict__, "_handle": None, "_layer": None}

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not module.training or not torch.is_grad_enabled() or self.broken or self._order is None:
            return
        if self._layer is None:  # an unpickled copy (Lightning's ddp_spawn): the hook sits on one layer, this one
            self._layer = module
        if module is not self._layer:  # a replica (nn.DataParallel): chunks of a batch arrive from threads
            self.turn_off("the model runs replicas of its last layer (nn.DataParallel?), whose rows arrive out of "
                          "order")
            return
        h = inputs[0]
        if h.ndim != 2 or output.ndim != 2:
            self.turn_off(f"the last linear layer sees inputs of shape {tuple(h.shape)}, not [batch, features]")
            return
        self._buffer.append((h.detach().float().cpu(), output.detach().float().cpu()))

    def start_order(self, order: np.ndarray, epoch: int) -> None:
        """The sampler is starting to yield ``order`` (this process's indices of ``epoch``): file the
        rows captured under the previous order, then match the coming rows against this one."""
        self.flush()
        self._order = np.asarray(order, dtype=np.int64)
        self._filled = 0
        self._epoch = int(epoch)

    def flush(self) -> None:
        """Store the buffered rows under the indices of the current order, by position."""
        if not self._buffer:
            return
        h = torch.cat([b[0] for b in self._buffer])
        z = torch.cat([b[1] for b in self._buffer])
        self._buffer.clear()
        if self.broken or self._order is None:
            return
        start, stop = self._filled, self._filled + len(h)
        if stop > len(self._order):
            self.turn_off(f"{stop} training rows reached the last layer while the sampler yielded {len(self._order)} "
                        "indices (more than one training forward per batch, or a second training loader?)")
            return
        if self.h is None:
            self.h = torch.zeros(self.size, h.shape[1])
            self.z = torch.zeros(self.size, z.shape[1])
        positions = self._order[start:stop]
        self.h[torch.from_numpy(positions)] = h
        self.z[torch.from_numpy(positions)] = z
        self.seen_epoch[positions] = self._epoch
        self._filled = stop

    def turn_off(self, reason: str, warn: bool = True) -> None:
        """Stop harvesting for the rest of training (rounds then embed with a pass; later captures return at
        once): ``reason`` goes to every round's record; ``warn=False`` when harvesting was only automatic."""
        self.broken = reason
        self._buffer.clear()
        if warn:
            warnings.warn(f"harvest mode is off for the rest of training: {reason}. Rounds embed with a separate "
                          "pass instead (correct, but slower).", stacklevel=3)

    # -- read ---------------------------------------------------------------------------------------
    def rows(self, indices: np.ndarray, since_epoch: int = -1) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """``(h, z, have)`` for ``indices``: the harvested rows of the indices captured at or after
        ``since_epoch`` (``have`` marks them, in the order of ``indices``)."""
        self.flush()
        indices = np.asarray(indices, dtype=np.int64)
        if self.broken or self.h is None:
            return torch.zeros(0), torch.zeros(0), np.zeros(len(indices), dtype=bool)
        have = self.seen_epoch[indices] >= max(since_epoch, 0)
        take = torch.from_numpy(indices[have])
        return self.h[take], self.z[take], have

    def state_dict(self) -> dict:
        """The harvested rows, for a checkpoint: a run resumed before a round embeds what it would have
        embedded uninterrupted. Size: (d + C) float32 per example (18 MB for 50,000 × (80 + 10))."""
        self.flush()
        return {"h": self.h, "z": self.z, "seen_epoch": torch.from_numpy(self.seen_epoch.copy()),
                "broken": self.broken}

    def load_state_dict(self, state: dict) -> None:
        h, z, seen = state.get("h"), state.get("z"), state.get("seen_epoch")
        if seen is None or len(seen) != self.size or (h is None) != (z is None):
            raise SanitizerError("the harvest state does not match this dataset (saved for another size, or "
                                 "edited); save it again with Sanitizer.state_dict()")
        if h is not None:
            h, z = torch.as_tensor(h, dtype=torch.float32), torch.as_tensor(z, dtype=torch.float32)
            if h.ndim != 2 or z.ndim != 2 or len(h) != self.size or len(z) != self.size:
                raise SanitizerError(f"harvested rows of shape {tuple(h.shape)} and {tuple(z.shape)} do not fit a "
                                     f"dataset of {self.size} examples")
        self.h, self.z = h, z
        self.seen_epoch = np.asarray(seen, dtype=np.int64).copy()
        self.broken = state.get("broken")
        self._buffer.clear()
        self._order = None

    def state(self) -> dict:
        """A summary for the round's record."""
        return {"broken": self.broken, "harvested": int((self.seen_epoch >= 0).sum())}


# -- is a harvested row the example's own? -----------------------------------------------------------
PROBE = 512  # harvested examples re-embedded by a pass each round to check the rows
# Once the rows have passed PASSED_TO_SHRINK checks in a row the loop does not blend inputs, and later rounds
# check a smaller probe (a quarter of the cost: on a 2,500-image fine-tuning set the full probe was a fifth of
# a pass every round); it still sees strong blending (gaps of 0.3 and more) and a failure restores the full one.
SMALL_PROBE, PASSED_TO_SHRINK = 128, 2
MAX_FIT_GAP = 0.10  # the rows may fit their labels at most this much worse than the examples do
FIT_ALPHA = 1e-3  # ... beyond chance (one-sided sign test on the discordant pairs)


def label_fit_check(harvested_error: torch.Tensor, passed_error: torch.Tensor, labels: torch.Tensor) -> dict:
    """Do harvested rows fit their examples' labels as the examples themselves do? Paired over a probe:
    ``*_error`` are the rows' ``softmax(z) − onehot(y)`` (the ``logits`` embedding) from the training steps
    and from an eval-mode pass over the same examples. A loop that blends inputs (mixup, cutmix) feeds the
    last layer rows that are not the example alone, and about half of them are predicted as the partner's
    class: the harvested rows then get the label right far less often than a pass over the examples does.
    An ordinary loop's rows (augmented views, train mode) fit their labels about as well as the pass does,
    or better (they are the views the model just trained on).

    Returns ``{"probe", "pass_only", "harvest_only", "gap", "p", "ok"}``: ``pass_only`` counts the examples
    the pass gets right and the harvested row wrong, ``harvest_only`` the reverse; ``ok`` is False when
    ``gap = (pass_only − harvest_only) / probe`` exceeds :data:`MAX_FIT_GAP` and a one-sided sign test on
    the discordant pairs gives ``p`` < :data:`FIT_ALPHA`.

    Example:
        >>> y = torch.tensor([0, 1] * 50)
        >>> onehot = torch.nn.functional.one_hot(y, 2).float()
        >>> right = (0.9 * onehot + 0.1 * (1 - onehot)) - onehot  # softmax 0.9 on the label
        >>> wrong = (0.1 * onehot + 0.9 * (1 - onehot)) - onehot  # softmax 0.9 on the other class
        >>> label_fit_check(wrong, right, y)["ok"], label_fit_check(right, right, y)["ok"]
        (False, True)
    """
    def right(error: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(labels, error.shape[1]).to(error.dtype)
        return (error + onehot).argmax(1) == labels

    h, p = right(harvested_error), right(passed_error)
    return label_fit_counts(len(labels), int((p & ~h).sum()), int((h & ~p).sum()))


def label_fit_counts(probe: int, pass_only: int, harvest_only: int) -> dict:
    """:func:`label_fit_check`'s verdict from its counts (summed over ranks under torch.distributed)."""
    from scipy.stats import binom

    gap = (pass_only - harvest_only) / max(probe, 1)
    discordant = pass_only + harvest_only
    p_value = float(binom.sf(pass_only - 1, discordant, 0.5)) if discordant else 1.0
    return {"probe": probe, "pass_only": pass_only, "harvest_only": harvest_only, "gap": round(gap, 4),
            "p": p_value, "ok": not (gap > MAX_FIT_GAP and p_value < FIT_ALPHA)}
