"""The attacker who knows the input-noise screen: what does evading it cost the attack? (digits, demo regime)

Per trial (seed): two clean surrogates, a target the surrogates find uncertain (the demo's rule),
then gradient matching with the demo's settings (14 poisons, ε = 32/255) crafted three ways: plain
(``noise_lam=0``) and adaptive with the noise-floor term at ``noise_lam`` 10 and 100
(``make_attack("adaptive", lam=0, noise_lam=...)``). For each poison set, one victim trained from
scratch undefended and one with the library default (``Sanitizer(model, data, epochs=...)`` only).
A row per victim: the target's adversarial-class probability, success (flipped), poisons the screen
dropped, everything dropped, clean accuracy.

Usage::

    python -m benchmarks.adaptive_screen --seeds 1000-1004          # tuning seeds, resumable
    python -m benchmarks.adaptive_screen --summary benchmarks/results/adaptive_screen_tuning.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sanitizer import Sanitizer
from sanitizer.attacks import make_attack
from sanitizer.attacks.gradient_matching import (
    choose_target,
    digits_demo_model,
    digits_demo_settings,
    target_outcome,
)
from sanitizer.data import load_digits_split
from sanitizer.stats import format_rate
from sanitizer.train import TrainConfig, accuracy, train_classifier

NOISE_LAMS = (0.0, 10.0, 100.0)


def victim(train, test, poisons, poisoned, settings: dict, defended: bool, seed: int) -> dict:
    model = digits_demo_model(seed, settings["width"])
    recipe = TrainConfig(**settings["victim"], seed=seed)
    san = Sanitizer(model, poisoned, epochs=recipe.epochs, seed=seed, verbose=False) if defended else None
    train_classifier(model, poisoned, recipe, sanitizer=san, desc=f"victim ({'default' if defended else 'none'})")
    outcome = target_outcome(model, poisons)
    is_poison = np.zeros(len(poisoned), dtype=bool)
    is_poison[np.asarray(poisons.indices)] = True
    screen = [r for r in (san.history if san else []) if r.get("kind") == "screen"]
    screened = np.asarray(screen[0]["dropped_now"], dtype=int) if screen else np.zeros(0, dtype=int)
    dropped = san.dropped if san else np.zeros(0, dtype=int)
    return {"defense": "default" if defended else "none", "adv_prob": outcome["adv_prob"][0],
            "success": outcome["success"], "clean_accuracy": accuracy(model, test),
            "poisons": int(is_poison.sum()), "screen_poisons": int(is_poison[screened].sum()),
            "screen_clean": int((~is_poison[screened]).sum()), "dropped": int(len(dropped)),
            "poisons_dropped": int(is_poison[dropped].sum()),
            # the labels of the clean images dropped: do the rounds take the target class's own examples?
            "dropped_clean_labels": sorted(int(poisoned.labels[i]) for i in dropped if not is_poison[i])}


def run_trial(seed: int, out: Path, done: set) -> None:
    settings = digits_demo_settings()
    train, test = load_digits_split(seed=0)
    surrogates = []
    for m in range(settings["ensemble"]):
        surrogate = digits_demo_model(seed + m, settings["width"])
        train_classifier(surrogate, train, TrainConfig(**settings["surrogate"], seed=seed + m), desc="surrogate")
        surrogates.append(surrogate.eval())
    target, adv = choose_target(surrogates[0], test, settings["target_choice"], seed=seed)
    for noise_lam in NOISE_LAMS:
        if all((seed, noise_lam, d) in done for d in ("none", "default")):
            continue
        attack = make_attack("adaptive", lam=0.0, noise_lam=noise_lam, **settings["attack"])
        t0 = time.perf_counter()
        poisons = attack.craft(train, surrogate=surrogates, test_set=test, target_index=target,
                               adversarial_class=adv, seed=seed)
        craft_seconds = time.perf_counter() - t0
        poisoned = poisons.apply(train)
        for defended in (False, True):
            if (seed, noise_lam, "default" if defended else "none") in done:
                continue
            row = victim(train, test, poisons, poisoned, settings, defended, seed + 100)
            row.update(seed=seed, noise_lam=noise_lam, target=target, target_class=int(test.labels[target]),
                       adversarial_class=adv,
                       noise_excess=poisons.params["noise_excess_poisons"], craft_seconds=craft_seconds,
                       date=time.strftime("%Y-%m-%d"))
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def summary(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| attack | defense | trials | success (95% CI) | target's P(adv), mean | poisons the screen dropped | "
             "clean dropped by the screen | clean acc. |", "|---|---|---|---|---|---|---|---|"]
    for lam in sorted({r["noise_lam"] for r in rows}):
        for defense in ("none", "default"):
            rs = [r for r in rows if r["noise_lam"] == lam and r["defense"] == defense]
            if not rs:
                continue
            name = "gradient matching" if lam == 0 else f"adaptive, noise_lam={lam:g}"
            screened = (format_rate(sum(r["screen_poisons"] for r in rs), sum(r["poisons"] for r in rs))
                        if defense == "default" else "—")
            lines.append(f"| {name} | {defense} | {len(rs)} | {format_rate(sum(r['success'] for r in rs), len(rs))} | "
                         f"{np.mean([r['adv_prob'] for r in rs]):.3f} | {screened} | "
                         f"{sum(r['screen_clean'] for r in rs) if defense == 'default' else '—'} | "
                         f"{100 * np.mean([r['clean_accuracy'] for r in rs]):.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1000-1004", help="A-B inclusive; 1000+ are tuning seeds")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summary", type=Path)
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return
    torch.set_num_threads(1)
    first, last = (int(s) for s in args.seeds.split("-"))
    out = args.out or Path("benchmarks/results") / f"adaptive_screen_{'tuning' if first >= 1000 else 'reported'}.jsonl"
    done = set()
    if out.exists():
        done = {(r["seed"], r["noise_lam"], r["defense"]) for r in map(json.loads, out.read_text().splitlines())}
    for seed in range(first, last + 1):
        run_trial(seed, out, done)
    print(summary(out))


if __name__ == "__main__":
    main()
