"""Measured robustness: the bundled attacks against the user's own model and recipe, on a proxy run.

For each attack and run: craft poisons against a (class-balanced) proxy subset of the training set,
train one model undefended and one under the sanitizer with the same seed and recipe, and measure
attack success and clean accuracy on the test set. The *clean* arm is the model trained on the
unpoisoned proxy with the run's seed (one per run, shared by the attacks): its "success" is the floor
the attack is measured against (a clean model also misclassifies some test images, and calls a few
patched images the target class), so an attack with no measurable effect is not reported as one the
sanitizer failed to stop. Success depends on the attack's goal:

- ``targeted``: the target image is classified as the adversarial class (one trial per target);
- ``backdoor``: a patched test image of another class is classified as the target class (one trial
  per patched image, pooled over runs);
- ``indiscriminate``: a clean test image is misclassified (one trial per image, pooled over runs).

Every rate comes with its trial count and a Wilson 95% interval. Pooling images over runs treats
them as independent trials, which understates the run-to-run spread; ``runs`` is reported beside it.
This is a measurement on a proxy, not a proof.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sanitizer.attacks import available_attacks, make_attack
from sanitizer.data.tensors import ImageTensorDataset, subset_by_class
from sanitizer.progress import log
from sanitizer.stats import wilson_interval
from sanitizer.train import TrainConfig, predict_proba, train_classifier

ARMS = ("undefended", "sanitized", "clean")
LABEL = "proxy run: measured attack success on a subset with the same model and recipe; not a proof"


def rate(successes: int, trials: int) -> dict[str, Any]:
    interval = wilson_interval(successes, trials)
    return {"successes": int(successes), "trials": int(trials),
            "rate": successes / trials if trials else None,
            "wilson95": list(interval) if interval else None}


def attack_success(poisons, model: nn.Module, test_set: ImageTensorDataset, goal: str,
                   seed: int = 0) -> tuple[int, int]:
    """``(successes, trials)`` of one poisoned set against one trained model (see the module docstring)."""
    if goal == "targeted" or poisons.target_images is not None:
        if poisons.target_images is None:
            raise ValueError(f"the {poisons.attack!r} poison set records no target images")
        pred = predict_proba(model, torch.as_tensor(poisons.target_images)).argmax(1)
        return int((pred == poisons.adversarial_class).sum()), int(len(pred))
    if goal == "backdoor":
        from sanitizer.attacks.triggers import evaluate_backdoor

        result = evaluate_backdoor(poisons, model, test_set, seed=seed)
        return result.successes, result.trials
    pred = predict_proba(model, test_set.images).argmax(1)
    return int((pred != test_set.labels).sum()), int(len(pred))


class _Surrogate:
    """A clean model trained on the proxy, built only when an attack asks for one."""

    def __init__(self, factory: Callable[[], nn.Module], proxy: ImageTensorDataset, config: TrainConfig) -> None:
        self.factory, self.proxy, self.config, self.model = factory, proxy, config, None

    def get(self) -> nn.Module:
        if self.model is None:
            torch.manual_seed(self.config.seed + 7)
            self.model = self.factory()
            train_classifier(self.model, self.proxy, self.config, desc="surrogate")
            self.model.eval()
        return self.model


def _craft(name: str, params: dict, craft: dict, proxy, test_set, seed: int, goal: str, surrogate: _Surrogate):
    attack = make_attack(name, **params)
    kwargs = {"test_set": test_set, "seed": seed, **craft}
    if goal == "backdoor" and "adversarial_class" not in kwargs:
        kwargs["adversarial_class"] = int(np.random.default_rng([seed, 3]).integers(proxy.num_classes))
    try:
        return attack.craft(proxy, **kwargs)
    except ValueError as exc:
        if "surrogate" not in str(exc) or "surrogate" in kwargs:
            raise
    return attack.craft(proxy, surrogate=surrogate.get(), **kwargs)


def measure_robustness(
    model_factory: Callable[[], nn.Module],
    train_set: ImageTensorDataset,
    test_set: ImageTensorDataset,
    config: TrainConfig,
    attacks: Sequence[str | tuple[str, dict[str, Any], dict[str, Any]]] = ("label_flip", "badnets"),
    runs: int = 2,
    proxy_per_class: int | None = None,
    sanitizer_options: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The certificate's ``robustness`` section.

    ``attacks`` are names or ``(name, attack_params, craft_kwargs)``; ``proxy_per_class`` limits
    the proxy training set to that many examples per class (None: the whole training set);
    ``sanitizer_options`` configure the :class:`~sanitizer.Sanitizer` of the defended arm (the same
    options as the user's run).

    Example:
        >>> section = measure_robustness(lambda: CompactCNN(1, 10, 8), train, test,
        ...                              TrainConfig(epochs=6), attacks=["badnets"], runs=2)  # doctest: +SKIP
    """
    from sanitizer.core import Sanitizer

    registered = available_attacks()
    specs = [(a, {}, {}) if isinstance(a, str) else (a[0], dict(a[1]), dict(a[2])) for a in attacks]
    unknown = [name for name, _, _ in specs if name not in registered]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; available: {', '.join(registered)}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    warmup = (sanitizer_options or {}).get("warmup", 10)
    if config.epochs <= warmup:
        raise ValueError(f"the proxy runs train {config.epochs} epochs but the sanitizer's first round is at epoch "
                         f"{warmup}: the sanitized arm would never sanitize; train longer or lower warmup")
    if proxy_per_class is not None:
        idx = torch.from_numpy(subset_by_class(train_set, proxy_per_class, seed))
        proxy = ImageTensorDataset(train_set.images[idx], train_set.labels[idx], None, train_set.num_classes)
    else:
        proxy = train_set.without_transform()
    surrogate = _Surrogate(model_factory, proxy, config)
    clean_models: dict[int, nn.Module] = {}

    def clean_model(run_config: TrainConfig) -> nn.Module:
        if run_config.seed not in clean_models:
            torch.manual_seed(run_config.seed)
            model = model_factory()
            train_classifier(model, proxy, run_config, desc=f"clean {run_config.seed}")
            clean_models[run_config.seed] = model.eval()
        return clean_models[run_config.seed]

    results = []
    for name, params, craft in specs:
        goal = registered[name].goal
        tallies = {arm: [0, 0, 0, 0] for arm in ARMS}  # success, trials, correct, tested
        caught = [0, 0]
        for run in range(runs):
            run_seed = seed * 1000 + run
            poisons = _craft(name, params, craft, proxy, test_set, run_seed, goal, surrogate)
            poisoned = poisons.apply(proxy)
            run_config = TrainConfig(**{**config.to_dict(), "seed": config.seed + run})
            for arm in tallies:
                sanitizer = None
                if arm == "clean":
                    model = clean_model(run_config)
                else:
                    torch.manual_seed(run_config.seed)
                    model = model_factory()
                    if arm == "sanitized":
                        sanitizer = Sanitizer(model, poisoned, num_classes=proxy.num_classes, seed=run_config.seed,
                                              **(sanitizer_options or {}))
                    train_classifier(model, poisoned, run_config, sanitizer=sanitizer, desc=f"{name} {arm} {run}")
                hits, trials = attack_success(poisons, model, test_set, goal, seed=run_seed)
                correct = int((predict_proba(model, test_set.images).argmax(1) == test_set.labels).sum())
                t = tallies[arm]
                t[0], t[1], t[2], t[3] = t[0] + hits, t[1] + trials, t[2] + correct, t[3] + len(test_set)
                if sanitizer is not None:
                    caught[0] += int(np.isin(poisons.indices, sanitizer.dropped).sum())
                    caught[1] += len(poisons)
            log(f"[robustness] {name} run {run}: " + ", ".join(
                f"{arm} {t[0]}/{t[1]}" for arm, t in tallies.items()))
        results.append({
            "attack": name, "goal": goal, "params": params, "runs": runs,
            "measure": {"targeted": "target classified as the adversarial class",
                        "backdoor": "patched test image of another class classified as the target class",
                        }.get(goal, "clean test image misclassified"),
            **{arm: {"attack_success": rate(t[0], t[1]), "clean_accuracy": rate(t[2], t[3])}
               for arm, t in tallies.items()},
            "poisons_dropped": rate(caught[0], caught[1]),
        })
    return {
        "label": LABEL,
        "proxy": {"train_size": len(proxy), "of": len(train_set), "per_class": proxy_per_class,
                  "test_size": len(test_set), "train_config": config.to_dict(), "runs": runs, "seed": seed,
                  "sanitizer_options": sanitizer_options or {}},
        "attacks": results,
    }
