"""Quick sanity check of bullseye polytope (and feature collision) in the transfer setting.

A small CNN feature extractor is trained on CIFAR-10 images disjoint from a 2,500-image fine-tuning
subset (``benchmarks.extractor``); in each setup a random test image is the target and a random other
class the adversarial class; 25 poisons (1 %) are crafted from that class's fine-tuning images at
eps = 8/255; the victim trains a fresh linear head on the frozen features of the poisoned subset.
Success = the head labels the target with the adversarial class. The full-scale numbers come from
``benchmarks/poisoning.py``; this script only checks that the attacks work there.

    .venv/bin/python -m benchmarks.bullseye_sanity --setups 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.extractor import ExtractorSpec, load_or_train_extractor, split_indices
from sanitizer.attacks import make_attack
from sanitizer.data import ImageTensorDataset, load_cifar10
from sanitizer.progress import log
from sanitizer.stats import wilson_interval as wilson


@torch.no_grad()
def features(extractor, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([extractor.penultimate(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.enable_grad()
def train_head(feats: torch.Tensor, labels: torch.Tensor, seed: int, steps: int = 300) -> torch.nn.Linear:
    """A fresh linear head on frozen features (full-batch Adam with weight decay)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(feats.shape[1], 10)
    opt = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=5e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(feats), labels).backward()
        opt.step()
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--cache-dir", default="benchmarks/out")
    parser.add_argument("--extractor-images", type=int, default=5000)
    parser.add_argument("--extractor-epochs", type=int, default=8)
    parser.add_argument("--setups", type=int, default=5)
    parser.add_argument("--budget", type=int, default=25)
    parser.add_argument("--bp-iterations", type=int, default=800)
    parser.add_argument("--base-selection", choices=("random", "closest"), default="random")
    parser.add_argument("--fc-iterations", type=int, default=0, help="0 skips feature collision")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/out/bullseye_sanity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train = load_cifar10(args.data_root, train=True)
    test = load_cifar10(args.data_root, train=False)
    spec = ExtractorSpec(train_images=args.extractor_images, epochs=args.extractor_epochs)
    extractor, meta = load_or_train_extractor(args.data_root, args.cache_dir, spec, train, test)
    log(f"extractor {meta['spec']}: test accuracy {meta['test_accuracy']:.4f}")
    finetune_idx, _ = split_indices(train, spec)
    finetune = ImageTensorDataset(train.images[finetune_idx], train.labels[finetune_idx], None, 10)
    clean_feats = features(extractor, finetune.images)

    attacks = {"bullseye_polytope": dict(budget=args.budget, iterations=args.bp_iterations, eps=8 / 255,
                                      base_selection=args.base_selection)}
    if args.fc_iterations:
        attacks["feature_collision"] = dict(budget=args.budget, iterations=args.fc_iterations, eps=8 / 255,
                                          base_selection=args.base_selection)
    rows = []
    for setup in range(args.setups):
        rng = np.random.default_rng([setup, 404])
        target_index = int(rng.integers(len(test)))
        true = int(test.labels[target_index])
        adv = int(rng.choice([c for c in range(10) if c != true]))
        t_feat = features(extractor, test.images[target_index][None])
        with torch.no_grad():
            clean_prob = float(torch.softmax(train_head(clean_feats, finetune.labels, setup)(t_feat), 1)[0, adv])
        for name, params in attacks.items():
            attack = make_attack(name, **params)
            t0 = time.perf_counter()
            poisons = attack.craft(finetune, surrogate=extractor, test_set=test, target_index=target_index,
                                   adversarial_class=adv, seed=setup)
            seconds = time.perf_counter() - t0
            view = poisons.apply(finetune)
            head = train_head(features(extractor, view.images), view.labels, setup)
            with torch.no_grad():
                prob = torch.softmax(head(t_feat), 1)[0]
            row = {"attack": name, "setup": setup, "target_index": target_index, "true": true, "adv": adv,
                   "success": int(prob.argmax()) == adv, "adv_prob": float(prob[adv]), "clean_adv_prob": clean_prob,
                   "loss_start": attack.loss_history[0], "loss_end": attack.loss_history[-1],
                   "craft_seconds": seconds}
            rows.append(row)
            log(json.dumps(row))

    print(f"{'attack':<20}{'success':>10}{'95% Wilson':>18}{'P(adv) poisoned':>17}{'P(adv) clean':>14}"
          f"{'loss start->end':>19}{'craft s':>9}")
    for name in attacks:
        r = [x for x in rows if x["attack"] == name]
        k = sum(x["success"] for x in r)
        lo, hi = wilson(k, len(r))
        print(f"{name:<20}{k:>6}/{len(r):<3}{lo:>9.2f}-{hi:.2f}{np.mean([x['adv_prob'] for x in r]):>17.3f}"
              f"{np.mean([x['clean_adv_prob'] for x in r]):>14.3f}"
              f"{np.mean([x['loss_start'] for x in r]):>10.3f}->{np.mean([x['loss_end'] for x in r]):.3f}"
              f"{np.mean([x['craft_seconds'] for x in r]):>9.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "extractor": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
