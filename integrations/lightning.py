"""PyTorch Lightning adapter: :class:`SanitizerCallback`.

How it fits Lightning's loader lifecycle. Lightning measures the length of an epoch (and, under
DDP, wraps the sampler in a ``DistributedSamplerWrapper``) when it sets up the train loader, which
happens *before* ``on_train_epoch_start``. So:

- the train loader must be re-built every epoch: ``Trainer(reload_dataloaders_every_n_epochs=1)``
  (checked: the callback raises otherwise);
- the loader's sampler is the sanitizer's keep-mask sampler (``callback.wrap(loader)``); when
  Lightning asks it for its length or its indices for epoch ``e``, the callback first runs the
  round due at epoch ``e`` with the weights the model has at that moment (the end of epoch
  ``e - 1``). A run resumed with ``fit(ckpt_path=...)`` therefore repeats exactly the rounds of an
  uninterrupted run, whichever hook saved the checkpoint;
- under DDP, keep ``use_distributed_sampler=True`` (the default) and pass a loader *without* a
  DistributedSampler: Lightning splits the kept indices between ranks with equal lengths. With
  ``use_distributed_sampler=False`` pass a loader with your own ``DistributedSampler``; ``wrap``
  turns it into a rank-aware keep sampler. A mismatch (an epoch whose length does not follow the
  kept set) raises.

The sanitizer's state (keep mask, history, epoch) is saved in Lightning checkpoints through
``state_dict`` / ``load_state_dict``. After each round the callback logs ``sanitizer/dropped_now``,
``sanitizer/dropped_total``, ``sanitizer/round`` and ``sanitizer/candidates`` with ``pl_module.log``
(at the end of the round's epoch, to every logger of the trainer and to ``trainer.callback_metrics``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from sanitizer.core import Sanitizer
from sanitizer.errors import SanitizerError
from sanitizer.sampler import KeepSampler

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]


class SanitizerCallback(pl.Callback):
    """Runs the sanitizer's rounds during ``Trainer.fit``; later epochs iterate only kept examples.

    Example::

        model = LitClassifier()
        sanitizer = Sanitizer(model, train_set, embed_dataset=train_set_without_augmentation,
                              warmup=5, every=5)
        callback = SanitizerCallback(sanitizer)
        loader = callback.wrap(DataLoader(train_set, batch_size=128, shuffle=True))
        trainer = L.Trainer(max_epochs=30, callbacks=[callback], reload_dataloaders_every_n_epochs=1)
        trainer.fit(model, train_dataloaders=loader)
        print(sanitizer.dropped)

    ``wrap`` can equally be called inside ``LightningModule.train_dataloader`` or a
    ``LightningDataModule``. The sanitizer's model must be the LightningModule (or one of its
    submodules) whose forward returns the logits.
    """

    def __init__(self, sanitizer: Sanitizer) -> None:
        if not isinstance(sanitizer, Sanitizer):
            raise SanitizerError(f"SanitizerCallback takes a Sanitizer, got {type(sanitizer).__name__}")
        self.sanitizer = sanitizer
        self._trainer: pl.Trainer | None = None
        self._loader: tuple[int, bool, KeepSampler] | None = None  # batch size, drop_last, sampler
        self._synced_epoch: int | None = None
        self._logged_round: int | None = None

    # -- the loader ------------------------------------------------------------------------------
    def wrap(self, loader: DataLoader) -> DataLoader:
        """The train loader over kept examples (same dataset, batch size, workers, collate)."""
        wrapped = self.sanitizer.wrap(loader)
        sampler = wrapped.sampler
        sampler.keep_mask = self._keep_mask
        self._loader = (wrapped.batch_size, wrapped.drop_last, sampler)
        return wrapped

    def _keep_mask(self) -> np.ndarray:
        self._sync()
        return self.sanitizer.keep_mask()

    def _fitting(self) -> bool:
        """True while ``fit`` sets up an epoch it will train (Lightning also measures the loader
        when it tears down, after the last epoch: no round must run then)."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit" or not trainer.training or trainer.sanity_checking:
            return False
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs:
            return False
        if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
            return False
        return not trainer.should_stop

    def _sync(self) -> None:
        """Run the round due at the trainer's current epoch (once) and set the samplers' epoch."""
        if self._fitting():
            epoch = self._trainer.current_epoch
            self.sanitizer.start_epoch(epoch)
            self._synced_epoch = epoch

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise SanitizerError(
                "SanitizerCallback needs Trainer(reload_dataloaders_every_n_epochs=1): Lightning fixes the "
                "length of an epoch when it sets up the train loader, so the loader must be set up again "
                "after each round to iterate only the kept examples"
            )
        model = self.sanitizer.model
        model = getattr(model, "module", model)  # a DistributedDataParallel around the module
        if not any(m is model for m in pl_module.modules()):
            raise SanitizerError(
                "the sanitizer was built on a different model than the LightningModule being trained; "
                "build it with Sanitizer(lightning_module, ...) so its rounds embed with the trained weights"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._synced_epoch != trainer.current_epoch:
            raise SanitizerError(
                "the train loader does not draw from the sanitizer: pass callback.wrap(loader) to "
                "trainer.fit(train_dataloaders=...) or return it from train_dataloader()"
                + ("" if self._loader is None else
                   "; if it does, it was not set up again for this epoch (reload_dataloaders_every_n_epochs=1)")
            )
        self._check_length(trainer)
        if trainer.world_size > 1 and self._loader is not None and self._loader[2].num_replicas == 1:
            self.sanitizer.harvest_unmatched("Lightning's DistributedSamplerWrapper splits the kept indices between "
                                             "ranks, so training rows cannot be matched to examples; with "
                                             "use_distributed_sampler=False and a DistributedSampler in the wrapped "
                                             "loader each rank's order is known and harvesting works")
        self._log_round(trainer, pl_module)

    def _log_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the drop counts of the round that ran for this epoch (once)."""
        history = self.sanitizer.history
        if not history or history[-1]["epoch"] != trainer.current_epoch or history[-1]["round"] == self._logged_round:
            return
        self._logged_round = history[-1]["round"]
        # Every rank holds the same values: no sync needed.
        pl_module.log_dict(history[-1].metrics(), on_step=False, on_epoch=True, sync_dist=False)

    def _check_length(self, trainer: pl.Trainer) -> None:
        """The epoch Lightning set up must have as many batches as the kept set gives."""
        limit = trainer.limit_train_batches
        if self._loader is None or not (isinstance(limit, float) and limit == 1.0) or trainer.overfit_batches:
            return
        batch_size, drop_last, sampler = self._loader
        own = len(sampler)
        # Our sampler already split between ranks, or Lightning's DistributedSamplerWrapper splits it.
        per_rank = {own} if sampler.num_replicas > 1 else {own, math.ceil(own / trainer.world_size)}
        expected = {n // batch_size if drop_last else math.ceil(n / batch_size) for n in per_rank}
        if trainer.num_training_batches not in expected:
            raise SanitizerError(
                f"this epoch has {trainer.num_training_batches} batches but the kept examples give "
                f"{sorted(expected)}; the loader given to wrap() probably has a DistributedSampler while "
                "Trainer(use_distributed_sampler=True) splits it again. Pass a loader without a "
                "DistributedSampler, or set use_distributed_sampler=False"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._trainer = None

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.sanitizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sanitizer.load_state_dict(state_dict)
