"""Secure dataset release on a CIFAR-10 subset: how much clean test accuracy does a victim lose when it
trains on the released (perturbed) images instead of the clean ones, and what does crafting cost?

Side by side: clean data, ``secure_release`` (Fowl et al. 2021, gradient alignment with a reverse
cross-entropy) and ``adversarial_poisons`` (class-targeted PGD towards (y + 1) mod C), all at
eps = 8/255, against a small CNN surrogate trained on the clean subset; every victim is a fresh CNN
trained with the same recipe (flip + crop augmentation) and tested on the full CIFAR-10 test set.

    .venv/bin/python benchmarks/secure_release.py --train-size 5000 --steps 10 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sanitizer.attacks import make_attack
from sanitizer.data import ImageTensorDataset, load_cifar10, subset_by_class
from sanitizer.models import CompactCNN
from sanitizer.progress import log
from sanitizer.train import TrainConfig, accuracy, train_classifier


def train_model(data: ImageTensorDataset, width: int, epochs: int, seed: int) -> tuple[CompactCNN, float]:
    torch.manual_seed(seed)
    model = CompactCNN(3, 10, width)
    t0 = time.perf_counter()
    train_classifier(model, data, TrainConfig(epochs=epochs, seed=seed, lr=0.05))
    return model.eval(), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="signed-Adam steps of secure_release")
    parser.add_argument("--ap-steps", type=int, default=10, help="PGD steps of adversarial_poisons")
    parser.add_argument("--victim-seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/out/secure_release.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    full = load_cifar10(args.data_root, train=True)
    test = load_cifar10(args.data_root, train=False)
    idx = torch.from_numpy(subset_by_class(full, args.train_size // 10, seed=0))
    train = ImageTensorDataset(full.images[idx], full.labels[idx], None, 10)
    log(f"train subset {len(train)}, test {len(test)}")

    surrogate, t_sur = train_model(train, args.width, args.epochs, seed=0)
    log(f"surrogate: {accuracy(surrogate, test):.4f} test accuracy, trained in {t_sur:.0f}s")

    released = {"clean": (train, 0.0, float("nan"), float("nan"))}
    for name, params in (("secure_release", dict(steps=args.steps)),
                         ("adversarial_poisons", dict(steps=args.ap_steps))):
        attack = make_attack(name, eps=8 / 255, **params)
        t0 = time.perf_counter()
        poisons = attack.craft(train, surrogate=surrogate, seed=0)
        seconds = time.perf_counter() - t0
        history = attack.loss_history
        log(f"{name}: crafted {len(poisons)} images in {seconds:.0f}s, objective {history[0]:.4f} -> {history[-1]:.4f}")
        released[name] = (poisons.apply(train), seconds, history[0], history[-1])

    rows = []
    for name, (data, seconds, loss0, loss1) in released.items():
        accs = []
        for s in range(1, args.victim_seeds + 1):
            victim, t_vic = train_model(data, args.width, args.epochs, seed=s)
            accs.append(accuracy(victim, test))
            log(f"victim on {name} (seed {s}): {accs[-1]:.4f} in {t_vic:.0f}s")
        rows.append({"data": name, "test_acc_mean": float(np.mean(accs)), "test_acc_std": float(np.std(accs)),
                     "test_accs": accs, "craft_seconds": seconds, "objective_start": loss0, "objective_end": loss1})

    clean = rows[0]["test_acc_mean"]
    print(f"{'released data':<22}{'victim test acc':>18}{'vs clean':>10}{'craft s':>10}{'s / 1k imgs':>13}")
    for r in rows:
        per_k = r["craft_seconds"] / len(train) * 1000
        print(f"{r['data']:<22}{r['test_acc_mean']:>11.4f} ± {r['test_acc_std']:.4f}"
              f"{r['test_acc_mean'] / clean:>10.2f}{r['craft_seconds']:>10.0f}{per_k:>13.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "surrogate_seconds": t_sur, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
