"""Can a round tell when its harvested rows are not the examples' own (mixup), from a small probe pass?

Harvest mode keys the last layer's training-step inputs and logits by dataset index. A loop that blends
inputs (mixup) feeds the hook blended rows, and the round would score them against the index's own label.
This study measures, at every round of an audit-mode harvest sanitizer, how well the harvested rows agree
with a separate eval-mode pass over the same examples: Spearman correlation of the per-example
last-layer gradient norms (a loss-like size of each row) and the median cosine of the rows, over a probe of
``--probe`` random candidates and over all candidates; for an ordinary training loop (flip + crop) and a
mixup loop (Beta(1, 1) blends, loss mixed accordingly); and the library's own label-fit check of each round (the
harvested rows' label accuracy against a pass over a probe of the same examples). Tuning seeds only.

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


def label_fit(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(share of rows whose argmax is the label, mean probability of the label)."""
    prob = torch.softmax(logits.float(), 1)
    return float((prob.argmax(1) == labels).float().mean()), float(prob[torch.arange(len(labels)), labels].mean())


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
        # the model's fit of the label on the harvested rows against an eval-mode pass over the same probe
        probe_idx = candidates[probe_rows]
        _, z_harvest, have = s.harvester.rows(probe_idx)
        labels = data.labels[torch.from_numpy(probe_idx[have])]
        model.eval()
        with torch.no_grad():
            z_pass = model(data.images[torch.from_numpy(probe_idx[have])])
        model.train()
        acc_h, p_h = label_fit(z_harvest, labels)
        acc_p, p_p = label_fit(z_pass, labels)
        loop = loop_name(mixup)
        lines.append(f"{loop} s{seed} epoch {epoch}: harvested {s._harvest_counts['harvested']}"
                     f" | all: Spearman(norms) {rho_all:.2f}, median cos {cos_all:.2f} | probe of {len(probe_rows)}: "
                     f"Spearman {rho_probe:.2f}, cos {cos_probe:.2f} | label accuracy harvested {acc_h:.2f} vs pass "
                     f"{acc_p:.2f} (gap {acc_p - acc_h:+.2f}), mean p(label) {p_h:.2f} vs {p_p:.2f}")
        print(lines[-1], flush=True)

    sanitizer = Sanitizer(model, data, harvest=True, audit=True, epochs=epochs, warmup=2, every=2,
                          round_hooks=[hook], verbose=False, seed=seed, policy_options={"screen": False})
    loader = sanitizer.wrap(DataLoader(data, batch_size=64, shuffle=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    rng_mix = np.random.default_rng(seed * 1000)
    for epoch in range(epochs):
        sanitizer.start_epoch(epoch)
        model.train()
        for x, y, *_ in loader:
            x = flip_crop(x, generator=gen)
            if mixup:
                lam = float(rng_mix.beta(1.0, 1.0))  # one blend weight per batch
                perm = torch.randperm(len(x), generator=gen)
                z = model(lam * x + (1 - lam) * x[perm])
                loss = lam * F.cross_entropy(z, y) + (1 - lam) * F.cross_entropy(z, y[perm])
            else:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    sanitizer.start_epoch(epochs)  # the round after the last epoch
    for record in sanitizer.history:  # the library's own check (sanitizer.harvest.label_fit_check)
        check = (record.get("harvest") or {}).get("check")
        if check:
            lines.append(f"{loop_name(mixup)} s{seed} epoch {record['epoch']}: label-fit check ok={check['ok']} gap "
                         f"{check['gap']:+.3f} (pass only {check['pass_only']}, harvest only {check['harvest_only']} "
                         f"of {check['probe']}), harvested {record['harvest']['harvested']}")
            print(lines[-1], flush=True)
    return lines


def loop_name(mixup: bool) -> str:
    return "mixup" if mixup else "plain"


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
