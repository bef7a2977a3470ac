"""The frozen feature extractor of the ``cifar10-transfer`` preset, trained once and cached.

The extractor is a :class:`~sanitizer.models.CompactCNN` trained on CIFAR-10 training images
that are disjoint from the 2,500-image fine-tuning subset the victims train their heads on.
It is cached as a state_dict (``torch.save``) and loaded with ``weights_only=True``.

Example::

    python -m benchmarks.extractor --data-root ../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.presets import weight_digest
from sanitizer.data import ImageTensorDataset, load_cifar10, subset_by_class
from sanitizer.models import CompactCNN
from sanitizer.progress import log
from sanitizer.train import TrainConfig, accuracy, train_classifier


@dataclass(frozen=True)
class ExtractorSpec:
    """How the extractor is built and trained; its fields name the cache file."""

    width: int = 16
    train_images: int = 20_000  # class-balanced, disjoint from the fine-tuning subset
    finetune_per_class: int = 250
    epochs: int = 12
    lr: float = 0.05
    batch_size: int = 128
    seed: int = 0

    def tag(self) -> str:
        return (f"cnn{self.width}_n{self.train_images}_ft{self.finetune_per_class}_e{self.epochs}"
                f"_lr{self.lr}_s{self.seed}")


def split_indices(train: ImageTensorDataset, spec: ExtractorSpec) -> tuple[np.ndarray, np.ndarray]:
    """(fine-tuning subset, extractor training images): disjoint, class-balanced, seeded."""
    finetune = subset_by_class(train, spec.finetune_per_class, seed=spec.seed)
    pretrain = subset_by_class(train, spec.train_images // train.num_classes, seed=spec.seed + 1,
                               exclude=finetune)
    assert not np.intersect1d(finetune, pretrain).size
    return finetune, pretrain


def load_or_train_extractor(data_root: str | Path, cache_dir: str | Path, spec: ExtractorSpec = ExtractorSpec(),
                            train: ImageTensorDataset | None = None, test: ImageTensorDataset | None = None,
                            ) -> tuple[CompactCNN, dict]:
    """The trained extractor (eval mode, frozen) and its metadata; trains and caches it on first use."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    weights, meta_path = cache / f"extractor_{spec.tag()}.pt", cache / f"extractor_{spec.tag()}.json"
    in_channels = train.images.shape[1] if train is not None else 3
    model = CompactCNN(in_channels, 10, spec.width)
    if weights.exists() and meta_path.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        meta = json.loads(meta_path.read_text())
    else:
        train = train if train is not None else load_cifar10(data_root, train=True)
        test = test if test is not None else load_cifar10(data_root, train=False)
        _, pretrain = split_indices(train, spec)
        data = ImageTensorDataset(train.images[pretrain], train.labels[pretrain], None, 10)
        config = TrainConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed,
                             milestones=(0.5, 0.75))
        log(f"[extractor] training {spec.tag()} on {len(data)} images, {torch.get_num_threads()} thread(s)")
        torch.manual_seed(spec.seed)
        model = CompactCNN(in_channels, 10, spec.width)
        t0 = time.perf_counter()
        train_classifier(model, data, config, desc="extractor")
        seconds = time.perf_counter() - t0
        acc = accuracy(model, test)
        meta = {"spec": spec.tag(), "test_accuracy": acc, "train_seconds": round(seconds, 1),
                "threads": torch.get_num_threads(), "train_images": len(data)}
        torch.save(model.state_dict(), weights)
        meta_path.write_text(json.dumps(meta, indent=2))
        log(f"[extractor] test accuracy {acc:.4f} after {seconds:.0f}s; cached at {weights}")
    meta["weights_sha256"] = weight_digest(model)  # tells a retrained extractor apart
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--cache-dir", default="benchmarks/out/cifar10")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the preset's extractor_seed (another split and init)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, meta = load_or_train_extractor(args.data_root, args.cache_dir, ExtractorSpec(seed=args.seed))
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
