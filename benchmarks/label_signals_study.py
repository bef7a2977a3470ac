"""Which label-consistency signal could catch random label flips, and what would it cost clean data?

Two measurements (issue 15; tuning seeds only):

1. ``--digits SEEDS``: digits from scratch with 10 % random label flips (the ``simple_attacks``
   recipe), an audit-mode sanitizer (nothing dropped). At each round, per signal: AUROC of flipped vs
   clean examples, and recall / precision of each decision rule. Signals: the density policy's isolation
   score (last-layer gradient, within class), 1 − p(given label), and the leave-one-out k-NN label
   agreement in penultimate features (share of the k nearest neighbours, all classes, that carry the
   example's label; faiss, cosine).
2. ``--signals DIR``: the per-epoch features saved by an undefended from-scratch CIFAR-10 victim
   (``benchmarks.poisoning --record-signals``), whose labels are clean: the share of the training set
   each rule would flag there (its false-positive cost).

    python -m benchmarks.label_signals_study --digits 1000-1001 \
        --signals benchmarks/out/signals/cifar10-scratch-full_gradient_matching_eps16_s1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.poisoning import auroc
from benchmarks.simple_attacks import Experiment, parse_seeds
from sanitizer import Sanitizer
from sanitizer.embeddings import gradient_embeddings
from sanitizer.train import train_classifier


def knn_label_shares(features: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(share of the k nearest other examples carrying the example's label, largest share of another label)."""
    f = np.ascontiguousarray(features, dtype=np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-12
    index = faiss.IndexFlatIP(f.shape[1])
    index.add(f)
    _, nn = index.search(f, k + 1)
    neighbour_labels = labels[nn[:, 1:]]
    shares = np.stack([(neighbour_labels == c).mean(1) for c in range(int(labels.max()) + 1)], 1)
    rows = np.arange(len(labels))
    agree = shares[rows, labels].copy()
    shares[rows, labels] = -1
    return agree, shares.max(1)


def rules(features: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """The decision rules compared: flagged (bool) per example. ``probs``: the model's softmax."""
    out = {}
    rows = np.arange(len(labels))
    p_label = probs[rows, labels]
    predicted_other = probs.argmax(1) != labels
    for k in (10, 20):
        agree, other = knn_label_shares(features, labels, k)
        out[f"k={k}: agree<=0.1"] = agree <= 0.1
        out[f"k={k}: agree<=0.1 & other>=0.8"] = (agree <= 0.1) & (other >= 0.8)
        out[f"k={k}: other label is the plurality"] = other > agree
    low = knn_label_shares(features, labels, 20)[0] <= 1 / 20  # the library's rule (at most 1 of 20 agree)
    out["k=20: <=1 agree (default)"] = low
    out["k=20: <=1 agree & model predicts another class"] = low & predicted_other
    out["k=20: <=1 agree & p(label) < 0.1"] = low & (p_label < 0.1)
    # confident learning's per-class threshold: the mean p(label) of the examples carrying that label
    mean_p = np.array([p_label[labels == c].mean() for c in range(probs.shape[1])])
    out["k=20: <=1 agree & p(label) < its class mean / 2"] = low & (p_label < mean_p[labels] / 2)
    return out


def round_printer(seed: int, data, flipped: np.ndarray):
    """A round hook printing each signal's AUROC and each rule's recall and precision."""
    labels = data.labels.numpy()

    def hook(s, epoch, candidates, emb, selection):
        feats = gradient_embeddings(s.model, data, embedding="features").numpy()
        probs = gradient_embeddings(s.model, data, embedding="logits").numpy() + np.eye(s.num_classes)[labels]
        agree, _ = knn_label_shares(feats, labels, 10)
        signals = {"isolation (density score)": selection.scores,
                   "1 - p(label)": 1 - probs[np.arange(len(labels)), labels],
                   "1 - kNN agreement (k=10)": 1 - agree}
        print(f"seed {seed} epoch {epoch}: " + ", ".join(
            f"{name} AUROC {auroc(v[flipped], v[~flipped]):.3f}" for name, v in signals.items()))
        flagged = {f"isolation z > {th}": selection.scores > th for th in (2.0, 3.0)} | rules(feats, labels, probs)
        for name, f in flagged.items():
            print(f"    {name}: recall {f[flipped].mean():.2f} precision {flipped[f].mean() if f.any() else 0:.2f} "
                  f"flags {f.mean():.1%}")
    return hook


def digits_study(seeds: list[int]) -> None:
    exp = Experiment(12, 16, 0.05, None, Path("benchmarks/out/simple_attacks"))
    for seed in seeds:
        poisons = exp.craft("label_flip", seed)
        data = poisons.apply(exp.train)
        flipped = np.zeros(len(exp.train), dtype=bool)
        flipped[poisons.indices] = True
        model = exp.new_model(seed)
        sanitizer = Sanitizer(model, data, epochs=12, audit=True, round_hooks=[round_printer(seed, data, flipped)],
                              verbose=False, seed=seed)
        train_classifier(model, data, exp.config(seed), sanitizer=sanitizer, desc=f"label_flip {seed}")


def cleanlab_rules(features: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """The baseline: cleanlab's find_label_issues on 5-fold logistic-regression probabilities of the same
    features (the harness's ``cleanlab`` defense), and on the model's own (in-sample) softmax."""
    from cleanlab.filter import find_label_issues

    from sanitizer.policies.cleanlab import CleanlabPolicy

    return {"cleanlab, 5-fold LR on the features": ~CleanlabPolicy().select(features, labels).keep,
            "cleanlab on the model's softmax (in-sample)": find_label_issues(labels, probs, n_jobs=1)}


def clean_cost(signals: Path, epochs: list[int], with_cleanlab: bool = False) -> None:
    labels = np.load(signals / "labels.npy")
    flipped_path = signals / "is_poison.npy"
    flipped = np.load(flipped_path) if flipped_path.exists() else np.zeros(len(labels), dtype=bool)
    for epoch in epochs:
        saved = np.load(signals / f"epoch{epoch}.npz")
        logits = torch.from_numpy(saved["logits"])  # eval mode, clean views: what the sanitizer sees
        probs = torch.softmax(logits.double(), 1).numpy()
        print(f"{signals.name} epoch {epoch}: {flipped.sum()} marked poisons")
        flagged = rules(saved["features"], labels, probs)
        if with_cleanlab:
            flagged |= cleanlab_rules(saved["features"], labels, probs)
        for name, f in flagged.items():
            print(f"    {name}: flags {f.mean():.2%}" + (
                f", recall {f[flipped].mean():.2f} precision {flipped[f].mean() if f.any() else 0:.2f}"
                if flipped.any() else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", default=None, help="tuning seeds, e.g. 1000-1001")
    parser.add_argument("--signals", type=Path, default=None, help="a --record-signals folder (clean labels)")
    parser.add_argument("--epochs", default="2,5,8", help="epochs of --signals to read")
    parser.add_argument("--cleanlab", action="store_true", help="also score cleanlab on --signals (minutes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    if args.digits:
        digits_study(parse_seeds(args.digits))
    if args.signals:
        clean_cost(args.signals, [int(e) for e in args.epochs.split(",")], args.cleanlab)


if __name__ == "__main__":
    main()
