"""Hugging Face ``transformers`` adapter: :class:`SanitizedTrainer` and :class:`SanitizerTrainerCallback`.

A ``TrainerCallback`` can run the rounds but cannot replace the train sampler, so the adapter is a
``Trainer`` subclass that installs the sanitizer's keep sampler, adds the callback, and saves the
sanitizer's state in every checkpoint folder (``sanitizer_state.pt``, read back with
``weights_only=True``) so ``train(resume_from_checkpoint=...)`` continues with the same dropped set.

Epoch length. The ``Trainer`` computes the number of steps per epoch once, before training, and
derives the epoch to resume from as ``global_step // steps_per_epoch``. So every epoch keeps its
original length: it is made of kept examples only, the shuffled kept set followed by as many of
them again as were dropped (``KeepSampler(length=len(dataset))``). The step count, the
learning-rate schedule and resuming stay exactly as without the sanitizer.

After each round the drop counts (``sanitizer/dropped_now``, ``sanitizer/dropped_total``,
``sanitizer/round``, ``sanitizer/candidates``) go through ``Trainer.log``: they are in
``trainer.state.log_history`` and reach every ``report_to`` integration.

Under torch.distributed (``torchrun`` / ``accelerate launch``) every process runs the rounds
together (the embeddings are sharded and gathered, see :mod:`sanitizer.distributed`) and accelerate
splits the identical index stream into equal numbers of batches per process.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from sanitizer.core import Sanitizer
from sanitizer.distributed import is_main_process
from sanitizer.errors import SanitizerError, check_map_dataset
from sanitizer.sampler import KeepSampler

STATE_FILE = "sanitizer_state.pt"


class SanitizerTrainerCallback(TrainerCallback):
    """Runs the round due at the start of each epoch and passes its drop counts to ``log`` (the
    trainer's ``Trainer.log``). Added for you by :class:`SanitizedTrainer`; on its own (with a plain
    ``Trainer``) it refuses to start, since it cannot install the sampler."""

    def __init__(self, sanitizer: Sanitizer, log: Callable[[dict[str, float]], None] | None = None) -> None:
        self.sanitizer = sanitizer
        self.log = log
        self.installed = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.installed:
            raise SanitizerError(
                "SanitizerTrainerCallback cannot replace the Trainer's train sampler by itself; use "
                "SanitizedTrainer(..., sanitizer=sanitizer) instead of Trainer(..., callbacks=[...])"
            )

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is a float (epoch + fraction done); at an epoch boundary it is an integer.
        record = self.sanitizer.start_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))
        if record is not None and self.log is not None:
            self.log(record.metrics())


class SanitizedTrainer(Trainer):
    """A ``transformers.Trainer`` whose training epochs iterate only the examples the sanitizer keeps.

    The train dataset yields dicts (``{"pixel_values": ..., "labels": ...}``,
    ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``) like any ``Trainer`` dataset; the
    sanitizer embeds them through the same model, with the trainer's data collator unless the
    sanitizer was given its own ``embed_collate``.

    Example::

        model = BertForSequenceClassification(config)
        sanitizer = Sanitizer(model, train_set, warmup=1, every=1)
        trainer = SanitizedTrainer(model=model, args=TrainingArguments("out", num_train_epochs=5),
                                   train_dataset=train_set, data_collator=collate, sanitizer=sanitizer)
        trainer.train()                      # or trainer.train(resume_from_checkpoint=True)
        print(sanitizer.dropped)
    """

    def __init__(self, *args: Any, sanitizer: Sanitizer, **kwargs: Any) -> None:
        if not isinstance(sanitizer, Sanitizer):
            raise SanitizerError(f"sanitizer must be a Sanitizer, got {type(sanitizer).__name__}")
        self.sanitizer = sanitizer
        train_dataset = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        if train_dataset is not None:  # before Trainer's own checks, so the message names the fix
            self._check_dataset(train_dataset)
        super().__init__(*args, **kwargs)
        if sanitizer.embed_collate is None and sanitizer.embed_dataset is sanitizer.dataset:
            sanitizer.embed_collate = self.data_collator
        self.sanitizer_callback = SanitizerTrainerCallback(sanitizer, log=self.log)
        self.sanitizer_callback.installed = True
        self.add_callback(self.sanitizer_callback)

    def _check_dataset(self, dataset: Dataset) -> None:
        n = check_map_dataset(dataset)
        if n != self.sanitizer.size:
            raise SanitizerError(f"the train dataset has {n} examples but the sanitizer was built on "
                                 f"{self.sanitizer.size}; build it on the same dataset")

    def _get_train_sampler(self, train_dataset: Dataset | None = None, *args: Any, **kwargs: Any) -> KeepSampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        self._check_dataset(dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return self.sanitizer.sampler(shuffle=True, seed=seed, length=len(dataset))

    # -- checkpoints -----------------------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        super()._save_checkpoint(model, trial, *args, **kwargs)
        if self.args.should_save and is_main_process():
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            torch.save(self.sanitizer.state_dict(), os.path.join(folder, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if os.path.isfile(path):
            self.sanitizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            warnings.warn(f"{resume_from_checkpoint} has no {STATE_FILE} (it was not saved by SanitizedTrainer); "
                          "the sanitizer starts with every example kept", stacklevel=2)
