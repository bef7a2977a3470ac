"""The shared-pattern screen on full CIFAR-10 (issue 15): patch backdoors found before training, and its cost.

For every seed and trigger variant, stamps a BadNets or clean-label patch backdoor (no surrogate: the
clean-label poisons are stamped without their PGD step) into the 50,000 training images, then runs the
screen's two statistics as the Sanitizer does (sanitizer.noise_screen, sanitizer.shared_patterns) and
prints poison recall, clean images flagged and CPU seconds. ``--gm-sets`` also screens saved
gradient-matching poison sets (false positives of the new statistic on another attack). Rows are
appended to a JSONL (one per seed and variant) and skipped when rerun.

    python -m benchmarks.stamped_trigger_screen --seeds 0-9 \
        --out benchmarks/results/stamped_trigger_screen_reported.jsonl
    python -m benchmarks.stamped_trigger_screen --summary benchmarks/results/stamped_trigger_screen_reported.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.simple_attacks import parse_seeds, proportion
from sanitizer.attacks import PoisonSet, make_attack
from sanitizer.data import load_cifar10
from sanitizer.noise_screen import patch_noise_floor, screen_decision
from sanitizer.shared_patterns import WindowCollector
from sanitizer.stats import format_rate

# name -> (attack, options, share of the target class)
VARIANTS = {
    "badnets-1": ("badnets", {}, 0.01),
    "badnets-10": ("badnets", {}, 0.10),
    "badnets-5-random-place": ("badnets", {"location": "random"}, 0.05),
    "badnets-5-random-trigger": ("badnets", {"trigger_kind": "random"}, 0.05),
    "badnets-5-white": ("badnets", {"trigger_kind": "white"}, 0.05),
    "badnets-1-white": ("badnets", {"trigger_kind": "white"}, 0.01),
    "badnets-10-white": ("badnets", {"trigger_kind": "white"}, 0.10),
    "badnets-5-white-top-left": ("badnets", {"trigger_kind": "white", "location": "top_left"}, 0.05),
    "badnets-5-white-random-place": ("badnets", {"trigger_kind": "white", "location": "random"}, 0.05),
    "badnets-5-blend-0.5": ("badnets", {"opacity": 0.5}, 0.05),
    "clean_label-5-stamp-only": ("clean_label_backdoor", {"perturb": False}, 0.05),
}


def screen(images: torch.Tensor, labels: np.ndarray, batch: int = 512) -> dict:
    """The screen's decisions, as Sanitizer.run_screen makes them, with CPU seconds per statistic."""
    collector, floors, t_floor, t_hash = WindowCollector(), [], 0.0, 0.0
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        c0 = time.process_time()
        floors.append(patch_noise_floor(x).numpy())
        c1 = time.process_time()
        collector(x, start)
        t_floor, t_hash = t_floor + c1 - c0, t_hash + time.process_time() - c1
    c0 = time.process_time()
    noise, _, _ = screen_decision(np.concatenate(floors), labels)
    c1 = time.process_time()
    stamped, info = collector.decide(labels)
    t_decide = time.process_time() - c1
    return {"noise": noise, "stamped": stamped, "info": info,
            "cpu_s": {"noise_floor": t_floor + (c1 - c0), "patterns": t_hash + t_decide}}


def row_for(name: str, seed: int, images, labels, is_poison) -> dict:
    out = screen(images, labels)
    either = out["noise"] | out["stamped"]
    row = {"variant": name, "seed": seed, "poisons": int(is_poison.sum()),
           "cpu_s": {k: round(v, 2) for k, v in out["cpu_s"].items()},
           "patterns_applied": out["info"]["applied"], "groups": out["info"]["groups"][:3],
           "flat_applied": out["info"]["flat"].get("applied"), "flat_groups": out["info"]["flat"]["groups"][:3],
           "flat_flagged": out["info"]["flat"].get("flagged")}
    for key, flags in (("noise_floor", out["noise"]), ("patterns", out["stamped"]), ("screen", either)):
        row[key] = {"recall": proportion(int(flags[is_poison].sum()), int(is_poison.sum())),
                    "clean_flagged": int(flags[~is_poison].sum())}
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--seeds", default="1000-1002")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--gm-sets", nargs="*", type=Path, default=[], help="saved PoisonSet .npz files to screen")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stamped_trigger_screen_tuning.jsonl"))
    parser.add_argument("--summary", nargs="+", type=Path, metavar="JSONL")
    args = parser.parse_args(argv)
    if args.summary:
        return summarise([json.loads(line) for f in args.summary for line in f.open()])
    torch.set_num_threads(1)
    full = load_cifar10(args.data_root)
    done = {(r["variant"], r["seed"]) for r in map(json.loads, args.out.open())} if args.out.exists() else set()
    jobs = [(v, s) for s in parse_seeds(args.seeds) for v in args.variants.split(",")]
    jobs += [(f"gradient_matching:{p.stem}", 0) for p in args.gm_sets]
    for name, seed in jobs:
        if (name, seed) in done:
            continue
        if name.startswith("gradient_matching:"):
            poisons = PoisonSet.load(next(p for p in args.gm_sets if p.stem == name.split(":", 1)[1]))
        else:
            attack, options, share = VARIANTS[name]
            target = int(np.random.default_rng(seed).integers(10))
            budget = int(share * int((full.labels == target).sum()))
            poisons = make_attack(attack, budget=budget, **options).craft(full, seed=seed, adversarial_class=target)
        data = poisons.apply(full)
        is_poison = np.zeros(len(full), dtype=bool)
        is_poison[poisons.indices] = True
        row = row_for(name, seed, data.images, data.labels.numpy(), is_poison)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name} seed {seed}: screen recall {row['screen']['recall']['successes']}/{row['poisons']}, "
              f"clean flagged {row['screen']['clean_flagged']} (patterns {row['patterns']['clean_flagged']}), "
              f"cpu {row['cpu_s']}", flush=True)


def summarise(rows: list[dict]) -> None:
    print("| variant | runs | poisons | recall: noise floor | recall: patterns | recall: screen | clean flagged by "
          "patterns (mean) | clean flagged by the screen (mean) | CPU s noise floor / patterns (mean) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == name]
        poisons = sum(r["poisons"] for r in group)

        def rate(key: str, group=group, poisons=poisons) -> str:
            return format_rate(sum(r[key]["recall"]["successes"] for r in group), poisons)

        print(f"| {name} | {len(group)} | {poisons} | {rate('noise_floor')} | {rate('patterns')} | {rate('screen')} | "
              f"{np.mean([r['patterns']['clean_flagged'] for r in group]):.1f} | "
              f"{np.mean([r['screen']['clean_flagged'] for r in group]):.1f} | "
              f"{np.mean([r['cpu_s']['noise_floor'] for r in group]):.1f} / "
              f"{np.mean([r['cpu_s']['patterns'] for r in group]):.1f} |")


if __name__ == "__main__":
    main()
