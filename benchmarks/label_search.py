"""The label side's cross-class k-NN search on real penultimate features: HNSW graph vs k-means lists.

Reads the eval-mode features a ``benchmarks.poisoning --record-signals`` run saved (CIFAR-10, 50,000 × 80)
and times, side by side in one process, ``knn(..., approximate="hnsw")`` and ``approximate="clusters"``
(what ``sanitizer.label_agreement`` uses), with the recall@k of each on 2,000 rows searched exactly and how
many examples each answer puts at ≤ 1 agreeing neighbour (the label side's flag) against the exact search.

    python -m benchmarks.label_search benchmarks/out/signals/cifar10-scratch-full_label_flip_eps16_s1000 \\
        --epochs 2,5,8 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from sanitizer.neighbors import knn, sampled_recall


def unit_features(run_dir: Path, epoch: int) -> np.ndarray:
    with np.load(run_dir / f"epoch{epoch}.npz", allow_pickle=False) as f:
        x = f["features"].astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a --record-signals folder")
    parser.add_argument("--epochs", default="2,5,8")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    labels = np.load(args.run / "labels.npy")
    print("| epoch | search | seconds | recall@k | flagged (≤ 1 agreeing) | flagged by exact too |")
    print("|---|---|---|---|---|---|")
    for epoch in map(int, args.epochs.split(",")):
        x = unit_features(args.run, epoch)
        _, exact = knn(x, args.k, backend="torch")
        exact_flag = (labels[exact] == labels[:, None]).sum(1) <= 1
        print(f"| {epoch} | exact | – | 1 | {exact_flag.sum()} | – |")
        for method in ("hnsw", "clusters"):
            t0 = time.perf_counter()
            _, idx = knn(x, args.k, approximate=method)
            seconds = time.perf_counter() - t0
            with_self = np.concatenate([np.arange(len(idx))[:, None], idx], 1)
            flag = (labels[idx] == labels[:, None]).sum(1) <= 1
            print(f"| {epoch} | {method} | {seconds:.2f} | {sampled_recall(x, with_self, sample=2000):.3f} | "
                  f"{flag.sum()} | {(flag & exact_flag).sum()} |", flush=True)


if __name__ == "__main__":
    main()
