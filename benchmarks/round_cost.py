"""What one sanitizer round costs against an epoch of training (issue 11: ≤ 5 % at CIFAR-10 size).

Trains the ``cifar10-scratch-full`` victim (CompactCNN, the preset's recipe) on the clean CIFAR-10 training set
under the library-default sanitizer with a round at every epoch from epoch 1 (the input-noise screen runs once
at epoch 0 and is reported apart: it is a one-time cost, not a round), in harvest mode or with a separate pass,
and prints per epoch: the training time without the round, the round's embed and select seconds, their share of
the epoch, and where the label side read its features. Run it with nothing else on the cores (e.g. under
``benchmarks/quiet.sh``): the ratio is only meaningful when the epoch and the round see the same machine.

    python -m benchmarks.round_cost --data-root ../shared/data/cifar10 --epochs 4 --threads 1   # the library default
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmarks.presets import get_preset, load_data, take
from sanitizer import Sanitizer
from sanitizer.data import subset_by_class
from sanitizer.models import CompactCNN
from sanitizer.train import train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=("default", "harvest", "pass"), default="default",
                        help="default: the library's (harvest from 10,000 examples); harvest / pass: forced")
    parser.add_argument("--per-class", type=int, default=0, help="class-balanced subset (a quick check)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset("cifar10-scratch-full")
    train, _ = load_data(preset, args.data_root)
    if args.per_class:
        train = take(train, subset_by_class(train, args.per_class, seed=0))
    torch.manual_seed(1000)
    model = CompactCNN(train.images.shape[1], 10, preset.width)  # the preset's victim (ScratchSetting._model)
    harvest = {"default": None, "harvest": True, "pass": False}[args.mode]
    sanitizer = Sanitizer(model, train, warmup=1, every=1, harvest=harvest, verbose=False)
    config = dataclasses.replace(preset.train_config(1000), epochs=args.epochs)
    result = train_classifier(model, train, config, sanitizer)
    rounds = {r["epoch"]: r for r in sanitizer.history}
    print(f"mode {args.mode}, {len(train)} images, {args.threads} thread(s)\n")
    print("| epoch | training s (without the round) | round: embed s | select s | round / epoch | label side read |")
    print("|---|---|---|---|---|---|")
    for epoch, seconds in enumerate(result.epoch_seconds):
        r = rounds.get(epoch)
        spent = (r["seconds_embed"] + r["seconds_select"]) if r else 0.0
        training = seconds - spent
        if r is None:
            print(f"| {epoch} | {training:.1f} | – | – | – | – |")
            continue
        kind = "screen (once)" if r.get("kind") == "screen" else f"{spent / training:.1%}"
        side = r.get("label_side") or {}
        views = side.get("views", "–") + (f", sampled {side['sampled']}" if "sampled" in side else "")
        print(f"| {epoch} | {training:.1f} | {r['seconds_embed']:.2f} | {r['seconds_select']:.2f} | {kind} | {views} |")


if __name__ == "__main__":
    main()
