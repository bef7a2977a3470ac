"""Label flips on CIFAR-10 from scratch: does evidence gathered over several rounds beat one round?

Issue 15 asks the label side for recall ≥ 0.9 at precision ≥ 0.8. One round's rule (at most 1 of the
20 nearest neighbours carries the label) reaches 0.89 / 0.69 at the end of a from-scratch CIFAR-10 run
(``label_signals_study``): about 2,000 clean images (natural confusion of an 82 %-accurate model) sit
among another class too. A flipped label stays wrong at every round; a clean image near a boundary may
not. This study scores rules that read every round so far, on the per-epoch features an undefended victim
recorded (``benchmarks.poisoning --record-signals``), as the sanitizer would apply them: an example counts
as dropped at the first round a rule flags it, and recall / precision are over the whole run.

Rules (agreement = how many of the 20 nearest neighbours, all classes, cosine, carry the label):

- ``one round``: agreement ≤ 1 at the round (the library's rule, gate aside);
- ``two rounds running``: agreement ≤ 1 at this round and at the round before (``the first ≤ 2``: in the
  low-agreement mode, ≤ 2 of 20, at the round before);
- ``mean over rounds``: mean agreement over the rounds so far ≤ 1;
- ``+ margin``: any of the above and the mean training margin (logit of the label − largest other
  logit, harvested from the training steps of every epoch so far) below 0 (Pleiss et al.'s AUM).

    python -m benchmarks.label_rounds_study benchmarks/out/signals/cifar10-scratch-full_label_flip_eps16_s1000 \
        --rounds 2,5,8
    python -m benchmarks.label_rounds_study --digits 1000-1004   # digits from scratch, with and without flips

``--digits`` trains digits victims (the ``simple_attacks`` recipe, rounds at epochs 4, 6, 8, 10) under an
audit-mode sanitizer, saves each round's eval-mode features and logits in the same layout, and scores them.
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
from sanitizer.label_agreement import gate_ratio
from sanitizer.train import train_classifier

DIGITS_ROUNDS = [4, 6, 8, 10]

K = 20


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit of the given label minus the largest other logit (NaN rows stay NaN)."""
    rows = np.arange(len(labels))
    own = logits[rows, labels].copy()
    other = logits.copy()
    other[rows, labels] = -np.inf
    return own - other.max(1)


def load(run: Path, epoch: int) -> dict[str, np.ndarray]:
    with np.load(run / f"epoch{epoch}.npz", allow_pickle=False) as f:
        return {k: f[k].astype(np.float32) for k in ("features", "logits", "train_logits") if k in f.files}


def study(run: Path, rounds: list[int], clean_labels: bool = False) -> list[str]:
    labels = np.load(run / "labels.npy")
    # a run whose poisons keep their labels (gradient matching) has no flips: only the clean cost is scored
    flipped = np.zeros(len(labels), dtype=bool) if clean_labels else np.load(run / "is_poison.npy")
    epochs = sorted(int(p.stem[5:]) for p in run.glob("epoch*.npz") if ".partial" not in p.name)
    rounds = [r for r in rounds if r in epochs]
    margin_sum, margin_n = np.zeros(len(labels)), np.zeros(len(labels))
    agreeing: dict[int, np.ndarray] = {}
    margin_mean: dict[int, np.ndarray] = {}
    for epoch in [e for e in epochs if e <= max(rounds)]:  # every recorded epoch feeds the training margin
        saved = load(run, epoch)
        m = margins(saved["train_logits"], labels) if "train_logits" in saved else np.full(len(labels), np.nan)
        seen = np.isfinite(m)
        margin_sum[seen] += m[seen]
        margin_n[seen] += 1
        if epoch in rounds:
            agreeing[epoch] = np.rint(knn_label_shares(saved["features"], labels, K)[0] * K)
            margin_mean[epoch] = margin_sum / np.maximum(margin_n, 1)
    rule_flags = {"one round": lambda i: agreeing[rounds[i]] <= 1,
                  "two rounds running": lambda i: (agreeing[rounds[i]] <= 1) & (
                      agreeing[rounds[i - 1]] <= 1 if i else False),
                  "two rounds running, the first ≤ 2": lambda i: (agreeing[rounds[i]] <= 1) & (
                      agreeing[rounds[i - 1]] <= 2 if i else False),
                  "mean over rounds": lambda i: np.mean([agreeing[r] for r in rounds[:i + 1]], 0) <= 1}
    lines = [f"{run.name}: {len(labels)} examples, {flipped.sum()} flipped; rounds at epochs {rounds}", "",
             "| round (epoch) | gate ratio R, this round | R of the mean agreement over rounds so far |",
             "|---|---|---|"]
    for i, r in enumerate(rounds):
        mean = np.mean([agreeing[q] for q in rounds[:i + 1]], 0) / K
        lines.append(f"| {i} ({r}) | {gate_ratio(agreeing[r] / K):.2f} | {gate_ratio(mean):.2f} |")
    lines += ["",
             "| rule | first round used | recall | precision | clean dropped | dropped per round |",
             "|---|---|---|---|---|---|"]
    for name, flag in rule_flags.items():
        for with_margin in (False, True) if margin_n.any() else (False,):  # margins need training logits
            for start in range(len(rounds)):
                dropped = np.zeros(len(labels), dtype=bool)
                per_round = []
                for i in range(start, len(rounds)):
                    f = flag(i) & ~dropped
                    if with_margin:
                        f &= margin_mean[rounds[i]] < 0
                    per_round.append(int(f.sum()))
                    dropped |= f
                recall = dropped[flipped].mean() if flipped.any() else float("nan")
                precision = flipped[dropped].mean() if dropped.any() else float("nan")
                lines.append(f"| {name}{' + margin' if with_margin else ''} | {rounds[start]} | {recall:.3f} | "
                             f"{precision:.3f} | {int((dropped & ~flipped).sum())} | {per_round} |")
    return lines


def record_digits(seed: int, flips: bool, out: Path) -> Path:
    """Train one digits victim (10 % random flips, or none) under an audit-mode sanitizer; save each round's
    eval-mode features and logits as ``epoch{E}.npz`` beside ``labels.npy`` and ``is_poison.npy``."""
    run = out / f"digits_{'flips' if flips else 'clean'}_s{seed}"
    if all((run / f"epoch{e}.npz").exists() for e in DIGITS_ROUNDS):
        return run
    run.mkdir(parents=True, exist_ok=True)
    exp = Experiment(12, 16, 0.05, None, Path("benchmarks/out/simple_attacks"))
    flipped = np.zeros(len(exp.train), dtype=bool)
    data = exp.train
    if flips:
        poisons = exp.craft("label_flip", seed)
        data = poisons.apply(exp.train)
        flipped[poisons.indices] = True
    np.save(run / "labels.npy", data.labels.numpy())
    np.save(run / "is_poison.npy", flipped)

    def save(s, epoch, candidates, emb, selection):
        np.savez(run / f"epoch{epoch}.npz", features=gradient_embeddings(s.model, data, embedding="features").numpy(),
                 logits=gradient_embeddings(s.model, data, embedding="logits").numpy())

    model = exp.new_model(seed)
    sanitizer = Sanitizer(model, data, epochs=12, audit=True, round_hooks=[save], verbose=False, seed=seed)
    train_classifier(model, data, exp.config(seed), sanitizer=sanitizer, desc=f"digits {seed}")
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, nargs="?", help="a --record-signals folder with label flips")
    parser.add_argument("--digits", default=None, help="digits tuning seeds instead of a folder, e.g. 1000-1004")
    parser.add_argument("--rounds", default="2,5,8", help="epochs at which the sanitizer's rounds run")
    parser.add_argument("--clean-labels", action="store_true",
                        help="the run's poisons keep their labels (e.g. gradient matching): score the clean cost only")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    if args.digits:
        for seed in parse_seeds(args.digits):
            for flips in (True, False):
                run = record_digits(seed, flips, Path("benchmarks/out/label_rounds"))
                print("\n".join(study(run, DIGITS_ROUNDS, clean_labels=not flips)), "\n", flush=True)
    if args.run:
        print("\n".join(study(args.run, [int(r) for r in args.rounds.split(",")], args.clean_labels)))


if __name__ == "__main__":
    main()
