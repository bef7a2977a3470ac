"""Can a round tell when its harvested rows are not the examples' own (mixup), from a small probe pass?

Harvest mode keys the last layer's training-step inputs and logits by dataset index. A loop that blends
inputs (mixup) feeds the hook blended rows, and the round would score them against the index's own label.
This study measures, at every round of an audit-mode harvest sanitizer, how well the harvested rows agree
with a separate eval-mode pass over the same examples: Spearman correlation of the per-example
last-layer gradient norms (a loss-like size of each row) and the median cosine of the rows, over a probe of
``--probe`` random candidates and over all candidates; for an ordinary training loop (flip + crop) and a
mixup loop (Beta(1, 1) blends, loss mixed accordingly). Tuning seeds only.

    python -m benchmarks.harvest_mixup_study --data digits --seeds 1000-1002
    python -m benchmarks.harvest_mixup_study --data cifar5k --seeds 1000 --epochs 8
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from benchmarks.simple_attacks import parse_seeds
from sanitizer import Sanitizer
from sanitizer.augment import flip_crop
from sanitizer.data import ImageTensorDataset, load_cifar10, load_digits_split, subset_by_class
from sanitizer.models import make_model


def agreement(harvested: torch.Tensor, passed: torch.Tensor) -> tuple[float, float]:
    """(Spearman of the row norms, median cosine of the rows)."""
    hn, pn = harvested.norm(dim=1), passed.norm(dim=1)
    cos = (harvested * passed).sum(1) / (hn * pn).clamp_min(1e-12)
    return float(spearmanr(hn.numpy(), pn.numpy())[0]), float(cos.median())


def load(data: str, root: str) -> ImageTensorDataset:
    if data == "digits":
        return load_digits_split()[0]
    full = load_cifar10(root)
    idx = torch.from_numpy(subset_by_class(full, 500, 0))
    return ImageTensorDataset(full.images[idx], full.labels[idx], None, 10)


def run(data: ImageTensorDataset, seed: int, mixup: bool, epochs: int, probe: int) -> list[str]:
    torch.manual_seed(seed)
    model = make_model("cnn", data.num_classes, data.images.shape[1], 16)
    lines = []
    rng = np.random.default_rng(seed)

    def hook(s, epoch, candidates, emb, selection):
        passed = s._embed_rows(candidates)
        probe_rows = rng.choice(len(candidates), min(probe, len(candidates)), replace=False)
        rho_all, cos_all = agreement(emb, passed)
        rho_probe, cos_probe = agreement(emb[probe_rows], passed[probe_rows])
        loop = "mixup" if mixup else "plain"
        lines.append(f"{loop} s{seed} epoch {epoch}: harvested {s._harvest_counts['harvested']}"
                     f" | all: Spearman(norms) {rho_all:.2f}, median cos {cos_all:.2f} | probe of {len(probe_rows)}: "
                     f"Spearman {rho_probe:.2f}, cos {cos_probe:.2f}")
        print(lines[-1], flush=True)

    sanitizer = Sanitizer(model, data, harvest=True, audit=True, epochs=epochs, warmup=2, every=2,
                          round_hooks=[hook], verbose=False, seed=seed, policy_options={"screen": False})
    loader = sanitizer.wrap(DataLoader(data, batch_size=64, shuffle=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        sanitizer.start_epoch(epoch)
        model.train()
        for x, y, *_ in loader:
            x = flip_crop(x, generator=gen)
            if mixup:
                lam = float(np.random.default_rng(seed * 1000 + epoch).beta(1.0, 1.0))
                perm = torch.randperm(len(x), generator=gen)
                z = model(lam * x + (1 - lam) * x[perm])
                loss = lam * F.cross_entropy(z, y) + (1 - lam) * F.cross_entropy(z, y[perm])
            else:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    sanitizer.start_epoch(epochs)  # the round after the last epoch
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("digits", "cifar5k"), default="digits")
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--seeds", default="1000-1002")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--probe", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load(args.data, args.data_root)
    for seed in parse_seeds(args.seeds):
        for mixup in (False, True):
            run(data, seed, mixup, args.epochs, args.probe)


if __name__ == "__main__":
    main()
