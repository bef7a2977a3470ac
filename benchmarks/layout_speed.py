"""Channels-last against the ordinary memory layout on the CPU, side by side in one process.

Times the training steps (without augmentation: flip/crop already returns channels-last batches, so augmented
training ran channels-last all along) and the eval pass (the sanitizer's embedding pass) of a preset's model on real
CIFAR-10 images, alternating the two layouts over several repeats so that a busy machine slows both alike,
and prints the ratios (best of the repeats).

    python -m benchmarks.layout_speed --data-root ../shared/data/cifar10 --preset cifar10-scratch-full
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmarks.presets import get_preset
from sanitizer.data import ImageTensorDataset, load_cifar10
from sanitizer.embeddings import gradient_embeddings
from sanitizer.models import make_model
from sanitizer.purify import friendly_noise
from sanitizer.train import train_classifier


def timed_runs(preset, data: ImageTensorDataset, channels_last: bool) -> tuple[float, float, float]:
    """Seconds of one training epoch over ``data``, of the last-layer embedding pass over it, and of 5 friendly
    noise steps over its first 512 images."""
    torch.manual_seed(0)
    model = make_model(preset.model, 10, 3, preset.width)
    # without augmentation: flip_crop returns channels-last batches whatever the setting
    config = dataclasses.replace(preset.train_config(0), epochs=1, channels_last=channels_last, augment=False)
    train_seconds = train_classifier(model, data, config, desc=f"channels_last={channels_last}").seconds
    if channels_last:
        t0 = time.perf_counter()
        gradient_embeddings(model, data, embedding="last_layer", batch_size=256)
    else:  # the pass in the ordinary layout: the same model behind a wrapper that makes its input contiguous
        wrapped = torch.nn.Sequential(_Contiguous(), model)
        t0 = time.perf_counter()
        gradient_embeddings(wrapped, data, embedding="last_layer", batch_size=256)
    embed_seconds = time.perf_counter() - t0
    images = data.images[:512]
    net = model if channels_last else torch.nn.Sequential(_Contiguous(), model)
    t0 = time.perf_counter()
    friendly_noise(net, images, steps=5)  # the Friendly Noise baseline's purification, 5 of its 30 steps
    return train_seconds, embed_seconds, time.perf_counter() - t0


class _Contiguous(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10-scratch-full")
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    train = load_cifar10(args.data_root, train=True)
    data = ImageTensorDataset(train.images[:args.images], train.labels[:args.images], None, 10)
    best: dict[bool, list[float]] = {True: [float("inf")] * 3, False: [float("inf")] * 3}
    for _ in range(args.repeats):
        for layout in (False, True):
            best[layout] = [min(a, b) for a, b in zip(best[layout], timed_runs(preset, data, layout))]
    print(f"{args.images} images, {args.threads} thread(s), best of {args.repeats}, model {preset.model} "
          f"width {preset.width}")
    print("| | ordinary layout s | channels-last s | ratio |\n|---|---|---|---|")
    for i, what in enumerate(("training epoch", "embedding pass (last layer)", "friendly noise, 512 images × 5 steps")):
        print(f"| {what} | {best[False][i]:.2f} | {best[True][i]:.2f} | {best[False][i] / best[True][i]:.2f}× |")


if __name__ == "__main__":
    main()
