"""Can a per-class gate tell random label flips from natural confusion? (issue 15; tuning seeds only)

The leave-one-out k-NN label agreement in penultimate features (the share of an example's k nearest
neighbours, all classes, that carry its label) finds flipped labels on digits, but flags 2.4-13 % of a
clean from-scratch CIFAR-10 training set. Flipped examples form their own population at agreement ~0;
natural confusion is a continuous tail. So a class is *gated in* only when its low-agreement mass
(agreement <= 0.1) is large against its intermediate mass (0.2 <= agreement <= 0.5): the ratio R.
This script prints R per class and what the gated rule would flag, on

- CIFAR-10 transfer (the preset's frozen extractor features, which do not depend on the head):
  10 % random flips and clean labels, per seed;
- clean from-scratch CIFAR-10: the per-epoch features an undefended victim saved (``--signals``);
- digits from scratch: 10 % random flips and clean labels, an audit sanitizer's rounds (``--digits``).

    python -m benchmarks.label_gate_study --transfer 1000-1009 --digits 1000-1002 \
        --signals benchmarks/out/signals/cifar10-scratch-full_gradient_matching_eps16_s1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.label_signals_study import knn_label_shares
from benchmarks.simple_attacks import Experiment, parse_seeds
from sanitizer import Sanitizer
from sanitizer.embeddings import gradient_embeddings
from sanitizer.train import train_classifier

GATES = (1.0, 1.5, 2.0, 3.0)


def gate_ratios(agree: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """R per class: (# agreement <= 0.1) / max(1, # 0.2 <= agreement <= 0.5)."""
    low = np.bincount(labels[agree <= 0.1], minlength=num_classes)
    mid = np.bincount(labels[(agree >= 0.2) & (agree <= 0.5)], minlength=num_classes)
    return low / np.maximum(mid, 1)


def report(tag: str, features: np.ndarray, labels: np.ndarray, flipped: np.ndarray | None, k: int = 10) -> None:
    num_classes = int(labels.max()) + 1
    agree, _ = knn_label_shares(features, labels, k)
    ratios = gate_ratios(agree, labels, num_classes)
    low = agree <= 0.1
    pooled = low.sum() / max(1, ((agree >= 0.2) & (agree <= 0.5)).sum())
    line = (f"{tag}: R pooled {pooled:.2f}, per class [{' '.join(f'{r:.1f}' for r in ratios)}]; "
            f"agree<=0.1 flags {low.mean():.2%}")
    for gate in GATES:
        flagged = low & np.isin(labels, np.flatnonzero(ratios > gate))
        clean = flagged if flipped is None else flagged & ~flipped
        line += f" | R>{gate}: flags {flagged.mean():.2%} (clean {clean.sum()}/{len(labels)}"
        if flipped is not None and flipped.any():
            precision = flipped[flagged].mean() if flagged.any() else 0
            line += f", recall {flagged[flipped].mean():.2f}, precision {precision:.2f}"
        line += ")"
    print(line, flush=True)


def flip(dataset, seed: int, rate: float = 0.1):
    """(labels after ``rate`` random flips, flipped mask): the ``label_flip`` attack's random mode (each chosen
    example gets a label drawn uniformly from the other classes), drawn here so that it also runs on features."""
    labels = dataset.labels.numpy().copy()
    num_classes = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
    labels[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[chosen] = True
    return labels, flipped


def transfer_study(seeds: list[int], data_root: str, cache_dir: str) -> None:
    from benchmarks.presets import get_preset, make_setting

    setting = make_setting(get_preset("cifar10-transfer"), data_root, cache_dir)
    data = setting.train_features
    features = data.images.flatten(1).numpy()
    report("transfer clean", features, data.labels.numpy(), None)
    for seed in seeds:
        labels, flipped = flip(data, seed)
        report(f"transfer flips s{seed}", features, labels, flipped)


def digits_study(seeds: list[int]) -> None:
    exp = Experiment(12, 16, 0.05, None, Path("benchmarks/out/simple_attacks"))
    for seed in seeds:
        for flips in (True, False):
            labels, flipped = flip(exp.train, seed) if flips else (exp.train.labels.numpy(), None)
            data = type(exp.train)(exp.train.images, torch.from_numpy(labels), None, exp.train.num_classes)
            tag = f"digits {'flips' if flips else 'clean'} s{seed}"

            def hook(s, epoch, candidates, emb, selection, data=data, labels=labels, flipped=flipped, tag=tag):
                feats = gradient_embeddings(s.model, data, embedding="features").numpy()
                report(f"{tag} epoch {epoch}", feats, labels, flipped)

            model = exp.new_model(seed)
            sanitizer = Sanitizer(model, data, epochs=12, audit=True, round_hooks=[hook], verbose=False, seed=seed)
            train_classifier(model, data, exp.config(seed), sanitizer=sanitizer, desc=tag)


def signals_study(folders: list[Path], epochs: list[int]) -> None:
    for folder in folders:
        labels = np.load(folder / "labels.npy")
        for epoch in epochs:
            feats = np.load(folder / f"epoch{epoch}.npz")["features"]
            report(f"{folder.name} epoch {epoch} (clean labels)", feats, labels, None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transfer", default=None, help="tuning seeds, e.g. 1000-1009")
    parser.add_argument("--digits", default=None, help="tuning seeds, e.g. 1000-1002")
    parser.add_argument("--signals", type=Path, nargs="*", default=[], help="--record-signals folders (clean labels)")
    parser.add_argument("--epochs", default="2,3,5,8", help="epochs of --signals to read")
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--cache-dir", default="benchmarks/out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    if args.transfer:
        transfer_study(parse_seeds(args.transfer), args.data_root, args.cache_dir)
    if args.signals:
        signals_study(args.signals, [int(e) for e in args.epochs.split(",")])
    if args.digits:
        digits_study(parse_seeds(args.digits))


if __name__ == "__main__":
    main()
