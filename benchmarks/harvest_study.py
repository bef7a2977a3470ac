"""Harvest mode against a separate pass, paired: do the rounds see the poisons as well?

One victim per (attack, seed) trains on digits from scratch (the ``simple_attacks`` recipe) under an
audit-mode sanitizer in harvest mode, so nothing is dropped and both embeddings are taken at the same
moments of the same run: at each round the harvested embedding (from the previous epoch's training
steps: augmented views, train mode, weights that moved during the epoch) is scored by the policy, and
so is a separate eval-mode pass over the same candidates. Printed per round: the poisons' AUROC
against every clean example (and within the poisons' classes) under each, and the overlap of what
the two would drop. Rows are appended to ``--out`` as JSONL (resumable by (attack, seed)).

    python -m benchmarks.harvest_study --attacks label_flip,badnets-5 --seeds 1000-1004
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.poisoning import auroc
from benchmarks.simple_attacks import ATTACKS, Experiment, git_state, parse_seeds, read_rows
from sanitizer import Sanitizer
from sanitizer.progress import log
from sanitizer.train import train_classifier

CLEAN = "clean"  # no attack: the poison-free run (AUROCs are None), for what the label side's gate sees on clean data


def paired_hook(is_poison: np.ndarray, rounds: list[dict]):
    """A round hook scoring the separate pass beside the harvested embedding of the same round."""
    def hook(sanitizer, epoch, candidates, emb, selection):
        poison = is_poison[candidates]
        in_poison_classes = np.isin(sanitizer.labels[candidates], np.unique(sanitizer.labels[candidates][poison]))
        t0 = time.perf_counter()
        passed = sanitizer.policy.select(sanitizer._embed_rows(candidates), sanitizer.labels[candidates],
                                         num_classes=sanitizer.num_classes, seed=sanitizer._round_seed(epoch))
        seconds_pass = time.perf_counter() - t0
        row = {"epoch": int(epoch), "harvested_rows": sanitizer._harvest_counts["harvested"],
               "seconds_harvest_embed": sanitizer.history[-1]["seconds_embed"] if sanitizer.history else None,
               "seconds_pass": seconds_pass}
        for name, sel in (("harvest", selection), ("pass", passed)):
            s = sel.scores
            row[name] = {"auroc": auroc(s[poison], s[~poison]),
                         "auroc_in_class": auroc(s[poison & in_poison_classes], s[~poison & in_poison_classes]),
                         "would_drop": int((~sel.keep).sum()), "poisons": int((~sel.keep & poison).sum()),
                         "label_side": sel.info.get("label_side")}
        both, either = (~passed.keep & ~selection.keep).sum(), (~passed.keep | ~selection.keep).sum()
        row["drop_jaccard"] = float(both / either) if either else None
        rounds.append(row)
    return hook


def run(out: Path, attacks: list[str], seeds: list[int], epochs: int, policy: str) -> None:
    done = {(r["attack"], r["seed"]) for r in read_rows(out)}
    exp = Experiment(epochs, 16, 0.05, None, Path("benchmarks/out/simple_attacks"))
    state = git_state()
    out.parent.mkdir(parents=True, exist_ok=True)
    for attack in attacks:
        for seed in seeds:
            if (attack, seed) in done:
                continue
            is_poison = np.zeros(len(exp.train), dtype=bool)
            if attack == CLEAN:
                data, budget = exp.train, 0
            else:
                poisons = exp.craft(attack, seed)
                data, budget = poisons.apply(exp.train), len(poisons)
                is_poison[poisons.indices] = True
            model = exp.new_model(seed)
            rounds: list[dict] = []
            sanitizer = Sanitizer(model, data, policy=policy, epochs=epochs, audit=True, harvest=True, seed=seed,
                                  round_hooks=[paired_hook(is_poison, rounds)], verbose=False)
            train_classifier(model, data, exp.config(seed), sanitizer=sanitizer, desc=f"{attack} {seed}")
            row = {"attack": attack, "seed": seed, "policy": policy, "epochs": epochs, "budget": budget,
                   "rounds": rounds, **state, "date": time.strftime("%Y-%m-%d %H:%M")}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"[harvest_study] {attack} seed {seed}: " + "; ".join(
                f"epoch {r['epoch']} AUROC harvest {r['harvest']['auroc']} pass {r['pass']['auroc']}" for r in rounds))


def rounds_by_attack(rows: list[dict]):
    """(attack, round index, the first run's round, that round of every run that has it), in file order."""
    for attack in dict.fromkeys(r["attack"] for r in rows):
        group = [r for r in rows if r["attack"] == attack]
        for i, first in enumerate(group[0]["rounds"]):
            yield attack, i, first, [r["rounds"][i] for r in group if len(r["rounds"]) > i]


def summary(path: Path) -> str:
    """Mean AUROC per (attack, round) under each embedding source, and the largest paired gap."""
    rows = read_rows(path)
    lines = ["| attack | round (epoch) | runs | AUROC harvest | AUROC pass | largest \\|gap\\| | in-class harvest | "
             "in-class pass | drop Jaccard |", "|" + "---|" * 9]
    for attack, i, first, per in rounds_by_attack(rows):
        h = np.array([p["harvest"]["auroc"] for p in per], dtype=float)
        s = np.array([p["pass"]["auroc"] for p in per], dtype=float)
        hc = np.array([p["harvest"]["auroc_in_class"] for p in per], dtype=float)
        sc = np.array([p["pass"]["auroc_in_class"] for p in per], dtype=float)
        jac = [p["drop_jaccard"] for p in per if p["drop_jaccard"] is not None]
        gap = np.abs(h - s)
        largest = np.nanmax(gap) if np.isfinite(gap).any() else float("nan")
        lines.append(f"| {attack} | {i} ({first['epoch']}) | {len(per)} | {np.nanmean(h):.3f} | "
                     f"{np.nanmean(s):.3f} | {largest:.3f} | {np.nanmean(hc):.3f} | {np.nanmean(sc):.3f} | "
                     f"{np.mean(jac) if jac else float('nan'):.2f} |")
    return "\n".join(lines + ["", gate_summary(rows)])


def gate_summary(rows: list[dict]) -> str:
    """The label side's gate ratio per (attack, round) on each embedding source: range over the runs."""
    lines = ["| attack | round (epoch) | runs | gate ratio, harvest (min–max) | gate ratio, pass (min–max) | "
             "opens (harvest / pass) |", "|" + "---|" * 6]
    for attack, i, first, per in rounds_by_attack(rows):
        sides = {name: [p[name].get("label_side") for p in per] for name in ("harvest", "pass")}
        if not all(sides["pass"]) or not all(sides["harvest"]):
            continue  # the side does not act in this round (or the rows predate the record)
        ratio = {name: np.array([side["gate_ratio"] for side in v]) for name, v in sides.items()}
        opens = {name: sum(side["open"] for side in v) for name, v in sides.items()}
        lines.append(f"| {attack} | {i} ({first['epoch']}) | {len(per)} | {ratio['harvest'].min():.2f}–"
                     f"{ratio['harvest'].max():.2f} | {ratio['pass'].min():.2f}–{ratio['pass'].max():.2f} | "
                     f"{opens['harvest']} / {opens['pass']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", default="label_flip,badnets-5,clean_label-5")
    parser.add_argument("--seeds", default="1000-1004")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--policy", default="density")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/harvest_study_digits_tuning.jsonl"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary", action="store_true", help="only print the table of --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.summary:
        unknown = [a for a in args.attacks.split(",") if a not in ATTACKS and a != CLEAN]
        if unknown:
            raise SystemExit(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}, {CLEAN}")
        run(args.out, args.attacks.split(","), parse_seeds(args.seeds), args.epochs, args.policy)
    print(summary(args.out))


if __name__ == "__main__":
    main()
