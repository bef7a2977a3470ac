"""Does the input-noise screen find every bundled attack's poisons, and what does it cost clean data?

For each (attack, seed): train a surrogate on the clean training set, craft the attack with the
package's generator (conventional arguments: a random target test image and adversarial class),
overlay the poisons, and score every training example with the screen
(:mod:`sanitizer.noise_screen`: robust z of log patch noise floor within the labelled class).
Reported per row: poisons flagged at the library threshold (recall), clean examples flagged (false
positive rate over the whole training set), and the in-class AUROC (poisons against the clean
examples of the classes that hold poisons). No victim is trained: the screen runs before training,
so what it flags is what the victim never sees.

One JSONL row per (data, attack, seed), appended as it finishes; a rerun skips finished rows.
Usage::

    python -m benchmarks.noise_screen_study --data digits --seeds 1000-1002
    python -m benchmarks.noise_screen_study --data cifar10 --per-class 500 --seeds 1000-1001
    python -m benchmarks.noise_screen_study --summary benchmarks/results/noise_screen_study_tuning.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sanitizer.attacks import make_attack
from sanitizer.attacks.command import craft_with_convention
from sanitizer.attacks.gradient_matching import train_surrogate
from sanitizer.data import ImageTensorDataset, load_digits_split, subset_by_class
from sanitizer.models import make_model
from sanitizer.noise_screen import GROUP_CUT, PATCH, SMALLEST, THRESHOLD, noise_outliers, patch_noise_floor
from sanitizer.progress import log
from sanitizer.stats import format_rate

# name -> (registered attack, parameters): CPU-sized crafting; budgets are fractions of the training set
# (1 % of the training set is about 10 % of one class)
ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "gradient_matching-16": ("gradient_matching", {"eps": 16 / 255, "budget": 0.01, "steps": 60}),
    "gradient_matching-8": ("gradient_matching", {"eps": 8 / 255, "budget": 0.01, "steps": 60}),
    "bullseye_polytope-8": ("bullseye_polytope", {"eps": 8 / 255, "budget": 5, "iterations": 200}),
    "feature_collision": ("feature_collision", {"budget": 5, "iterations": 200}),
    "metapoison-8": ("metapoison", {"eps": 8 / 255, "budget": 0.01, "steps": 10}),
    "sleeper_agent-16": ("sleeper_agent", {"eps": 16 / 255, "budget": 0.01, "steps": 40}),
    "clean_label_backdoor-8": ("clean_label_backdoor", {"eps": 8 / 255, "budget": 0.01}),
    "adversarial_poisons-8-10%": ("adversarial_poisons", {"eps": 8 / 255, "fraction": 0.1, "steps": 20}),
    "badnets-1%": ("badnets", {"budget": 0.01}),
    # the attacker who knows the screen: gradient matching that keeps each poison's noise floor at its base's
    "adaptive-noise1-16": ("adaptive", {"eps": 16 / 255, "budget": 0.01, "steps": 60, "lam": 0.0, "noise_lam": 1.0}),
    "adaptive-noise10-16": ("adaptive", {"eps": 16 / 255, "budget": 0.01, "steps": 60, "lam": 0.0,
                                         "noise_lam": 10.0}),
    "adaptive-noise100-16": ("adaptive", {"eps": 16 / 255, "budget": 0.01, "steps": 60, "lam": 0.0,
                                          "noise_lam": 100.0}),
    "label_flip-10": ("label_flip", {"budget": 0.1}),
}


def load(data: str, per_class: int, seed: int, root: str) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    if data == "digits":
        return load_digits_split(seed=0)
    from sanitizer.data.cifar10 import load_cifar10

    train, test = load_cifar10(root, train=True), load_cifar10(root, train=False)
    if per_class:
        idx = torch.as_tensor(subset_by_class(train, per_class, seed=0))
        train = ImageTensorDataset(train.images[idx], train.labels[idx], None, 10)
    return train, test


def one_row(data: str, attack_name: str, seed: int, train, test, surrogate, patch: int = PATCH,
            smallest: int = SMALLEST, group_cut: float | None = GROUP_CUT) -> dict[str, Any]:
    name, params = ATTACKS[attack_name]
    attack = make_attack(name, **params)
    rng = np.random.default_rng(seed)
    target = int(rng.integers(len(test)))
    adv = int((int(test.labels[target]) + 1 + rng.integers(train.num_classes - 1)) % train.num_classes)
    t0 = time.perf_counter()
    poisons = craft_with_convention(attack, train, surrogate=surrogate, test_set=test, target_index=target,
                                    adversarial_class=adv, seed=seed)
    craft_seconds = time.perf_counter() - t0
    poisoned = poisons.apply(train)
    images = poisoned.images if hasattr(poisoned, "images") else torch.stack([poisoned[i][0] for i in
                                                                                range(len(poisoned))])
    labels = np.asarray([int(poisoned[i][1]) for i in range(len(poisoned))])
    is_poison = np.zeros(len(labels), dtype=bool)
    is_poison[np.asarray(poisons.indices)] = True
    t1 = time.perf_counter()
    floor = patch_noise_floor(images, patch, smallest).numpy()
    flagged, z = noise_outliers(floor, labels, group_cut=group_cut)
    screen_seconds = time.perf_counter() - t1
    classes = np.unique(labels[is_poison])
    clean_same = ~is_poison & np.isin(labels, classes)
    from sklearn.metrics import roc_auc_score

    auroc = float(roc_auc_score(np.r_[np.ones(is_poison.sum()), np.zeros(clean_same.sum())],
                                np.r_[z[is_poison], z[clean_same]])) if is_poison.any() else None
    return {"data": data, "attack": attack_name, "registered": name, "params": params, "seed": seed,
            "train_size": len(labels), "poisons": int(is_poison.sum()),
            "poisons_flagged": int((flagged & is_poison).sum()), "clean_flagged": int((flagged & ~is_poison).sum()),
            "clean": int((~is_poison).sum()), "auroc_in_class": auroc,
            "poison_z_min": float(z[is_poison].min()) if is_poison.any() else None,
            "poison_z_median": float(np.median(z[is_poison])) if is_poison.any() else None,
            "attack_objective_final": min(poisons.params.get("restart_losses") or [float("nan")]),
            "threshold": THRESHOLD, "group_cut": group_cut, "patch": patch, "smallest": smallest,
            "craft_seconds": craft_seconds,
            "screen_seconds": screen_seconds}


def saved_set_row(path: Path, train: ImageTensorDataset, patch: int, smallest: int,
                  group_cut: float | None = GROUP_CUT) -> dict[str, Any]:
    """The screen on a saved poison set of the from-scratch benchmark (full CIFAR-10 training set)."""
    from sklearn.metrics import roc_auc_score

    from sanitizer.attacks import PoisonSet

    poisons = PoisonSet.load(path)
    images = train.images.clone()
    idx = torch.from_numpy(np.asarray(poisons.indices))
    images[idx] = torch.as_tensor(poisons.images, dtype=images.dtype)
    labels = train.labels.numpy().copy()
    labels[idx.numpy()] = poisons.labels
    is_poison = np.zeros(len(labels), dtype=bool)
    is_poison[idx.numpy()] = True
    t0 = time.perf_counter()
    floor = torch.cat([patch_noise_floor(images[i:i + 2000], patch, smallest) for i in range(0, len(images), 2000)])
    flagged, z = noise_outliers(floor.numpy(), labels, group_cut=group_cut)
    clean_same = ~is_poison & (labels == poisons.adversarial_class)
    eps = round(255 * float(poisons.params.get("eps", 0)))
    return {"data": "cifar10-full", "attack": f"{poisons.attack}-{eps}", "registered": poisons.attack,
            "params": {"file": path.name}, "seed": int(poisons.params.get("seed", -1)), "train_size": len(labels),
            "poisons": int(is_poison.sum()), "poisons_flagged": int((flagged & is_poison).sum()),
            "clean_flagged": int((flagged & ~is_poison).sum()), "clean": int((~is_poison).sum()),
            "clean_flagged_in_class": int((flagged & clean_same).sum()), "clean_in_class": int(clean_same.sum()),
            "auroc_in_class": float(roc_auc_score(np.r_[np.ones(is_poison.sum()), np.zeros(clean_same.sum())],
                                                  np.r_[z[is_poison], z[clean_same]])),
            "poison_z_min": float(z[is_poison].min()), "poison_z_median": float(np.median(z[is_poison])),
            "threshold": THRESHOLD, "group_cut": group_cut, "patch": patch, "smallest": smallest,
            "craft_seconds": None,
            "screen_seconds": time.perf_counter() - t0}


def summary(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = ("| data | attack | patch, smallest | runs (seeds) | poisons flagged (recall) | clean flagged (FP rate) | "
              "in-class AUROC, median [min–max] | poison z, median of medians |")
    lines = [header, "|" + "---|" * 8]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["attack"], f"{r['patch']}, {r['smallest']}"), []).append(r)
    for (data, attack, shape), rs in groups.items():
        seeds = sorted(r["seed"] for r in rs)
        aurocs = [r["auroc_in_class"] for r in rs if r["auroc_in_class"] is not None]
        zmed = [r["poison_z_median"] for r in rs if r["poison_z_median"] is not None]
        lines.append(
            f"| {data} | {attack} | {shape} | {len(rs)} ({seeds[0]}–{seeds[-1]}) | "
            f"{format_rate(sum(r['poisons_flagged'] for r in rs), sum(r['poisons'] for r in rs))} | "
            f"{format_rate(sum(r['clean_flagged'] for r in rs), sum(r['clean'] for r in rs))} | "
            + (f"{np.median(aurocs):.3f} [{min(aurocs):.3f}–{max(aurocs):.3f}]" if aurocs else "—") + " | "
            + (f"{np.median(zmed):.1f}" if zmed else "—") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("digits", "cifar10"), default="digits")
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--per-class", type=int, default=500, help="CIFAR-10 training images per class (0: all)")
    parser.add_argument("--seeds", default="1000-1002", help="A-B (inclusive); 1000+ are tuning seeds")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--patch", type=int, default=PATCH, help="patch side (the library default unless tuning)")
    parser.add_argument("--smallest", type=int, default=SMALLEST, help="eigenvalues averaged (library default)")
    parser.add_argument("--group-cut", type=float, default=GROUP_CUT if GROUP_CUT is not None else -1,
                        help="the cut in a class that stands out (library default; < 0: off)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary", type=Path, help="print the Markdown table of a results file and exit")
    parser.add_argument("--saved", nargs="+", type=Path, help="score saved poison sets of the from-scratch "
                        "benchmark (cifar10-scratch-full) on the full CIFAR-10 training set instead of crafting")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return
    torch.set_num_threads(args.threads)
    if args.saved:
        from sanitizer.data.cifar10 import load_cifar10

        train = load_cifar10(args.data_root, train=True)
        out = args.out or Path("benchmarks/results/noise_screen_scratch_full.jsonl")
        for path in args.saved:
            row = saved_set_row(path, train, args.patch, args.smallest, None if args.group_cut < 0 else args.group_cut)
            with out.open("a") as f:
                f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d")}) + "\n")
        print(summary(out))
        return
    first, last = (int(s) for s in args.seeds.split("-"))
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attacks {unknown}; choose from {', '.join(ATTACKS)}")
    out = args.out or Path("benchmarks/results") / (
        f"noise_screen_study_{'tuning' if first >= 1000 else 'reported'}.jsonl")
    done = set()
    if out.exists():
        done = {(r["data"], r["attack"], r["seed"], r["patch"], r["smallest"])
                for r in map(json.loads, out.read_text().splitlines())}
    train, test = load(args.data, args.per_class, 0, args.data_root)
    for seed in range(first, last + 1):
        todo = [a for a in attacks if (args.data, a, seed, args.patch, args.smallest) not in done]
        if not todo:
            continue
        torch.manual_seed(seed)
        channels = train.images.shape[1]
        model = make_model("cnn", train.num_classes, channels, 16)
        surrogate = train_surrogate(train, model, epochs=12 if args.data == "digits" else 8, lr=0.05, seed=seed)
        for attack_name in todo:
            row = one_row(args.data, attack_name, seed, train, test, surrogate, args.patch, args.smallest,
                          None if args.group_cut < 0 else args.group_cut)
            row.update(machine=platform.machine(), threads=args.threads, date=time.strftime("%Y-%m-%d"))
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"[screen study] {args.data} {attack_name} seed {seed}: {row['poisons_flagged']}/{row['poisons']} "
                f"poisons, {row['clean_flagged']}/{row['clean']} clean flagged, AUROC {row['auroc_in_class']}")
    print(summary(out))


if __name__ == "__main__":
    main()
