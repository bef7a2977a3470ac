"""Calibrate gradient matching (Witches' Brew) from scratch: craft, train a fresh victim, count successes.

Each trial draws a target (test image) and an adversarial class from its seed, trains a surrogate
on the clean training set, crafts poisons against it, then trains a victim from scratch (a fresh
seed) on the poisoned set and, for the probability shift, the same victim recipe on the clean
set. Success = the poisoned victim predicts the adversarial class for the target. One JSON line
per trial goes to ``--out``; a summary with a Wilson 95% interval is printed at the end.

Examples::

    python -m benchmarks.calibrate_gradient_matching --regime digits --trials 10 --seed0 1000
    python -m benchmarks.calibrate_gradient_matching --regime cifar10 --per-class 500 --model resnet18 \\
        --width 16 --trials 1 --surrogate-epochs 20 --victim-epochs 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sanitizer.attacks import make_attack
from sanitizer.attacks.gradient_matching import choose_target, digits_demo_settings, target_outcome
from sanitizer.data import ImageTensorDataset, load_cifar10, load_digits_split, subset_by_class
from sanitizer.models import make_model
from sanitizer.stats import wilson_interval as wilson
from sanitizer.train import TrainConfig, accuracy, predict_proba, train_classifier


def load(args) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    if args.regime == "digits":
        return load_digits_split()
    train = load_cifar10(args.data_root, train=True)
    test = load_cifar10(args.data_root, train=False)
    idx = torch.from_numpy(subset_by_class(train, args.per_class, seed=args.subset_seed))
    return ImageTensorDataset(train.images[idx], train.labels[idx], None, 10), test


def new_model(args, in_channels: int, seed: int):
    torch.manual_seed(seed)
    return make_model(args.model, 10, in_channels, args.width)


def config(args, epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=args.lr, batch_size=args.batch_size, seed=seed,
                       augment=not args.no_train_augment, crop_padding=args.crop_padding)


def trial(args, train, test, seed: int) -> dict:
    t0 = time.perf_counter()
    c = train.images.shape[1]
    surrogates = []
    for m in range(args.ensemble):
        s = new_model(args, c, 10_000 + 97 * seed + m)
        train_classifier(s, train, config(args, args.surrogate_epochs, 10_000 + 97 * seed + m), desc="surrogate")
        surrogates.append(s.eval())
    t_sur = time.perf_counter() - t0
    attack = make_attack("gradient_matching", eps=args.eps / 255, budget=args.budget, steps=args.steps,
                         restarts=args.restarts, augment=not args.no_craft_augment, shift=args.shift,
                         flip=args.flip, lr=args.craft_lr)
    target, adv = choose_target(surrogates[0], test, args.target_choice, seed)
    t1 = time.perf_counter()
    poisons = attack.craft(train, surrogate=surrogates if len(surrogates) > 1 else surrogates[0],
                           test_set=test, target_index=target, adversarial_class=adv, seed=seed)
    t_craft = time.perf_counter() - t1
    t2 = time.perf_counter()
    victim = new_model(args, c, 20_000 + seed)
    train_classifier(victim, poisons.apply(train), config(args, args.victim_epochs, 20_000 + seed), desc="victim")
    t_victim = time.perf_counter() - t2
    outcome = target_outcome(victim, poisons)
    # The surrogate is a clean model too (another seed): its P(adv) is a free clean reference.
    surrogate_adv = float(predict_proba(surrogates[0], test.images[[target]])[0, poisons.adversarial_class])
    row = {"seed": seed, "target": target, "surrogate_adv_prob": surrogate_adv, "true": int(test.labels[target]),
           "adv": poisons.adversarial_class,
           "poisons": len(poisons), "success": outcome["success"], "victim_adv_prob": outcome["adv_prob"][0],
           "victim_pred": outcome["predicted"][0], "victim_acc": accuracy(victim, test),
           "craft_loss": min(poisons.params["restart_losses"]), "loss_start": poisons.params["loss_history"][0],
           "surrogate_s": t_sur, "craft_s": t_craft, "victim_s": t_victim}
    if args.clean_baseline:
        clean = new_model(args, c, 20_000 + seed)
        train_classifier(clean, train, config(args, args.victim_epochs, 20_000 + seed), desc="clean victim")
        row["clean_adv_prob"] = float(predict_proba(clean, test.images[[target]])[0, poisons.adversarial_class])
    return row


def main(argv: list[str] | None = None) -> int:
    demo = digits_demo_settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--data-root", default="../shared/data/cifar10")
    p.add_argument("--per-class", type=int, default=500, help="CIFAR-10 training images per class")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--model", default="cnn", choices=("cnn", "resnet18"))
    p.add_argument("--width", type=int, default=demo["width"])
    p.add_argument("--surrogate-epochs", type=int, default=demo["surrogate"]["epochs"])
    p.add_argument("--victim-epochs", type=int, default=demo["victim"]["epochs"])
    p.add_argument("--lr", type=float, default=demo["victim"]["lr"])
    p.add_argument("--batch-size", type=int, default=demo["victim"]["batch_size"])
    p.add_argument("--crop-padding", type=int, default=demo["victim"]["crop_padding"])
    p.add_argument("--no-train-augment", action="store_true")
    p.add_argument("--eps", type=float, default=demo["attack"]["eps"] * 255, help="in 1/255 units")
    p.add_argument("--budget", type=float, default=demo["attack"]["budget"])
    p.add_argument("--steps", type=int, default=demo["attack"]["steps"])
    p.add_argument("--restarts", type=int, default=demo["attack"]["restarts"])
    p.add_argument("--craft-lr", type=float, default=0.1)
    p.add_argument("--shift", type=int, default=demo["attack"]["shift"])
    p.add_argument("--flip", action="store_true", default=demo["attack"]["flip"])
    p.add_argument("--no-craft-augment", action="store_true")
    p.add_argument("--ensemble", type=int, default=demo["ensemble"])
    p.add_argument("--target-choice", choices=("random", "uncertain"), default=demo["target_choice"])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--clean-baseline", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/out/gm_calibration.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.budget >= 1:
        args.budget = int(args.budget)
    train, test = load(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in range(args.trials):
        row = trial(args, train, test, args.seed0 + t)
        row["settings"] = {k: v for k, v in vars(args).items() if k not in ("out",)}
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "settings"}), flush=True)
    wins = sum(r["success"] for r in rows)
    lo, hi = wilson(wins, len(rows))
    mean_prob = sum(r["victim_adv_prob"] for r in rows) / len(rows)
    line = (f"success {wins}/{len(rows)} = {wins / len(rows):.2f} (Wilson 95% [{lo:.2f}, {hi:.2f}]); "
            f"mean victim P(adv) {mean_prob:.3f}")
    if args.clean_baseline:
        line += f" vs clean {sum(r['clean_adv_prob'] for r in rows) / len(rows):.3f}"
    line += f"; mean craft {sum(r['craft_s'] for r in rows) / len(rows):.1f}s"
    line += f", victim {sum(r['victim_s'] for r in rows) / len(rows):.1f}s"
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
