"""The sanitizer as a PyTorch Lightning callback, on scikit-learn's digits with planted wrong labels.

    python examples/lightning_example.py
    python examples/lightning_example.py --devices 2 --strategy ddp     # DDP on CPU (gloo)
    python examples/lightning_example.py --resume runs/lightning/ckpt/epoch=3.ckpt

What the callback needs from you: the train loader wrapped by ``callback.wrap`` and
``Trainer(reload_dataloaders_every_n_epochs=1)``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from plain_loop import poisoned_digits
from torch.utils.data import DataLoader

from sanitizer import Sanitizer
from sanitizer.integrations.lightning import SanitizerCallback
from sanitizer.models import CompactCNN


class DigitClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = CompactCNN(in_channels=1, num_classes=10, width=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--resume", default=None, help="a checkpoint written by an earlier run")
    parser.add_argument("--out", default="runs/lightning")
    args = parser.parse_args()

    L.seed_everything(0)
    train_set, test_set, planted = poisoned_digits()
    model = DigitClassifier()
    sanitizer = Sanitizer(model, train_set, warmup=3, every=2, seed=0)
    callback = SanitizerCallback(sanitizer)
    loader = callback.wrap(DataLoader(train_set, batch_size=64, shuffle=True))
    saver = L.callbacks.ModelCheckpoint(dirpath=f"{args.out}/ckpt", save_top_k=-1, every_n_epochs=1,
                                        filename="{epoch}")
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices, strategy=args.strategy,
                        callbacks=[callback, saver], reload_dataloaders_every_n_epochs=1,
                        default_root_dir=args.out, logger=False, enable_progress_bar=False)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=args.resume)

    if trainer.is_global_zero:
        dropped = sanitizer.dropped
        caught = int(np.isin(planted, dropped).sum())
        with torch.no_grad():
            accuracy = (model.eval()(test_set.images).argmax(1) == test_set.labels).float().mean()
        print(f"rounds at epochs {[r['epoch'] for r in sanitizer.history]}; dropped {len(dropped)}: "
              f"{caught} of {len(planted)} planted, {len(dropped) - caught} clean; test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
