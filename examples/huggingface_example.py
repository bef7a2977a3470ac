"""The sanitizer with the Hugging Face ``Trainer`` (``SanitizedTrainer``), on digits with planted wrong labels.

    python examples/huggingface_example.py
    python examples/huggingface_example.py --resume runs/huggingface/checkpoint-66
    torchrun --nproc_per_node=2 examples/huggingface_example.py           # DDP

Any ``Trainer`` model works (a ``PreTrainedModel`` or an ``nn.Module`` returning an output with
``loss`` and ``logits``); the dataset yields dicts, as ``Trainer`` datasets do.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from plain_loop import poisoned_digits
from torch import nn
from torch.utils.data import Dataset
from transformers import TrainingArguments
from transformers.modeling_outputs import ImageClassifierOutput

from sanitizer import Sanitizer
from sanitizer.distributed import is_main_process
from sanitizer.integrations.huggingface import SanitizedTrainer
from sanitizer.models import CompactCNN


class DigitDicts(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = CompactCNN(in_channels=1, num_classes=10, width=16)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        return ImageClassifierOutput(loss=None if labels is None else F.cross_entropy(logits, labels), logits=logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--out", default="runs/huggingface")
    args = parser.parse_args()

    torch.manual_seed(0)
    train, test, planted = poisoned_digits()
    train_set = DigitDicts(*train.tensors)
    model = DigitClassifier()
    sanitizer = Sanitizer(model, train_set, warmup=3, every=2, seed=0)
    trainer = SanitizedTrainer(
        model=model, train_dataset=train_set, sanitizer=sanitizer,
        args=TrainingArguments(args.out, num_train_epochs=args.epochs, per_device_train_batch_size=64,
                               learning_rate=2e-3, save_strategy="epoch", report_to=[], seed=0, use_cpu=True),
    )
    trainer.train(resume_from_checkpoint=args.resume)

    if is_main_process():
        dropped = sanitizer.dropped
        caught = int(np.isin(planted, dropped).sum())
        with torch.no_grad():
            accuracy = (model.eval()(test.images).logits.argmax(1) == test.labels).float().mean()
        print(f"rounds at epochs {[r['epoch'] for r in sanitizer.history]}; dropped {len(dropped)}: "
              f"{caught} of {len(planted)} planted, {len(dropped) - caught} clean; test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
