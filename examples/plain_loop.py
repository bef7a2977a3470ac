"""The sanitizer in a plain PyTorch training loop, on scikit-learn's digits (CPU, a minute or two).

Some training labels are flipped on purpose (planted mislabelled examples); the sanitizer should
drop most of them while keeping almost every clean example.

    python examples/plain_loop.py
    torchrun --nproc_per_node=2 examples/plain_loop.py      # DDP: gloo on CPU, nccl on GPUs

The two-process run is deliberately under-trained (8 short epochs, about 52 % test accuracy): it
shows the distributed mechanics (one keep mask on every rank), not a good model.

The only addition to an ordinary loop is the line marked "sanitizer": ``sanitizer.attach`` returns
a loader whose every pass is one epoch and runs the due sanitization round before its first batch.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import sanitizer
from sanitizer.data import ImageTensorDataset, load_digits_split
from sanitizer.models import CompactCNN


def poisoned_digits(n_planted: int = 20, seed: int = 0) -> tuple[TensorDataset, ImageTensorDataset, np.ndarray]:
    """Digits with ``n_planted`` training labels flipped to the next class: the training set as
    ``(image, label)`` pairs, the test set, and the planted indices."""
    train, test = load_digits_split(seed=seed)
    planted = np.random.default_rng(seed).choice(len(train), n_planted, replace=False)
    labels = train.labels.clone()
    labels[planted] = (labels[planted] + 1) % 10
    return TensorDataset(train.images, labels), test, np.sort(planted)


def main(epochs: int = 8) -> None:
    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    train_set, test_set, planted = poisoned_digits()
    model = CompactCNN(in_channels=1, num_classes=10, width=16).to(device)
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    sampler = DistributedSampler(train_set, shuffle=True, seed=0) if distributed else None
    loader = DataLoader(train_set, batch_size=64, shuffle=sampler is None, sampler=sampler)
    loader = sanitizer.attach(net, loader, warmup=3, every=2, seed=0)      # sanitizer
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    for _ in range(epochs):
        net.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()

    if rank == 0:
        dropped = loader.sanitizer.dropped
        caught = np.isin(planted, dropped).sum()
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_set.images.to(device)).argmax(1).cpu() == test_set.labels).float().mean()
        print(f"rounds at epochs {[r['epoch'] for r in loader.sanitizer.history]}")
        print(f"dropped {len(dropped)} of {len(train_set)}: {caught} of {len(planted)} planted labels, "
              f"{len(dropped) - caught} clean examples")
        print(f"test accuracy {accuracy:.3f}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    main(parser.parse_args().epochs)
