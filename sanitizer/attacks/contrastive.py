"""Poisoning and backdooring contrastive (CLIP-style) image–caption data (Carlini & Terzis, ICLR 2022).

Two generators, both returning :class:`CaptionPoisons` (the pairs that replace pairs of the dataset):

* ``patch_backdoor``: stamp a patch on a tiny fraction of the images and pair each with a caption
  naming the target class; after contrastive training, patched images embed near that class's text.
* ``targeted_captions``: pair copies (lightly augmented) of one target image with captions of the
  adversarial class, so that zero-shot classification labels that image with the adversarial class.
  Captions come from the dataset itself (those that name the class, as in the paper), or from
  templates when the dataset has none.

Budgets are a count or a fraction of the pairs (0.0001 = 0.01 %), at least one pair.

Example:
    >>> images, captions = torch.rand(50, 3, 16, 16), [f"a photo of a {c}" for c in ["cat", "dog"] * 25]
    >>> poisons = patch_backdoor(images, captions, ["cat", "dog"], target_class=1, budget=2, patch_size=3)
    >>> len(poisons), poisons.captions[0].count("dog")
    (2, 1)
    >>> new_images, new_captions = poisons.apply(images, captions)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sanitizer.attacks._util import resolve_single_target
from sanitizer.attacks.base import Attack, ThreatModel, register_attack, resolve_budget
from sanitizer.attacks.triggers import LOCATIONS, make_trigger, stamp_trigger
from sanitizer.data.tensors import ImageTensorDataset

FORMAT_VERSION = 1
TEMPLATES = (
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.",
    "a good photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.", "a cropped photo of a {}.",
)


@dataclass
class CaptionPoisons:
    """Poisoned image–caption pairs: ``images[k]`` with ``captions[k]`` replace pair ``indices[k]``.

    ``kind`` is ``patch_backdoor`` or ``targeted_captions``; ``target_class`` names the class the
    captions point to; ``trigger`` is the patch (backdoor) and ``target_image`` the attacked image
    (targeted poisoning). Saved as ``.npz`` without pickle (captions as a unicode array).
    """

    kind: str
    indices: np.ndarray
    images: np.ndarray
    captions: list[str]
    target_class: str
    trigger: np.ndarray | None = None
    target_image: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        self.images = np.asarray(self.images, dtype=np.float32)
        self.captions = [str(c) for c in self.captions]
        if not len(self.indices) == len(self.images) == len(self.captions):
            raise ValueError(f"{len(self.indices)} indices, {len(self.images)} images and {len(self.captions)} "
                             "captions: one of each per poisoned pair")

    def __len__(self) -> int:
        return len(self.indices)

    def apply(self, images: torch.Tensor, captions: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """The poisoned dataset: copies of ``images`` and ``captions`` with the poisoned pairs in place."""
        _check_pairs(images, captions)
        if len(self.indices) and int(self.indices.max()) >= len(captions):
            raise IndexError(f"poison index {int(self.indices.max())} is outside a dataset of {len(captions)} pairs")
        out = images.clone()
        out[torch.from_numpy(self.indices)] = torch.from_numpy(self.images).to(out.dtype)
        new_captions = list(captions)
        for i, caption in zip(self.indices.tolist(), self.captions):
            new_captions[i] = caption
        return out, new_captions

    def save(self, path: str | Path) -> None:
        arrays = {"format_version": np.array(FORMAT_VERSION), "kind": np.array(self.kind),
                  "indices": self.indices, "images": self.images,
                  "captions": np.array(self.captions, dtype=np.str_).reshape(-1),
                  "target_class": np.array(self.target_class),
                  "params": np.array(json.dumps(self.params, sort_keys=True))}
        if self.trigger is not None:
            arrays["trigger"] = np.asarray(self.trigger, dtype=np.float32)
        if self.target_image is not None:
            arrays["target_image"] = np.asarray(self.target_image, dtype=np.float32)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> CaptionPoisons:
        with np.load(path, allow_pickle=False) as f:
            if int(f["format_version"]) != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported CaptionPoisons format {int(f['format_version'])}")
            return cls(kind=str(f["kind"]), indices=f["indices"], images=f["images"],
                       captions=[str(c) for c in f["captions"]], target_class=str(f["target_class"]),
                       trigger=f["trigger"] if "trigger" in f.files else None,
                       target_image=f["target_image"] if "target_image" in f.files else None,
                       params=json.loads(str(f["params"])))


def _check_pairs(images: torch.Tensor, captions: Sequence[str]) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a tensor [N, C, H, W] in [0, 1]")
    if isinstance(captions, str) or len(captions) != len(images):
        raise ValueError(f"need one caption per image: {len(images)} images, "
                         f"{1 if isinstance(captions, str) else len(captions)} captions")


def _class_name(target_class: int | str, class_names: Sequence[str]) -> str:
    if isinstance(target_class, str):
        if target_class not in class_names:
            raise ValueError(f"target class {target_class!r} is not among the class names {list(class_names)}")
        return target_class
    if not 0 <= int(target_class) < len(class_names):
        raise ValueError(f"target_class={target_class} is not a class index; choose one in [0, {len(class_names)})")
    return class_names[int(target_class)]


def _names(caption: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name.lower())}s?\b", caption.lower()) is not None


def class_captions(captions: Sequence[str], name: str, exclude: Sequence[int] = ()) -> list[int]:
    """Indices of captions that name the class (word match, plural allowed)."""
    skip = set(int(i) for i in exclude)
    return [i for i, c in enumerate(captions) if i not in skip and _names(c, name)]


def _caption_pool(captions: Sequence[str], name: str, count: int, rng: np.random.Generator,
                  exclude: Sequence[int]) -> tuple[list[str], str]:
    found = class_captions(captions, name, exclude)
    if found:
        return [captions[i] for i in rng.choice(found, count, replace=len(found) < count)], "dataset"
    return [TEMPLATES[i].format(name) for i in rng.integers(0, len(TEMPLATES), count)], "templates"


def patch_backdoor(images: torch.Tensor, captions: Sequence[str], class_names: Sequence[str],
                   target_class: int | str, budget: int | float = 0.0001, patch_size: int = 16,
                   trigger: torch.Tensor | None = None, trigger_kind: str = "checkerboard",
                   location: str = "random", seed: int = 0) -> CaptionPoisons:
    """Patch backdoor: ``budget`` random pairs get the patch and a caption naming ``target_class``.

    The paper pastes a 16x16 checkerboard at a random position of 224x224 images and captions the
    poisoned images with captions of the target class found in the dataset (templates otherwise).
    """
    _check_pairs(images, captions)
    if location not in LOCATIONS:
        raise ValueError(f"unknown trigger location {location!r}; choose one of {', '.join(LOCATIONS)}")
    name = _class_name(target_class, class_names)
    count = resolve_budget(budget, len(captions))
    if count > len(captions):
        raise ValueError(f"a budget of {count} pairs exceeds the {len(captions)} pairs of the dataset")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(captions), count, replace=False))
    if trigger is None:
        trigger = make_trigger(patch_size, images.shape[1], trigger_kind, seed)
    poisoned = stamp_trigger(images[torch.from_numpy(indices)], trigger, location, margin=0,
                             generator=torch.Generator().manual_seed(seed))
    new_captions, source = _caption_pool(captions, name, count, rng, exclude=indices)
    return CaptionPoisons("patch_backdoor", indices, poisoned.numpy(), new_captions, name,
                          trigger=torch.as_tensor(trigger).numpy(),
                          params={"budget": budget, "count": count, "patch_size": int(trigger.shape[-1]),
                                  "trigger_kind": trigger_kind, "location": location, "seed": seed,
                                  "caption_source": source})


def _augment(image: torch.Tensor, count: int, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """``count`` copies of ``image``: the first unchanged, the others flipped and shifted (edge padding)."""
    from torch.nn import functional as F

    c, h, w = image.shape
    copies = image.expand(count, c, h, w).clone()
    if count == 1 or max_shift == 0:
        return copies
    padded = F.pad(image[None], (max_shift,) * 4, mode="replicate")[0]
    for k in range(1, count):
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
        crop = padded[:, dy:dy + h, dx:dx + w]
        copies[k] = crop.flip(2) if torch.rand(1, generator=generator).item() < 0.5 else crop
    return copies


def targeted_captions(images: torch.Tensor, captions: Sequence[str], class_names: Sequence[str],
                      target_image: torch.Tensor, adversarial_class: int | str, budget: int | float = 0.0001,
                      augment: bool = True, max_shift: int | None = None, seed: int = 0) -> CaptionPoisons:
    """Targeted poisoning: ``budget`` pairs become (copy of ``target_image``, caption of the adversarial class).

    ``target_image`` is ``[C, H, W]`` in [0, 1] (for example a test image the attacker wants mislabelled).
    """
    _check_pairs(images, captions)
    target_image = torch.as_tensor(target_image, dtype=torch.float32)
    if target_image.shape != images.shape[1:]:
        raise ValueError(f"target_image has shape {tuple(target_image.shape)}, the dataset's images "
                         f"{tuple(images.shape[1:])}")
    if target_image.min() < 0 or target_image.max() > 1:
        raise ValueError("target_image must lie in [0, 1]")
    name = _class_name(adversarial_class, class_names)
    count = resolve_budget(budget, len(captions))
    if count > len(captions):
        raise ValueError(f"a budget of {count} pairs exceeds the {len(captions)} pairs of the dataset")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(captions), count, replace=False))
    shift = max_shift if max_shift is not None else max(1, images.shape[-1] // 16)
    copies = _augment(target_image, count, torch.Generator().manual_seed(seed), shift if augment else 0)
    new_captions, source = _caption_pool(captions, name, count, rng, exclude=indices)
    return CaptionPoisons("targeted_captions", indices, copies.numpy(), new_captions, name,
                          target_image=target_image.numpy(),
                          params={"budget": budget, "count": count, "augment": augment, "max_shift": shift,
                                  "seed": seed, "caption_source": source})


MODES = ("patch_backdoor", "targeted_captions")


@register_attack("contrastive")
class ContrastivePoisoning(Attack):
    """Registry entry for the two contrastive generators. Unlike the other attacks, ``craft`` needs
    ``captions=`` and ``class_names=`` and returns :class:`CaptionPoisons` (pairs, not a PoisonSet).

    ``adversarial_class`` is the class the captions name (the backdoor's target class, or the class
    the target image should be labelled with); the targeted mode takes its image from
    ``test_set[target_index]`` (drawn with the seed when missing).

    Example:
        >>> attack = ContrastivePoisoning(mode="patch_backdoor", budget=0.0001, patch_size=16)
        >>> pairs = attack.craft(images, captions=captions, class_names=names, adversarial_class=3)  # doctest: +SKIP
    """

    needs_surrogate = False
    threat_model = ThreatModel("backdoor", clean_label=False, setting="from-scratch",
                               summary="CLIP-style patch backdoor (default) or targeted caption poisoning "
                                       "(mode='targeted_captions'), Carlini & Terzis 2022")

    def __init__(self, mode: str = "patch_backdoor", budget: int | float = 0.0001, patch_size: int = 16,
                 trigger_kind: str = "checkerboard", location: str = "random", augment: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown contrastive mode {mode!r}; choose one of {', '.join(MODES)}")
        resolve_budget(budget, 1)
        make_trigger(patch_size, 1, trigger_kind)
        self.mode, self.budget, self.patch_size = mode, budget, int(patch_size)
        self.trigger_kind, self.location, self.augment = trigger_kind, location, bool(augment)

    def craft(self, train_set: ImageTensorDataset | torch.Tensor, *, surrogate=None, test_set=None,
              target_index=None, adversarial_class: int | str | None = None, source_class=None, seed: int = 0,
              captions: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
              **kw) -> CaptionPoisons:
        images = train_set.images if isinstance(train_set, ImageTensorDataset) else train_set
        if captions is None or class_names is None:
            raise ValueError("contrastive poisoning needs captions=[one per image] and class_names=[...]")
        if self.mode == "patch_backdoor":
            if adversarial_class is None:
                adversarial_class = int(np.random.default_rng([seed, 29]).integers(len(class_names)))
            return patch_backdoor(images, captions, class_names, adversarial_class, self.budget,
                                  self.patch_size, None, self.trigger_kind, self.location, seed)
        if isinstance(adversarial_class, str):
            adversarial_class = _class_name(adversarial_class, class_names)
            adv_index = list(class_names).index(adversarial_class)
        else:
            adv_index = adversarial_class
        target, _, index, adv = resolve_single_target(test_set, target_index, adv_index, seed, self.name)
        poisons = targeted_captions(images, captions, class_names, target, adv, self.budget, self.augment,
                                    seed=seed)
        poisons.params["target_index"] = index
        return poisons
