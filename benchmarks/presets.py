"""Benchmark presets: what the victim trains on, how, and against which surrogate the attack crafts.

A preset is a flat :class:`Preset` (every field can be changed from the command line with
``--set field=value``) plus a *setting* that prepares data and models once per run:

- :class:`TransferSetting`: a frozen feature extractor trained once on images disjoint from a
  fine-tuning subset; the victim trains a new linear head on the subset's cached features. Only
  the poisons' features are recomputed per trial.
- :class:`ScratchSetting`: the victim trains a whole network from scratch on the (poisoned)
  training subset; the attacker's surrogate is one clean network trained once per run on the
  same clean subset and reused across trials (the usual Witches' Brew protocol: a pretrained
  clean surrogate; only the target, the adversarial class and the poisons change per trial).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sanitizer.attacks import PoisonSet
from sanitizer.data import ImageTensorDataset, load_cifar10, load_digits_split, subset_by_class
from sanitizer.models import CompactCNN, make_model
from sanitizer.options import parse_key_values
from sanitizer.progress import log
from sanitizer.train import TrainConfig, accuracy, train_classifier

DEFAULT_SURROGATE_SEED = 77_777  # the scratch surrogate every cached poison set before surrogate_seed was crafted on


@dataclass
class Preset:
    """Every knob of a benchmark run. ``kind`` is ``transfer`` or ``scratch``; ``data`` is
    ``cifar10`` or ``digits`` (the latter for tests and quick checks)."""

    name: str
    kind: str = "transfer"
    data: str = "cifar10"
    per_class: int = 250               # transfer: fine-tuning subset; scratch: training subset (0 = all)
    # victim recipe
    model: str = "cnn"                 # scratch victims and surrogates: "cnn" or "resnet18"
    width: int = 32
    epochs: int = 40
    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 5e-4
    augment: bool = False
    milestones: tuple[float, ...] = (0.5, 0.75)
    schedule: str = "step"             # or "onecycle" (see sanitizer.train.TrainConfig)
    # sanitization schedule shared by every defense (one-shot baselines run at the first round only)
    warmup: int = 5
    every: int = 5
    stop_epoch: int | None = 30
    # threat
    budget: int = 25
    eps: float = 8 / 255
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per-defense options the harness applies unless the defense spec sets them (tuned on seeds 1000+)
    defense_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # transfer: the frozen extractor
    extractor_width: int = 16
    extractor_images: int = 20_000
    extractor_epochs: int = 12
    extractor_lr: float = 0.05
    # non-augmented image victims train channels-last (augmented batches always were); false reproduces such
    # rows recorded before 2026-12-01 (fourth session) bit for bit
    channels_last: bool = True
    extractor_seed: int = 0            # another seed trains another extractor on another class-balanced split
    feature_cache: bool = True         # False: victims run images through the frozen extractor (timing runs)
    # scratch: the clean surrogate
    surrogate_epochs: int = 20
    surrogate_seed: int = DEFAULT_SURROGATE_SEED  # another seed trains another surrogate (issue 10: >= 3 per table)
    device: str = "auto"

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           weight_decay=self.weight_decay, augment=self.augment,
                           milestones=tuple(self.milestones), seed=seed, schedule=self.schedule,
                           channels_last=self.channels_last)

    def surrogate_tag(self) -> str:
        """What names another surrogate in cache files (empty for the default one, so its caches keep their
        names): the scratch surrogate's seed, and so the poisons crafted on it."""
        default = self.kind != "scratch" or self.surrogate_seed == DEFAULT_SURROGATE_SEED
        return "" if default else f"_ss{self.surrogate_seed}"

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def with_overrides(self, assignments: list[str]) -> Preset:
        """A copy with ``field=value`` assignments applied (values parsed as JSON when they parse)."""
        names = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for key, value in parse_key_values(assignments, "--set", SystemExit).items():
            if key not in names:
                raise SystemExit(f"unknown preset field {key!r}; fields: {', '.join(names)}")
            changes[key] = tuple(value) if key == "milestones" else value
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Preset] = {
    # The main CPU source of statistics: linear head on a frozen CompactCNN, 2,500 images, 25 poisons.
    "cifar10-transfer": Preset(
        "cifar10-transfer",
        # tuned on seeds 1000-1011 (BP) and 1000-1007 (GM); the library defaults are listed beside it
        defense_options={"density": {"embedding": "features", "k": 100, "threshold": 2.0}},
        attack_options={"bullseye_polytope": {"iterations": 120, "lr": 0.04},
                        "feature_collision": {},
                        "gradient_matching": {"eps": 16 / 255, "steps": 80, "restarts": 1, "augment": False},
                        # the attacker who knows our tuned defense: dense in penultimate features, k = 100;
                        # lam chosen by the attacker on seeds 1000-1019 (best adv. prob. against density)
                        "adaptive": {"eps": 16 / 255, "steps": 80, "restarts": 1, "augment": False,
                                     "embedding": "features", "k": 100, "lam": 0.003}},
    ),
    # Gradient matching from scratch on CPU. The regime is being calibrated separately: change it with
    # --set (e.g. --set per_class=500 --set epochs=20 --set model=resnet18 --set width=16).
    "cifar10-scratch-cpu": Preset(
        "cifar10-scratch-cpu", kind="scratch", per_class=500, model="resnet18", width=16, epochs=20,
        lr=0.1, augment=True, milestones=(0.375, 0.625, 0.875), warmup=5, every=5, stop_epoch=None,
        budget=50, eps=16 / 255, surrogate_epochs=20,
        attack_options={"gradient_matching": {"steps": 100, "restarts": 1}},
    ),
    # Gradient matching from scratch on the *full* CIFAR-10 training set at CPU scale (issue: the
    # from-scratch detection benchmark): a 113k-parameter CompactCNN (width 20), flip + crop, SGD +
    # Nesterov, one-cycle lr, 10 epochs (about 75 % test accuracy, ~15 min on one core), 500 poisons
    # (1 %), eps 16/255 (run eps 8 with --set eps=0.03137). Rounds at epochs 2, 5, 8 (the library's
    # default schedule for 10 epochs: a fifth of training, then every fifth would be 2, 4, 6, 8; three
    # rounds keep the separate-pass overhead down). Audit runs (--record-signals) record every epoch.
    "cifar10-scratch-full": Preset(
        "cifar10-scratch-full", kind="scratch", per_class=0, model="cnn", width=20, epochs=10, lr=0.1,
        batch_size=128, augment=True, schedule="onecycle", warmup=2, every=3, stop_epoch=None, budget=500,
        eps=16 / 255, surrogate_epochs=10,
        attack_options={"gradient_matching": {"steps": 120, "restarts": 1, "batch_size": 250},
                        # the attacker who knows the library default: from scratch its drops are the input-noise
                        # screen's (the rounds drop almost nothing), so the poisons keep their noise floor at
                        # their base image's (noise_lam = 10 evaded the screen fully on digits) and no density term
                        "adaptive": {"steps": 120, "restarts": 1, "batch_size": 250, "lam": 0.0, "noise_lam": 10.0}},
    ),
    # EPIC's 40-epoch ResNet-18 recipe (SGD + Nesterov, lr 0.1, wd 5e-4, step decays, flip + crop),
    # their ε = 16 schedule (K = 1, T = 5), 500 poisons (1%), the full training set.
    "cifar10-paper": Preset(
        "cifar10-paper", kind="scratch", per_class=0, model="resnet18", width=64, epochs=40, lr=0.1,
        augment=True, milestones=(0.375, 0.625, 0.875), warmup=1, every=5, stop_epoch=None, budget=500,
        eps=16 / 255, surrogate_epochs=40,
        attack_options={"gradient_matching": {"steps": 250, "restarts": 8}},
    ),
    # Many from-scratch trials inside a short GPU lease: half-width ResNet-18 on 20k images, 20 epochs,
    # 200 poisons (1%), a cheaper crafting schedule. Not measured yet (no GPU in the session that built it).
    "cifar10-gpu-fast": Preset(
        "cifar10-gpu-fast", kind="scratch", per_class=2000, model="resnet18", width=32, epochs=20, lr=0.1,
        batch_size=256, augment=True, milestones=(0.375, 0.625, 0.875), warmup=2, every=4, stop_epoch=None,
        budget=200, eps=16 / 255, surrogate_epochs=20,
        attack_options={"gradient_matching": {"steps": 120, "restarts": 2}},
    ),
    # Gradient matching from scratch on digits, the `sanitizer demo` regime (minutes per trial on a CPU):
    # a cheap from-scratch setting to compare embeddings (run with --diagnostics).
    "digits-scratch-gm": Preset(
        "digits-scratch-gm", kind="scratch", data="digits", per_class=0, model="cnn", width=32, epochs=20,
        lr=0.05, batch_size=64, warmup=5, every=5, stop_epoch=15, budget=80, eps=32 / 255, surrogate_epochs=20,
        attack_options={"gradient_matching": {"steps": 100, "restarts": 1, "shift": 2, "flip": False}},
    ),
    # Seconds-long presets on scikit-learn digits, for tests and smoke runs.
    "digits-transfer-tiny": Preset(
        "digits-transfer-tiny", data="digits", per_class=30, epochs=6, lr=0.1, warmup=2, every=2,
        stop_epoch=4, budget=6, extractor_width=8, extractor_images=600, extractor_epochs=10,
        attack_options={"label_flip": {"mode": "towards"}},
    ),
    "digits-scratch-tiny": Preset(
        "digits-scratch-tiny", kind="scratch", data="digits", per_class=0, model="cnn", width=4, epochs=4,
        lr=0.05, batch_size=64, warmup=2, every=1, stop_epoch=None, budget=8, surrogate_epochs=1,
        attack_options={"label_flip": {"mode": "towards"}},
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def load_data(preset: Preset, data_root: str | Path) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    if preset.data == "cifar10":
        return load_cifar10(data_root, train=True), load_cifar10(data_root, train=False)
    if preset.data == "digits":
        return load_digits_split()
    raise SystemExit(f"unknown data {preset.data!r}: choose cifar10 or digits")


def take(dataset: ImageTensorDataset, indices: np.ndarray) -> ImageTensorDataset:
    idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    return ImageTensorDataset(dataset.images[idx], dataset.labels[idx], None, dataset.num_classes)


class LinearHead(nn.Module):
    """The transfer victim: a linear classifier on cached features shaped ``[N, D, 1, 1]``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class ExtractorHead(nn.Module):
    """The uncached transfer victim: a frozen extractor (always in eval mode) and a new linear head."""

    def __init__(self, extractor: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.extractor = extractor
        self.linear = nn.Linear(dim, num_classes)

    def train(self, mode: bool = True) -> ExtractorHead:
        super().train(mode)
        self.extractor.eval()
        return self

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.extractor.penultimate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.penultimate(x))


@torch.no_grad()
def extract(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate features ``[N, D, 1, 1]`` of ``images`` (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model.penultimate(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)[:, :, None, None]


@dataclass
class VictimData:
    """What one poisoned trial trains and is evaluated on, in the victim's input space."""

    train: ImageTensorDataset
    is_poison: np.ndarray
    target_input: torch.Tensor      # [1, ...] the target in the victim's input space
    test: ImageTensorDataset
    # the poisoned training images when the victim trains on something else (cached features): what the
    # input-noise screen reads (Sanitizer(screen_dataset=...)), as a user with a frozen backbone would pass
    images: ImageTensorDataset | None = None


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------

class Setting:
    """Prepared once per run; hands out the attack's inputs and the victims' data and models."""

    preset: Preset
    craft_set: ImageTensorDataset      # the training set the attack poisons (indices refer to it)
    test_set: ImageTensorDataset       # the targets come from here
    surrogate: nn.Module
    info: dict[str, Any]

    def surrogate_for(self, attack: str) -> nn.Module:
        return self.surrogate

    def victim_data(self, poisons: PoisonSet, target_index: int) -> VictimData:
        raise NotImplementedError

    def new_victim(self, seed: int) -> nn.Module:
        raise NotImplementedError


class TransferSetting(Setting):
    """Frozen extractor + new linear head trained on a fine-tuning subset of cached features."""

    def __init__(self, preset: Preset, data_root: str | Path, cache_dir: str | Path) -> None:
        from benchmarks.extractor import ExtractorSpec, load_or_train_extractor, split_indices

        self.preset = preset
        train, test = load_data(preset, data_root)
        spec = ExtractorSpec(width=preset.extractor_width, train_images=preset.extractor_images,
                             finetune_per_class=preset.per_class, epochs=preset.extractor_epochs,
                             lr=preset.extractor_lr, seed=preset.extractor_seed)
        if preset.data != "cifar10":
            spec = dataclasses.replace(spec, batch_size=64)
        finetune, _ = split_indices(train, spec)
        self.extractor, meta = load_or_train_extractor(data_root, Path(cache_dir) / preset.data, spec, train, test)
        self.craft_set = take(train, finetune)
        self.test_set = test
        cache = Path(cache_dir) / preset.data / f"features_{spec.tag()}.pt"
        if cache.exists():
            feats = torch.load(cache, map_location="cpu", weights_only=True)
        else:
            feats = {"train": extract(self.extractor, self.craft_set.images),
                     "test": extract(self.extractor, test.images)}
            torch.save(feats, cache)
        self.train_features = ImageTensorDataset(feats["train"], self.craft_set.labels, None, train.num_classes)
        self.test_features = ImageTensorDataset(feats["test"], test.labels, None, test.num_classes)
        self.dim = feats["train"].shape[1]
        self.surrogate = self.extractor
        self._head_surrogate: nn.Module | None = None
        self.info = {"extractor": meta, "finetune_images": len(finetune), "feature_dim": self.dim,
                     "extractor_test_accuracy": meta["test_accuracy"]}

    def surrogate_for(self, attack: str) -> nn.Module:
        """Feature attacks use the extractor; gradient matching matches the head's gradient of a full
        network (frozen extractor + a clean head trained with the victim recipe)."""
        if attack not in ("gradient_matching", "adaptive"):
            return self.extractor
        if self._head_surrogate is None:
            head = self.new_victim(seed=99_999)
            train_classifier(head, self.train_features, self.preset.train_config(99_999), desc="clean head")
            net = copy.deepcopy(self.extractor)
            net.classifier.load_state_dict(head.linear.state_dict())
            for p in net.parameters():
                p.requires_grad_(False)
            for p in net.classifier.parameters():
                p.requires_grad_(True)
            self._head_surrogate = net.eval()
        return self._head_surrogate

    def victim_data(self, poisons: PoisonSet, target_index: int) -> VictimData:
        if not self.preset.feature_cache:
            view = poisons.apply(self.craft_set)
            train = ImageTensorDataset(view.images, view.labels, None, self.craft_set.num_classes)
            return VictimData(train, view.is_poison.numpy(), self.test_set.images[target_index][None], self.test_set)
        feats = self.train_features.images.clone()
        labels = self.train_features.labels.clone()
        idx = torch.from_numpy(poisons.indices)
        feats[idx] = extract(self.extractor, torch.from_numpy(poisons.images))  # only the poisons change
        labels[idx] = torch.from_numpy(poisons.labels)
        is_poison = np.zeros(len(labels), dtype=bool)
        is_poison[poisons.indices] = True
        target = self.test_features.images[target_index][None]
        view = poisons.apply(self.craft_set)
        images = ImageTensorDataset(view.images, view.labels, None, self.craft_set.num_classes)
        return VictimData(ImageTensorDataset(feats, labels, None, self.craft_set.num_classes), is_poison, target,
                          self.test_features, images)

    def new_victim(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        head = LinearHead(self.dim, self.craft_set.num_classes)
        if self.preset.feature_cache:
            return head
        victim = ExtractorHead(copy.deepcopy(self.extractor), self.dim, self.craft_set.num_classes)
        victim.linear.load_state_dict(head.linear.state_dict())  # the same initial head as the cached victim
        return victim


class ScratchSetting(Setting):
    """The victim trains a whole network from scratch on the poisoned training subset."""

    def __init__(self, preset: Preset, data_root: str | Path, cache_dir: str | Path) -> None:
        self.preset = preset
        train, test = load_data(preset, data_root)
        if preset.per_class:
            train = take(train, subset_by_class(train, preset.per_class, seed=0))
        self.craft_set, self.test_set = train, test
        self.device = preset.resolved_device()
        self.in_channels = train.images.shape[1]
        tag = (f"{preset.name}_{preset.model}{preset.width}_pc{preset.per_class}_e{preset.surrogate_epochs}"
               f"_lr{preset.lr}" + ("" if preset.schedule == "step" else f"_{preset.schedule}")
               + preset.surrogate_tag())
        path = Path(cache_dir) / preset.data / f"surrogate_{tag}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.surrogate = self._model(seed=preset.surrogate_seed)
        if path.exists():
            self.surrogate.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        else:
            cfg = dataclasses.replace(preset.train_config(preset.surrogate_seed), epochs=preset.surrogate_epochs)
            log(f"[surrogate] training {tag} on {len(train)} images")
            train_classifier(self.surrogate, train, cfg, desc="surrogate")
            torch.save(self.surrogate.state_dict(), path)
        acc = accuracy(self.surrogate, test)
        digest = weight_digest(self.surrogate)
        log(f"[surrogate] {tag}: test accuracy {acc:.4f}, weights sha256 {digest[:16]}")
        self.surrogate.eval()
        self.info = {"train_images": len(train), "surrogate_test_accuracy": acc, "surrogate_sha256": digest,
                     "surrogate_path": str(path)}

    def _model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        p = self.preset
        model = CompactCNN(self.in_channels, 10, p.width) if p.model == "cnn" else make_model(
            p.model, 10, self.in_channels, p.width)
        return model.to(self.device)

    def victim_data(self, poisons: PoisonSet, target_index: int) -> VictimData:
        view = poisons.apply(self.craft_set)
        train = ImageTensorDataset(view.images, view.labels, None, self.craft_set.num_classes)
        return VictimData(train, view.is_poison.numpy(), self.test_set.images[target_index][None], self.test_set)

    def new_victim(self, seed: int) -> nn.Module:
        return self._model(seed)


def weight_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes and bytes), to tell retrained surrogates apart."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def make_setting(preset: Preset, data_root: str | Path, cache_dir: str | Path) -> Setting:
    if preset.kind == "transfer":
        return TransferSetting(preset, data_root, cache_dir)
    if preset.kind == "scratch":
        return ScratchSetting(preset, data_root, cache_dir)
    raise SystemExit(f"unknown preset kind {preset.kind!r}: choose transfer or scratch")
