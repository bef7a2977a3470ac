"""``sanitizer demo``: an attack and the defense end to end on scikit-learn's digits.

It trains a surrogate, crafts gradient-matching (Witches' Brew) poisons against a few targets,
trains one victim per defense from scratch on each poisoned set (undefended, ours, EPIC), prints a
table and writes a report (Markdown + JSON + the certificate's HTML report of one sanitized run).

It runs torch on one CPU thread (and puts the previous thread count back when it ends): sums in
float arithmetic come out differently with different thread counts, and so would the tables; on one
thread every machine prints the same table for the same --seed.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sanitizer.attacks import make_attack
from sanitizer.attacks.gradient_matching import (
    choose_target,
    digits_demo_model,
    digits_demo_settings,
    target_outcome,
)
from sanitizer.certificate.bound import BoundRecorder
from sanitizer.core import Sanitizer
from sanitizer.data import load_digits_split
from sanitizer.progress import log
from sanitizer.stats import format_rate
from sanitizer.train import TrainConfig, accuracy, predict_proba, train_classifier

DEFENSES = ("none", "density", "epic-0.1")


@dataclass
class DemoConfig:
    trials: int = 4
    defenses: tuple[str, ...] = DEFENSES
    warmup: int = 5
    every: int = 5
    seed: int = 0
    quick: bool = False  # a reduced run for tests: fewer epochs and crafting steps


def train_victim(train_set, defense: str, settings: dict, cfg: DemoConfig, seed: int):
    model = digits_demo_model(seed, settings["width"])
    sanitizer = None
    if defense != "none":
        sanitizer = Sanitizer(model, train_set, policy=defense, warmup=cfg.warmup, every=cfg.every, seed=seed)
        if defense == "density":
            BoundRecorder.attach(sanitizer)  # records EPIC's bound quantities for the certificate
    recipe = TrainConfig(**settings["victim"], seed=seed)
    result = train_classifier(model, train_set, recipe, sanitizer=sanitizer, desc=f"victim ({defense})")
    return model, sanitizer, result.seconds


def run_demo(out_dir: str | Path = "sanitizer-demo", cfg: DemoConfig | None = None) -> dict:
    """Run the demo; returns the results (also written to ``out_dir``). Torch runs on one thread
    meanwhile (``torch.set_num_threads(1)``, the previous count restored after), so the tables do not
    depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out_dir, cfg)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir: str | Path, cfg: DemoConfig | None) -> dict:
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = digits_demo_settings()
    if cfg.quick:
        cfg.warmup, cfg.every = 1, 1
        settings["surrogate"]["epochs"] = settings["victim"]["epochs"] = 3
        settings["attack"].update(steps=5, restarts=1)
        settings["ensemble"] = 1
    train, test = load_digits_split(seed=cfg.seed)
    n_sur = settings["ensemble"]
    log(f"[demo] digits: {len(train)} training and {len(test)} test images; training {n_sur} surrogate(s)")
    surrogates = []
    for m in range(n_sur):  # an ensemble of surrogates makes the poisons transfer to a fresh victim more often
        surrogate = digits_demo_model(cfg.seed + m, settings["width"])
        train_classifier(surrogate, train, TrainConfig(**settings["surrogate"], seed=cfg.seed + m),
                         desc=f"surrogate {m + 1}/{n_sur}")
        surrogates.append(surrogate.eval())
    attack = make_attack("gradient_matching", **settings["attack"])
    rows, report_sanitizer = [], None
    for trial in range(cfg.trials):
        target, adv = choose_target(surrogates[0], test, settings["target_choice"], seed=cfg.seed + trial)
        t0 = time.perf_counter()
        poisons = attack.craft(train, surrogate=surrogates, test_set=test, target_index=target,
                               adversarial_class=adv, seed=cfg.seed + trial)
        craft_s = time.perf_counter() - t0
        poisoned = poisons.apply(train)
        # The surrogates are clean models: their P(adversarial class) is the target's starting point.
        clean_adv_prob = float(np.mean([predict_proba(m, test.images[[target]])[0, poisons.adversarial_class]
                                        for m in surrogates]))
        is_poison = poisoned.is_poison.numpy()
        log(f"[demo] trial {trial + 1}/{cfg.trials}: target test #{target} (a {int(test.labels[target])}) -> "
            f"{adv}, {len(poisons)} poisons crafted in {craft_s:.0f}s")
        for defense in cfg.defenses:
            model, san, seconds = train_victim(poisoned, defense, settings, cfg, seed=cfg.seed + 100 + trial)
            outcome = target_outcome(model, poisons)
            dropped = san.dropped if san is not None else np.array([], dtype=int)
            rows.append({"trial": trial, "defense": defense, "target": target, "adversarial_class": adv,
                         "clean_adv_prob": clean_adv_prob,
                         "success": outcome["success"], "adv_prob": outcome["adv_prob"][0],
                         "clean_accuracy": accuracy(model, test), "dropped": int(len(dropped)),
                         "poisons_caught": int(is_poison[dropped].sum()), "poisons": int(is_poison.sum()),
                         "train_seconds": seconds})
            if defense == "density" and report_sanitizer is None:
                report_sanitizer = (san, poisons, poisoned)
    summary = summarise(rows, cfg)
    write_outputs(out, rows, summary, cfg, report_sanitizer)
    return {"rows": rows, "summary": summary}


def summarise(rows: list[dict], cfg: DemoConfig) -> list[dict]:
    summary = []
    for defense in cfg.defenses:
        mine = [r for r in rows if r["defense"] == defense]
        wins = sum(r["success"] for r in mine)
        caught = sum(r["poisons_caught"] for r in mine)
        total_poisons = sum(r["poisons"] for r in mine)
        summary.append({
            "defense": defense, "attack_success": format_rate(wins, len(mine)),
            "successes": wins, "trials": len(mine),
            "mean_adv_prob": float(np.mean([r["adv_prob"] for r in mine])),
            "clean_accuracy": float(np.mean([r["clean_accuracy"] for r in mine])),
            "dropped": float(np.mean([r["dropped"] for r in mine])),
            "poisons_caught": f"{caught}/{total_poisons}",
            "time_ratio": float(np.mean([r["train_seconds"] for r in mine]) /
                                np.mean([r["train_seconds"] for r in rows if r["defense"] == "none"]))
            if any(r["defense"] == "none" for r in rows) else float("nan"),
        })
    return summary


def table(summary: list[dict]) -> str:
    lines = ["| defense | attack success (trials, 95% CI) | target's adv. prob | clean acc | dropped / run "
             "| poisons caught | time vs none |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['defense']} | {s['attack_success']} | {s['mean_adv_prob']:.2f} | "
                     f"{100 * s['clean_accuracy']:.1f}% | {s['dropped']:.1f} | {s['poisons_caught']} | "
                     f"{s['time_ratio']:.2f}x |")
    return "\n".join(lines)


def write_outputs(out: Path, rows, summary, cfg: DemoConfig, report_sanitizer) -> None:
    first_defense = [r for r in rows if r["defense"] == cfg.defenses[0]]
    clean_prob = float(np.mean([r["clean_adv_prob"] for r in first_defense])) if first_defense else float("nan")
    text = (table(summary) + f"\n\nBefore poisoning, clean surrogates give the targets P(adversarial class) = "
            f"{clean_prob:.2f} on average: compare the 'adv. prob' column. Gradient matching succeeds on only a "
            "minority of digits targets (see benchmarks/RESULTS.md); run more --trials for tighter intervals.")
    print("\n" + text + "\n")
    (out / "results.json").write_text(json.dumps({"config": vars(cfg), "rows": rows, "summary": summary},
                                                 indent=2, default=str))
    lines = ["# sanitizer demo: gradient matching on digits", "",
             f"{cfg.trials} poisoned datasets (one target each); one victim per defense trained from scratch "
             "on each.", "", text, ""]
    if report_sanitizer is not None:
        san, poisons, poisoned = report_sanitizer
        report_dir = out / "report"
        san.certificate(str(out / "certificate.json"), report_dir=str(report_dir),
                        poison_indices=poisons.indices.tolist())
        lines += [f"Certificate of the first sanitized run: `{out / 'certificate.json'}`; "
                  f"report: `{report_dir / 'report.html'}`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    log(f"[demo] wrote {out / 'report.md'} and {out / 'results.json'}")


def _whole_number(option: str, minimum: int, why: str):
    """An argparse type: a whole number >= ``minimum`` (``why`` says what the bound is for)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{option} must be at least {minimum} ({why}), got {value}")
        return value

    return parse


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run an attack and the defense end to end on digits "
                                   "(on one torch thread, so the table is the same on every machine)",
                                   description=__doc__)
    parser.add_argument("--out", default="sanitizer-demo", help="output folder (default: ./sanitizer-demo)")
    parser.add_argument("--trials", type=_whole_number("--trials", 1, "one poisoned dataset"),
                        default=DemoConfig.trials,
                        help="poisoned datasets (targets), at least 1")
    parser.add_argument("--seed", type=_whole_number("--seed", 0, "numpy seeds the data split"), default=0)
    parser.add_argument("--quick", action="store_true", help="a reduced run (smoke test)")
    parser.set_defaults(handler=lambda a: run_demo(a.out, DemoConfig(trials=a.trials, seed=a.seed, quick=a.quick))
                        and 0)
