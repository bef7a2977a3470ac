"""Small helpers shared by the bundled attacks: argument checks, target lookup, base selection."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.embeddings import EvalMode as eval_mode  # noqa: F401  (the attacks' name for it)
from sanitizer.embeddings import model_device as module_device  # noqa: F401
from sanitizer.errors import SanitizerError, check_positive_int  # noqa: F401  (one check for the whole package)
from sanitizer.options import parse_key_values  # noqa: F401  (the one KEY=VALUE grammar)


def require(value, name: str, attack: str, hint: str = ""):
    """Return ``value``, or raise a clear error when the attack needs it and it was not given."""
    if value is None:
        raise ValueError(f"{attack} needs {name}=...{(' (' + hint + ')') if hint else ''}")
    return value


def check_class(value: int, num_classes: int, name: str) -> int:
    if not 0 <= int(value) < num_classes:
        raise ValueError(f"{name}={value} is not a class of this dataset; choose one in [0, {num_classes})")
    return int(value)


def class_or_draw(value: int | None, num_classes: int, seed: int, name: str, exclude: int | None = None) -> int:
    """``value`` checked to be a class, or (when None) a class drawn with ``seed`` other than ``exclude``."""
    if value is None:
        choices = [c for c in range(num_classes) if c != exclude]
        return int(np.random.default_rng([seed, 29]).choice(choices))
    return check_class(value, num_classes, name)


def resolve_single_target(test_set: ImageTensorDataset | None, target_index: int | None,
                          adversarial_class: int | None, seed: int, attack: str) -> tuple[torch.Tensor, int, int, int]:
    """``(target image [C, H, W], its true label, its index, adversarial class)``.

    Follows the common calling convention: a missing ``target_index`` is drawn from ``test_set`` with
    ``seed``, a missing ``adversarial_class`` among the classes other than the target's.
    """
    require(test_set, "test_set", attack, "the dataset the target image comes from")
    rng = np.random.default_rng([seed, 17])
    index = int(rng.integers(len(test_set))) if target_index is None else int(target_index)
    if not 0 <= index < len(test_set):
        raise IndexError(f"target_index={target_index} is outside test_set (it has {len(test_set)} images; "
                         f"use an index in [0, {len(test_set)}))")
    label = int(test_set.labels[index])
    if adversarial_class is None:
        adversarial_class = int(rng.choice([c for c in range(test_set.num_classes) if c != label]))
    adv = check_class(adversarial_class, test_set.num_classes, "adversarial_class")
    if adv == label:
        raise ValueError(f"the target (test index {index}) already belongs to adversarial_class={adv}; "
                         "choose another class or another target")
    return test_set.images[index].clone(), label, index, adv


def class_pool(train_set: ImageTensorDataset, cls: int | None, exclude: int | None = None) -> np.ndarray:
    """Indices of ``train_set`` with label ``cls`` (every label when ``cls`` is None), minus ``exclude``."""
    labels = train_set.labels.numpy()
    mask = np.ones(len(labels), dtype=bool) if cls is None else labels == cls
    if exclude is not None:
        mask &= labels != exclude
    return np.flatnonzero(mask)


def as_models(surrogate, attack: str) -> list[nn.Module]:
    """A surrogate given as one model or a list/tuple (an ensemble), checked to be non-empty."""
    require(surrogate, "surrogate", attack, "a trained model (or a list of models) to craft against")
    models = list(surrogate) if isinstance(surrogate, (list, tuple)) else [surrogate]
    if not models:
        raise ValueError(f"{attack}: the surrogate ensemble is empty")
    return models


def feature_fn(model, attack: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feature extractor φ of a surrogate: ``model.penultimate`` or the callable itself."""
    if hasattr(model, "penultimate"):
        return model.penultimate
    if callable(model) and not isinstance(model, nn.Module):
        return model
    if isinstance(model, nn.Module):
        raise ValueError(f"{attack}: the surrogate {type(model).__name__} has no .penultimate(x); pass "
                         "feature_extractor=callable mapping images to features")
    raise TypeError(f"{attack}: expected a model or a callable feature extractor, got {type(model).__name__}")


def has_dropout(model) -> bool:
    return isinstance(model, nn.Module) and any(
        isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def freeze(models: Sequence) -> list[list[bool]]:
    """Turn off requires_grad on the models' parameters (crafting differentiates the images only)."""
    saved = []
    for m in models:
        if isinstance(m, nn.Module):
            saved.append([p.requires_grad for p in m.parameters()])
            for p in m.parameters():
                p.requires_grad_(False)
        else:
            saved.append([])
    return saved


def unfreeze(models: Sequence, saved: list[list[bool]]) -> None:
    for m, flags in zip(models, saved):
        if isinstance(m, nn.Module):
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)
