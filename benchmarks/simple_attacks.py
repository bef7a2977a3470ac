"""Simple attacks from scratch (digits, or CIFAR-10 with ``--data cifar10``): does each defense catch random
label flips and patch backdoors?

Issue 15: on digits the library default caught 36 % of 10 % random label flips and 1 of 39 BadNets
poisons. This script measures, per (attack, defense, seed), one victim trained from scratch with the
package's CNN on scikit-learn digits (as the certificate's robustness section trains digits victims):
poison recall and precision of what was dropped, clean examples dropped, clean test accuracy and, for
the backdoors, the success on patched non-target test images (sanitizer.attacks.triggers.evaluate_backdoor,
as sanitizer/certificate/robustness.py measures it) beside a clean model's rate on the same images.

Every victim is one JSONL row, appended when it finishes; a rerun skips the rows already there.
Tuning seeds (1000+) and reported seeds (0+) go to separate files. Usage::

    python -m benchmarks.simple_attacks --seeds 1000-1004                # tuning runs, resumable
    python -m benchmarks.simple_attacks --seeds 0-19 --attacks label_flip,badnets-5
    python -m benchmarks.simple_attacks --summary benchmarks/results/simple_attacks_tuning.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.poisoning import parse_defense
from sanitizer import Sanitizer
from sanitizer.attacks import make_attack
from sanitizer.attacks.triggers import evaluate_backdoor
from sanitizer.data import ImageTensorDataset, load_cifar10, load_digits_split, subset_by_class
from sanitizer.models import make_model
from sanitizer.progress import log
from sanitizer.stats import format_rate, wilson_interval
from sanitizer.train import TrainConfig, predict_proba, train_classifier

RESULTS = Path("benchmarks/results")
TUNING_SEEDS = 1000  # seeds from here on are tuning seeds; below, reported seeds

# name -> (registered attack, its parameters, budget as a fraction of the target class or None)
ATTACKS: dict[str, tuple[str, dict[str, Any], float | None]] = {
    "label_flip": ("label_flip", {"budget": 0.1, "mode": "random"}, None),  # 10 % of the training set
    "badnets-1": ("badnets", {}, 0.01),
    "badnets-5": ("badnets", {}, 0.05),
    "badnets-10": ("badnets", {}, 0.10),
    "badnets-10-white": ("badnets", {"trigger_kind": "white"}, 0.10),  # flat: the stamped-window test skips it
    "badnets-10-blend-0.5": ("badnets", {"opacity": 0.5}, 0.10),  # half-transparent: no exact window
    "clean_label-5": ("clean_label_backdoor", {"eps": 16 / 255}, 0.05),
    "clean_label-10": ("clean_label_backdoor", {"eps": 16 / 255}, 0.10),
}


def defense_options(name: str) -> dict[str, Any] | None:
    """The Sanitizer keyword arguments of a defense besides ``epochs`` (None: no sanitizer).
    ``default`` passes nothing: whatever the library's default is at the commit that runs it."""
    if name == "none":
        return None
    if name == "default":
        return {}
    if name == "default-harvest":  # the default with rounds from the training steps (the library's own default
        return {"harvest": True}      # harvests only from 10,000 examples; these datasets are smaller)
    if name in ("density2s", "density2s-drop"):  # density2s unlearns what it drops where the Sanitizer can
        options: dict[str, Any] = {"policy": "density", "policy_options": {"two_sided": True, "max_fraction": 0.2}}
        if name == "density2s" and "action" in inspect.signature(Sanitizer).parameters:
            options["action"] = "unlearn"
        return options
    if name in ("cleanlab", "epic-0.1"):
        return {"policy": name}
    if ":" in name:  # "density:max_fraction=0.2": a policy with options, written as the poisoning harness does
        policy, options = parse_defense(name)
        return {"policy": policy, "policy_options": options}
    raise SystemExit(f"unknown defense {name!r}; choose from {', '.join(DEFENSES)}, density2s-drop, default-harvest")


DEFENSES = ("none", "default", "density2s", "cleanlab", "epic-0.1")  # the default list; also density2s-drop


def proportion(successes: int, trials: int) -> dict[str, Any]:
    """A proportion with its trial count and Wilson 95 % interval (None without trials)."""
    return {"successes": int(successes), "trials": int(trials),
            "rate": successes / trials if trials else None,
            "wilson95": list(wilson_interval(successes, trials)) if trials else None}


def parse_seeds(spec: str) -> list[int]:
    """``"1000-1004"`` or ``"0,1,5"`` (or both, comma separated) as a sorted list of seeds."""
    seeds: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        seeds.update(range(int(lo), int(hi or lo) + 1))
    return sorted(seeds)


def seed_kind(seeds: list[int]) -> str:
    """``tuning`` (all >= 1000) or ``reported`` (all below); mixing them in one run is refused."""
    kinds = {"tuning" if s >= TUNING_SEEDS else "reported" for s in seeds}
    if len(kinds) != 1:
        raise SystemExit(f"--seeds mixes tuning seeds (>= {TUNING_SEEDS}) with reported seeds; run them apart")
    return kinds.pop()


def git_state() -> dict[str, Any]:
    """The commit that runs, and whether (and how) the package's code differs from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "sanitizer").splitlines()]
    diff = git("diff", "HEAD", "--", "sanitizer")
    return {"commit": git("rev-parse", "HEAD").strip() or None, "sanitizer_changed": changed,
            "sanitizer_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if changed else None}


# ------------------------------------------------------------------------------------------------
# One victim
# ------------------------------------------------------------------------------------------------

class Experiment:
    """Data, recipe and the clean reference model of every seed (trained once, cached on disk)."""

    def __init__(self, epochs: int, width: int, lr: float, per_class: int | None, cache_dir: Path,
                 data: str = "digits", data_root: str = "../shared/data/cifar10") -> None:
        if data == "cifar10":
            train, self.test = load_cifar10(data_root), load_cifar10(data_root, train=False)
        else:
            train, self.test = load_digits_split()
        self.data = data
        if per_class is not None:
            idx = torch.from_numpy(subset_by_class(train, per_class, 0))
            train = ImageTensorDataset(train.images[idx], train.labels[idx], None, train.num_classes)
        self.train, self.epochs, self.width, self.lr = train, epochs, width, lr
        self.cache_dir = cache_dir
        self._clean: dict[int, torch.nn.Module] = {}

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, seed=seed)

    def new_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return make_model("cnn", self.train.num_classes, self.train.images.shape[1], self.width)

    def clean_model(self, seed: int) -> torch.nn.Module:
        """The model trained on the clean training set with the victims' seed and recipe."""
        if seed not in self._clean:
            tag = f"{self.data}_n{len(self.train)}_w{self.width}_e{self.epochs}_lr{self.lr}_s{seed}"
            path = self.cache_dir / f"clean_{tag}.pt"
            model = self.new_model(seed)
            if path.exists():
                model.load_state_dict(torch.load(path, weights_only=True))
            else:
                train_classifier(model, self.train, self.config(seed), desc=f"clean {seed}")
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), path)
            self._clean[seed] = model.eval()
        return self._clean[seed]

    def target_class(self, seed: int) -> int:
        return int(np.random.default_rng([seed, 3]).integers(self.train.num_classes))  # as robustness.py draws it

    def craft(self, attack: str, seed: int):
        name, params, fraction = ATTACKS[attack]
        kwargs: dict[str, Any] = {"seed": seed}
        if fraction is not None:  # a backdoor: the budget is a fraction of the target class
            target = self.target_class(seed)
            n_target = int((self.train.labels == target).sum())
            params = {**params, "budget": max(1, round(fraction * n_target))}
            kwargs["adversarial_class"] = target
        if name == "clean_label_backdoor":
            kwargs["surrogate"] = self.clean_model(seed)
        return make_attack(name, **params).craft(self.train, **kwargs)

    def accuracy(self, model: torch.nn.Module) -> dict[str, Any]:
        correct = int((predict_proba(model, self.test.images).argmax(1) == self.test.labels).sum())
        return proportion(correct, len(self.test))


def sanitizer_record(sanitizer: Sanitizer, is_poison: np.ndarray) -> dict[str, Any]:
    """How the defense was configured (resolved) and what each of its rounds dropped."""
    return {"policy": sanitizer.policy.name, "policy_config": sanitizer.policy.config(),
            "embedding": sanitizer.embedding, "warmup": sanitizer.warmup, "every": sanitizer.every,
            "action": getattr(sanitizer, "action", "drop"),
            "rounds": [{"epoch": r["epoch"], "dropped": len(r["dropped_now"]),
                        "poisons": int(is_poison[np.asarray(r["dropped_now"], dtype=np.int64)].sum()),
                        # where the label side read its features (harvest mode: the rows, or a pass it asked for)
                        **({"label_views": r["label_side"].get("views"),
                            "label_gate_ratio": r["label_side"].get("gate_ratio"),
                            "harvested_gate_ratio": r["label_side"].get("harvested_gate_ratio")}
                           if "label_side" in r else {})}
                       for r in sanitizer.history],
            "unlearn": [r["unlearn"] for r in sanitizer.history if "unlearn" in r] or None}


def run_victim(exp: Experiment, attack: str, defense: str, seed: int, poisons) -> dict[str, Any]:
    """Train one victim on the poisoned set under ``defense`` and measure it."""
    poisoned = poisons.apply(exp.train)
    is_poison = np.zeros(len(exp.train), dtype=bool)
    is_poison[poisons.indices] = True
    model = exp.new_model(seed)
    options = defense_options(defense)
    sanitizer = None if options is None else Sanitizer(model, poisoned, epochs=exp.epochs, **options)
    t0 = time.perf_counter()
    train_classifier(model, poisoned, exp.config(seed), sanitizer=sanitizer, desc=f"{attack} {defense} {seed}")
    seconds = time.perf_counter() - t0
    dropped = sanitizer.dropped if sanitizer is not None else np.zeros(0, dtype=np.int64)
    hits = int(is_poison[dropped].sum())
    row = {"attack": attack, "defense": defense, "seed": seed, "budget": len(poisons),
           "target_class": int(poisons.adversarial_class), "n_train": len(exp.train),
           "defense_options": options, "sanitizer": sanitizer_record(sanitizer, is_poison) if sanitizer else None,
           "dropped": int(len(dropped)),
           "poison_recall": proportion(hits, len(poisons)),
           "poison_precision": proportion(hits, len(dropped)),
           "clean_dropped": proportion(len(dropped) - hits, len(exp.train) - len(poisons)),
           "clean_accuracy": exp.accuracy(model), "backdoor": None, "seconds": seconds}
    if poisons.trigger is not None:
        victim = evaluate_backdoor(poisons, model, exp.test, seed=seed)
        clean = evaluate_backdoor(poisons, exp.clean_model(seed), exp.test, seed=seed)
        row["backdoor"] = {"success": proportion(victim.successes, victim.trials),
                           "victim_unpatched": proportion(victim.clean_hits, victim.trials),
                           "clean_model_patched": proportion(clean.successes, clean.trials)}
    return row


# ------------------------------------------------------------------------------------------------
# The run (resumable)
# ------------------------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a results file (a torn last line is ignored)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run(out: Path, attacks: list[str], defenses: list[str], seeds: list[int], epochs: int = 12, width: int = 16,
        lr: float = 0.05, per_class: int | None = None, cache_dir: Path = Path("benchmarks/out/simple_attacks"),
        on_row: Callable[[dict], None] | None = None, data: str = "digits",
        data_root: str = "../shared/data/cifar10") -> Path:
    """Run (or resume) every (attack, defense, seed) victim not yet in ``out``."""
    recipe = {"data": data, "model": "cnn", "epochs": epochs, "width": width, "lr": lr, "per_class": per_class,
              "seed_kind": seed_kind(seeds)}
    rows = read_rows(out)
    head = next((r for r in rows if r.get("kind") == "run"), None)
    if head is not None and head["recipe"] != recipe:
        raise SystemExit(f"{out} was written with {head['recipe']}, not {recipe}; write to another --out file")
    done = {(r["attack"], r["defense"], r["seed"]) for r in rows if r.get("kind") == "victim"}
    exp = Experiment(epochs, width, lr, per_class, cache_dir, data, data_root)
    state = git_state()
    out.parent.mkdir(parents=True, exist_ok=True)
    torn = out.exists() and out.stat().st_size > 0 and not out.read_bytes().endswith(b"\n")
    with out.open("a") as f:
        if torn:
            f.write("\n")

        def write(row: dict) -> None:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            if on_row is not None:
                on_row(row)

        if head is None:
            write({"kind": "run", "recipe": recipe, "machine": f"{platform.machine()} {platform.processor()}".strip(),
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                   **state})
        for attack in attacks:
            for seed in seeds:
                todo = [d for d in defenses if (attack, d, seed) not in done]
                if not todo:
                    continue
                poisons = exp.craft(attack, seed)
                for defense in todo:
                    row = run_victim(exp, attack, defense, seed, poisons)
                    write({"kind": "victim", **row, **state, "date": time.strftime("%Y-%m-%d %H:%M")})
                    log(f"[simple_attacks] {attack} {defense} seed {seed}: recall "
                        f"{row['poison_recall']['successes']}/{row['poison_recall']['trials']}, dropped "
                        f"{row['dropped']}, accuracy {row['clean_accuracy']['rate']:.3f}"
                        + (f", backdoor {row['backdoor']['success']['rate']:.3f}" if row["backdoor"] else ""))
    return out


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------

def pooled(rows: list[dict], get: Callable[[dict], dict | None]) -> str:
    """``k/n = p% [lo–hi%]`` over the rows (counts pooled over runs), or ``—`` without trials."""
    parts = [get(r) for r in rows]
    k = sum(p["successes"] for p in parts if p)
    n = sum(p["trials"] for p in parts if p)
    return format_rate(k, n) if n else "—"


COLUMNS: list[tuple[str, Callable[[dict], dict | None]]] = [
    ("poison recall", lambda r: r["poison_recall"]),
    ("precision", lambda r: r["poison_precision"]),
    ("clean dropped", lambda r: r["clean_dropped"]),
    ("backdoor success", lambda r: r["backdoor"] and r["backdoor"]["success"]),
    ("clean model, patched", lambda r: r["backdoor"] and r["backdoor"]["clean_model_patched"]),
    ("clean accuracy", lambda r: r["clean_accuracy"]),
]


def summary(paths: list[Path]) -> str:
    """A Markdown table, attack × defense, every proportion pooled over the runs with its Wilson interval."""
    victims = [r for p in paths for r in read_rows(p) if r.get("kind") == "victim"]
    order = {a: i for i, a in enumerate(ATTACKS)} | {d: i for i, d in enumerate(DEFENSES)} | \
        {"density2s-drop": 2.5, "default-harvest": 1.5}
    keys = sorted({(r["attack"], r["defense"]) for r in victims},
                  key=lambda k: (order.get(k[0], 99), k[0], order.get(k[1], 99), k[1]))
    lines = ["| attack | defense | runs (seeds) | policy | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|" + "---|" * (4 + len(COLUMNS))]
    for attack, defense in keys:
        group = [r for r in victims if (r["attack"], r["defense"]) == (attack, defense)]
        seeds = sorted(r["seed"] for r in group)
        policies = sorted({r["sanitizer"]["policy"] for r in group if r["sanitizer"]}) or ["—"]
        lines.append(f"| {attack} | {defense} | {len(group)} ({seeds[0]}–{seeds[-1]}) | {', '.join(policies)} | "
                     + " | ".join(pooled(group, get) for _, get in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1000-1004",
                        help=f"e.g. 1000-1004 (tuning: >= {TUNING_SEEDS}) or 0-19 (reported); never both at once")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma separated, from {', '.join(ATTACKS)}")
    parser.add_argument("--defenses", default=",".join(DEFENSES), help=f"comma separated, from {', '.join(DEFENSES)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSONL (default benchmarks/results/simple_attacks_{tuning,reported}.jsonl)")
    parser.add_argument("--data", choices=("digits", "cifar10"), default="digits",
                        help="cifar10: colour images (with --data-root; --per-class for a subset)")
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--width", type=int, default=16, help="CompactCNN width")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--per-class", type=int, default=None, help="class-balanced training subset (tests)")
    parser.add_argument("--cache-dir", type=Path, default=Path("benchmarks/out/simple_attacks"),
                        help="where the clean reference models are cached")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary", nargs="+", type=Path, metavar="JSONL",
                        help="print the Markdown table of these results files and exit")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        pass
    attacks = [a for a in args.attacks.split(",") if a]
    defenses = [d for d in args.defenses.split(",") if d]
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise SystemExit(f"unknown attacks {unknown}; choose from {', '.join(ATTACKS)}")
    for d in defenses:
        defense_options(d)
    seeds = parse_seeds(args.seeds)
    out = args.out or RESULTS / f"simple_attacks_{seed_kind(seeds)}.jsonl"
    run(out, attacks, defenses, seeds, args.epochs, args.width, args.lr, args.per_class, args.cache_dir,
        data=args.data, data_root=args.data_root)
    print(summary([out]))


if __name__ == "__main__":
    main()
