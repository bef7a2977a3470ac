"""Hugging Face Trainer: SanitizedTrainer on image tensors and on a tiny BERT text classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from planted import NUM_CLASSES, planted_blobs, tiny_mlp, weights
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from sanitizer import Sanitizer
from sanitizer.errors import SanitizerError

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.modeling_outputs import ImageClassifierOutput  # noqa: E402

from sanitizer.integrations.huggingface import STATE_FILE, SanitizedTrainer, SanitizerTrainerCallback  # noqa: E402

EPOCHS = 4
BATCH = 32


class DictImages(Dataset):
    """Image tensors as Trainer-style dict examples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


class TinyImageClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def _args(out, **kwargs) -> TrainingArguments:
    options = dict(output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
                   learning_rate=0.01, save_strategy="epoch", report_to=[], logging_strategy="no",
                   use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    options.update(kwargs)
    return TrainingArguments(**options)


def _checkpoints_at(epoch: int, steps_per_epoch: int) -> dict:
    """Save one checkpoint, at the end of ``epoch`` (0-based), to keep the test fast."""
    return dict(save_strategy="steps", save_steps=(epoch + 1) * steps_per_epoch)


def _image_run(out, resume=None, **kwargs):
    images, labels, planted = planted_blobs()
    dataset = DictImages(images, labels)
    torch.manual_seed(0)
    model = TinyImageClassifier()
    sanitizer = Sanitizer(model, dataset, warmup=1, every=2, seed=0)
    trainer = SanitizedTrainer(model=model, args=_args(out, **kwargs), train_dataset=dataset, sanitizer=sanitizer)
    trainer.train(resume_from_checkpoint=resume)
    return model, sanitizer, planted


def test_image_tensors_drop_planted_points_and_resume_exactly(tmp_path):
    steps = -(-300 // BATCH)
    model, sanitizer, planted = _image_run(tmp_path / "full", **_checkpoints_at(1, steps))
    assert [r["epoch"] for r in sanitizer.history] == [1, 3]
    assert set(planted) <= set(sanitizer.dropped.tolist())
    assert len(sanitizer.dropped) <= 0.1 * len(sanitizer.keep)
    checkpoint = tmp_path / "full" / f"checkpoint-{2 * steps}"  # end of epoch 1: after the first round
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert [r["epoch"] for r in saved["history"]] == [1]

    resumed, sanitizer2, _ = _image_run(tmp_path / "resumed", resume=str(checkpoint), save_strategy="no")
    assert np.array_equal(sanitizer2.dropped, sanitizer.dropped)
    for key, value in weights(model).items():
        assert torch.equal(weights(resumed)[key], value), key


def test_epochs_iterate_kept_examples_only_with_the_original_length(tmp_path):
    images, labels, planted = planted_blobs()
    dataset = DictImages(images, labels)
    model = TinyImageClassifier()
    sanitizer = Sanitizer(model, dataset, warmup=1, every=1, seed=0)
    seen: list[list[int]] = []

    class Spy(nn.Module):  # records which examples each training step sees
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, pixel_values, labels=None):
            if self.training:
                rows = (pixel_values.flatten(1)[:, None, :] == images.flatten(1)[None]).all(-1)
                seen[-1].extend(rows.float().argmax(1).tolist())
            return self.inner(pixel_values, labels)

    class EpochMark(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            seen.append([])

    trainer = SanitizedTrainer(model=Spy(), args=_args(tmp_path, num_train_epochs=3, save_strategy="no"),
                               train_dataset=dataset, sanitizer=sanitizer, callbacks=[EpochMark()])
    trainer.train()
    assert [len(s) for s in seen] == [len(dataset)] * 3
    assert sorted(seen[0]) == list(range(len(dataset)))
    dropped_by_epoch_1 = set(sanitizer.history[0]["dropped_now"])
    assert dropped_by_epoch_1 and not dropped_by_epoch_1 & set(seen[1])
    assert not set(sanitizer.dropped.tolist()) & set(seen[2])


# -- a tiny text classifier --------------------------------------------------------------------------
VOCAB, PAD = 40, 0


def _texts(per_class=40, seed=0):
    """Variable-length token sequences; class c uses tokens [1 + 12c, 13 + 12c). Planted: a few
    sequences of class c labelled c + 1."""
    gen = torch.Generator().manual_seed(seed)
    items, planted = [], []
    for c in range(NUM_CLASSES):
        for j in range(per_class):
            n = int(torch.randint(4, 9, (1,), generator=gen))
            tokens = 1 + 12 * c + torch.randint(0, 12, (n,), generator=gen)
            label = c
            if j < 2:
                label = (c + 1) % NUM_CLASSES
                planted.append(len(items))
            items.append((tokens, label))
    return items, planted


class TextSet(Dataset):
    def __init__(self, items):
        self.items = items
        self.labels = torch.tensor([y for _, y in items])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        tokens, label = self.items[i]
        return {"input_ids": tokens, "labels": label}


def pad_collate(batch: list[dict]) -> dict:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = b["input_ids"]
        mask[i, : len(b["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([b["labels"] for b in batch])}


def test_tiny_text_classifier_drops_planted_points_and_resumes(tmp_path):
    items, planted = _texts()
    dataset = TextSet(items)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=NUM_CLASSES,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    steps = -(-len(dataset) // BATCH)

    def run(out, resume=None, **kwargs):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
        sanitizer = Sanitizer(model, dataset, warmup=2, every=2, seed=0)
        trainer = SanitizedTrainer(model=model, args=_args(out, num_train_epochs=5, learning_rate=1e-2, **kwargs),
                                   train_dataset=dataset, data_collator=pad_collate, sanitizer=sanitizer)
        trainer.train(resume_from_checkpoint=resume)
        return model, sanitizer

    model, sanitizer = run(tmp_path / "full", **_checkpoints_at(2, steps))
    assert sanitizer.embed_collate is pad_collate  # the trainer's collator pads the embedding batches too
    assert [r["epoch"] for r in sanitizer.history] == [2, 4]
    assert set(planted) <= set(sanitizer.dropped.tolist())
    assert len(sanitizer.dropped) <= 0.1 * len(dataset)
    resumed, sanitizer2 = run(tmp_path / "resumed", resume=str(tmp_path / "full" / f"checkpoint-{3 * steps}"),
                              save_strategy="no")
    assert np.array_equal(sanitizer2.dropped, sanitizer.dropped)
    for key, value in weights(model).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=0, atol=1e-6)


# -- clear errors ----------------------------------------------------------------------------------
def test_callback_alone_refuses_to_start(tmp_path):
    images, labels, _ = planted_blobs()
    dataset = DictImages(images, labels)
    model = TinyImageClassifier()
    callback = SanitizerTrainerCallback(Sanitizer(model, dataset))
    trainer = Trainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=dataset,
                      callbacks=[callback])
    with pytest.raises(SanitizerError, match="use SanitizedTrainer"):
        trainer.train()


def test_mismatched_and_iterable_datasets_are_refused(tmp_path):
    images, labels, _ = planted_blobs()
    model = TinyImageClassifier()
    sanitizer = Sanitizer(model, DictImages(images, labels))
    with pytest.raises(SanitizerError, match="has 150 examples but the sanitizer was built on 300"):
        SanitizedTrainer(model=model, args=_args(tmp_path), train_dataset=DictImages(images[:150], labels[:150]),
                         sanitizer=sanitizer)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.raises(SanitizerError, match="map-style dataset"):
        SanitizedTrainer(model=model, args=_args(tmp_path), train_dataset=Stream(), sanitizer=sanitizer)


def test_each_round_reaches_the_log_history(tmp_path):
    images, labels, _ = planted_blobs()
    dataset = DictImages(images, labels)
    model = TinyImageClassifier()
    sanitizer = Sanitizer(model, dataset, warmup=1, every=2, seed=0, verbose=False)
    trainer = SanitizedTrainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=dataset,
                               sanitizer=sanitizer)
    trainer.train()
    logged = [(e["epoch"], e["sanitizer/dropped_now"], e["sanitizer/dropped_total"])
              for e in trainer.state.log_history if "sanitizer/dropped_now" in e]
    expected = [(pytest.approx(r["epoch"]), len(r["dropped_now"]), r["dropped_total"]) for r in sanitizer.history]
    assert len(expected) == 2 and expected[0][1] > 0
    assert logged == expected


def test_harvest_mode_embeds_rounds_from_the_training_steps(tmp_path):
    images, labels, planted = planted_blobs()
    dataset = DictImages(images, labels)
    torch.manual_seed(0)
    model = TinyImageClassifier()
    sanitizer = Sanitizer(model, dataset, warmup=2, every=1, seed=0, verbose=False, harvest=True)
    SanitizedTrainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=dataset,
                     sanitizer=sanitizer).train()
    assert [r["epoch"] for r in sanitizer.history] == [2, 3]
    assert all(r["harvest"]["off"] is None and r["harvest"]["harvested"] == r["candidates"] for r in sanitizer.history)
    assert set(planted) <= set(sanitizer.dropped.tolist())
