"""The poisoning benchmark: every defense trains on the same poisoned sets, seeds and recipe.

Per trial (seed = ``--seed-start`` + trial): draw a target test image and an adversarial class,
craft the poisons once (cached under ``--cache-dir``), then train one victim per defense. All
defenses train identically until the first sanitization round, so that prefix is trained once
per trial and every defense branches from a deep copy of the model, optimizer and scheduler.
Each victim appends one JSON line to ``--out`` as soon as it finishes; a rerun skips the
(trial, defense) pairs already there. The summary table and plots come from
``benchmarks.report``.

Example::

    python -m benchmarks.poisoning --preset cifar10-transfer --data-root ../shared/data/cifar10 \\
        --attack bullseye_polytope --trials 100 \\
        --defenses none,density,epic-0.1,epic-0.2,deep_knn,spectral,activation_clustering,random \\
        --out benchmarks/results/transfer_bp.jsonl

Defenses: a policy name (``none``, ``density``, ``epic-0.1``, ``deep_knn``, ...) optionally with
options, ``density:k=50:threshold=2.5``; ``clean`` is a reference victim trained without the poisons.
``random`` drops, at each round, as many examples as the
first ``density`` defense of the same trial dropped at that round. The one-shot baselines
(``deep_knn``, ``spectral``, ``activation_clustering``) run once, at the first round epoch, on
the same model as ours; ``density`` and ``epic`` run every round of the preset's schedule.
``retrain:OPTIONS`` detects with one ``density`` round at its ``warmup`` and trains a fresh victim
from scratch without what it dropped; ``jpeg`` and ``friendly_noise`` purify the data;
``density:action=unlearn`` also unlearns what each round drops.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import os
import platform
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.presets import PRESETS, Preset, Setting, VictimData, get_preset, make_setting
from sanitizer.attacks import PoisonSet, make_attack
from sanitizer.attacks.base import _ATTACKS
from sanitizer.config import FIELDS as CONFIG_FIELDS
from sanitizer.config import RUN_SPECIFIC
from sanitizer.core import Sanitizer
from sanitizer.noise_screen import gradient_rounds
from sanitizer.options import parse_policy_spec
from sanitizer.policies import Policy, make_policy
from sanitizer.policies.simple import RandomPolicy
from sanitizer.progress import log, progress
from sanitizer.train import EpochCheckpoint, continue_training, make_optimizer, predict_proba

ONE_SHOT = ("deep_knn", "spectral", "activation_clustering")
PURIFIERS = ("jpeg", "friendly_noise")
SCHEDULE_KEYS = ("warmup", "every", "stop_epoch")
# options of the Sanitizer (sanitizer.config), not of the policy: density:action=unlearn:harvest=true; the
# harness sets the run-specific ones (seed, classes, epochs) itself; unlearn_lr / unlearn_passes are short-hands
SANITIZER_KEYS = tuple(key for key in CONFIG_FIELDS if key not in ("policy", "policy_options", *SCHEDULE_KEYS,
                                                                   *RUN_SPECIFIC)) + ("unlearn_lr", "unlearn_passes")
NEVER = 10**9


# ------------------------------------------------------------------------------------------------
# Defenses
# ------------------------------------------------------------------------------------------------

def parse_defense(spec: str, preset: Preset | None = None) -> tuple[str, dict[str, Any]]:
    """``"density:k=50:threshold=2.5"`` → ``("density", {"k": 50, "threshold": 2.5})`` (the package's one
    spec grammar, :func:`sanitizer.options.parse_policy_spec`), on top of the preset's ``defense_options``
    for that name when a preset is given."""
    name, given = parse_policy_spec(spec, SystemExit)
    options = dict(preset.defense_options.get(name, {})) if preset is not None else {}
    return name, {**options, **given}


def build_policy(spec: str, preset: Preset, matched_counts: list[int] | None) -> tuple[Policy, dict]:
    """The policy object for a defense spec, with the preset's defaults for the baselines.

    The option ``embedding=`` (e.g. ``density:embedding=logits``) goes to the Sanitizer, not the policy.
    """
    name, options = parse_defense(spec, preset)
    for key in SCHEDULE_KEYS + SANITIZER_KEYS:  # schedule overrides go to the Sanitizer (see schedule_for)
        options.pop(key, None)
    if name == "random":
        if matched_counts is None:
            raise SystemExit("the random control drops as many as density in the same trial: "
                             "list a density defense before random")
        return RandomPolicy(counts=matched_counts), {"matched_counts": matched_counts}
    if name == "deep_knn":
        options.setdefault("budget", preset.budget)          # k = 2 × budget
    if name == "spectral":
        options.setdefault("budget", preset.budget)          # drop 1.5 × budget per class
    return make_policy(name, **options), options


def sanitizer_options(spec: str, preset: Preset) -> dict[str, Any]:
    """The Sanitizer keywords a defense spec sets (embedding, action and the unlearning options)."""
    options = parse_defense(spec, preset)[1]
    out: dict[str, Any] = {key: options[key] for key in SANITIZER_KEYS if key in options and key in CONFIG_FIELDS}
    unlearn = {key: options[f"unlearn_{key}"] for key in ("lr", "passes") if f"unlearn_{key}" in options}
    if "passes" in unlearn:
        unlearn["max_passes"] = unlearn.pop("passes")
    if unlearn:
        out["unlearn_options"] = {**out.get("unlearn_options", {}), **unlearn}
    return out


def screens(spec: str) -> bool:
    """Whether the defense runs the input-noise screen (``density`` does unless ``screen=false``):
    its victim trains from epoch 0 instead of branching from the shared prefix."""
    name, options = parse_defense(spec)
    return name == "density" and bool(options.get("screen", True))


def file_safe(spec: str) -> str:
    """A defense spec as part of a file name (``friendly_noise:steps=30`` -> ``friendly-noise-steps=30``)."""
    return re.sub(r"[^A-Za-z0-9.=]+", "-", spec)


def schedule_for(spec: str, preset: Preset) -> dict[str, Any]:
    """The defense's round schedule: the preset's, unless the spec overrides it (``density:warmup=3``:
    the victim still branches from the shared prefix at the preset's warmup; its first round comes later)."""
    name, options = parse_defense(spec)
    if name == "none":
        return {"warmup": NEVER, "every": 1, "stop_epoch": None}
    base = ({"warmup": preset.warmup, "every": 1, "stop_epoch": preset.warmup} if name in ONE_SHOT else
            {"warmup": preset.warmup, "every": preset.every, "stop_epoch": preset.stop_epoch})
    overrides = {k: options[k] for k in SCHEDULE_KEYS if k in options}
    if overrides.get("warmup", preset.warmup) < preset.warmup:
        raise SystemExit(f"{spec}: warmup must be >= the preset's warmup {preset.warmup} (the shared prefix)")
    return {**base, **overrides}


def purified_victim(spec: str, setting: Setting, data: VictimData, config, seed: int, prefix, prefix_end: int,
                    on_epoch_end=None, checkpoint: Path | None = None,
                    epochs_checkpoint: EpochCheckpoint | None = None) -> dict:
    """A victim trained on purified data: ``jpeg`` (every training image JPEG-compressed once, trained
    from scratch, as PureGen re-ran it) or ``friendly_noise`` (after the shared prefix, the
    branched model computes friendly noise once; every later batch gets it plus fresh ±8/255
    Bernoulli noise, Liu et al. 2022). Options: ``jpeg:quality=25``; ``friendly_noise:steps=30:eps=16``
    (eps in /255). ``checkpoint``: where friendly noise saves its finished batches and resumes from (an
    hour or more of a killed run is not lost); ``epochs_checkpoint``: the training's, after each epoch.
    Returns the row's defense fields and the trained ``model``."""
    from sanitizer.data import ImageTensorDataset
    from sanitizer.purify import bernoulli_noise, friendly_noise, jpeg_compress

    name, options = parse_defense(spec)
    t0 = time.perf_counter()
    if name == "jpeg":
        quality = int(options.get("quality", 75))
        train = ImageTensorDataset(jpeg_compress(data.train.images, quality), data.train.labels, None,
                                   data.train.num_classes)
        model = setting.new_victim(seed)
        optimizer, scheduler = make_optimizer(model, config)
        start, transform, uses_prefix = 0, None, False
        options = {"quality": quality}
    else:
        eps = float(options.get("eps", 16)) / 255
        steps = int(options.get("steps", 30))
        model, optimizer, scheduler = branch(*prefix, config)
        noise = friendly_noise(model, data.train.images, eps=eps, steps=steps, seed=seed, checkpoint=checkpoint)
        train = ImageTensorDataset(data.train.images + noise, data.train.labels, None, data.train.num_classes)
        random_eps = float(options.get("random_eps", 8)) / 255
        start, uses_prefix = prefix_end, True
        transform = lambda x, gen: bernoulli_noise(x, random_eps, gen)  # noqa: E731
        options = {"eps": eps * 255, "steps": steps, "random_eps": random_eps * 255}
    saved = epochs_checkpoint.extra if epochs_checkpoint is not None else {}
    saved.setdefault("purify_seconds", time.perf_counter() - t0)  # a resumed run reads the first run's
    keeper = Sanitizer(model, train, policy="none", warmup=NEVER, seed=seed)
    result = continue_training(model, train, config, optimizer, scheduler, keeper, start, config.epochs, desc=spec,
                               batch_transform=transform, on_epoch_end=on_epoch_end, checkpoint=epochs_checkpoint)
    purify_seconds = saved["purify_seconds"]
    return {"defense": spec, "policy_options": options, "schedule": {}, "embedding": None, "model": model,
            **detection(keeper, data.is_poison), "seconds": purify_seconds + result.seconds,
            "seconds_purify": purify_seconds, "uses_prefix": uses_prefix}


# ------------------------------------------------------------------------------------------------
# One trial
# ------------------------------------------------------------------------------------------------

def draw_trial(setting: Setting, seed: int) -> tuple[int, int]:
    """(target test index, adversarial class) drawn from the trial seed."""
    rng = np.random.default_rng(seed)
    target_index = int(rng.integers(len(setting.test_set)))
    true = int(setting.test_set.labels[target_index])
    classes = [c for c in range(setting.test_set.num_classes) if c != true]
    return target_index, int(rng.choice(classes))


def attack_params(attack: str, preset: Preset) -> dict[str, Any]:
    """Constructor arguments: the preset's budget and eps where the attack takes them, plus its options."""
    if attack not in _ATTACKS:
        raise SystemExit(f"unknown attack {attack!r}; available: {', '.join(sorted(_ATTACKS))}")
    accepted = inspect.signature(_ATTACKS[attack].__init__).parameters
    params = {k: v for k, v in {"budget": preset.budget, "eps": preset.eps}.items() if k in accepted}
    params.update(preset.attack_options.get(attack, {}))
    return params


def craft(setting: Setting, attack: str, seed: int, target_index: int, adversarial_class: int,
          cache_dir: Path) -> tuple[PoisonSet, float]:
    """The trial's poisons, crafted once and cached as ``.npz`` (no pickle) for resumed runs."""
    params = attack_params(attack, setting.preset)
    key = json.dumps(params, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    tag = (f"{setting.preset.name}_{attack}_s{seed}_t{target_index}_a{adversarial_class}_{digest}"
           + setting.preset.surrogate_tag())  # poisons crafted on another surrogate are other poisons
    path = cache_dir / "poisons" / f"{tag}.npz"
    if path.exists():
        poisons = PoisonSet.load(path)
        return poisons, float(poisons.params.get("harness_craft_seconds", 0.0))
    t0 = time.perf_counter()
    poisons = make_attack(attack, **params).craft(
        setting.craft_set, surrogate=setting.surrogate_for(attack), test_set=setting.test_set,
        target_index=target_index, adversarial_class=adversarial_class, seed=seed)
    seconds = time.perf_counter() - t0
    poisons.params["harness_craft_seconds"] = seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.partial{os.getpid()}.npz")  # atomic: a reader never sees half a file
    poisons.save(partial)
    os.replace(partial, path)
    return poisons, seconds


def branch(model, optimizer, scheduler, config):
    """Independent copies of a model and its optimizer and scheduler state."""
    model2 = copy.deepcopy(model)
    opt2, sched2 = make_optimizer(model2, config)
    opt2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    sched2.load_state_dict(copy.deepcopy(scheduler.state_dict()))
    return model2, opt2, sched2


def target_tracer(data: VictimData, adversarial_class: int, trace: dict[int, float]):
    """An ``on_epoch_end`` hook writing the target's adversarial probability after each epoch into
    ``trace``: the final value is what the attack gets, the trajectory shows how noisy it is."""
    def hook(epoch: int, model) -> None:
        trace[int(epoch)] = float(predict_proba(model, data.target_input)[0, adversarial_class])
    return hook


def chain(*hooks):
    """One ``on_epoch_end`` hook calling every given (non-None) hook in order."""
    live = [h for h in hooks if h is not None]

    def hook(epoch: int, model) -> None:
        for h in live:
            h(epoch, model)
    return hook


def evaluate(model, data: VictimData, adversarial_class: int) -> dict[str, Any]:
    target_probs = predict_proba(model, data.target_input)[0]
    test_probs = predict_proba(model, data.test.images)
    return {"target_hit": bool(int(target_probs.argmax()) == adversarial_class),
            "target_adv_prob": float(target_probs[adversarial_class]),
            "target_pred": int(target_probs.argmax()),
            "clean_accuracy": float((test_probs.argmax(1) == data.test.labels).float().mean())}


def detection(sanitizer: Sanitizer, is_poison: np.ndarray) -> dict[str, Any]:
    dropped = sanitizer.dropped
    hits = int(is_poison[dropped].sum())
    n_poison = int(is_poison.sum())
    return {"dropped": int(len(dropped)), "poisons_dropped": hits,
            "recall": hits / n_poison if n_poison else None,
            "precision": hits / len(dropped) if len(dropped) else None,
            "clean_dropped": int(len(dropped) - hits),
            "dropped_per_round": [len(r["dropped_now"]) for r in gradient_rounds(sanitizer.history)],
            "round_epochs": [r["epoch"] for r in gradient_rounds(sanitizer.history)],
            "screen": screen_outcome(sanitizer, is_poison),
            "seconds_sanitizer": float(sum(r["seconds_embed"] + r["seconds_select"] for r in sanitizer.history)),
            "diagnostics": [r["extras"] for r in sanitizer.history if "extras" in r] or None,
            "unlearn": [r["unlearn"] for r in sanitizer.history if "unlearn" in r] or None}


def screen_outcome(sanitizer: Sanitizer, is_poison: np.ndarray) -> dict[str, Any] | None:
    """What the input-noise screen dropped (None when it did not run), and how well its z-score
    separates the poisons from the clean examples of their class (AUROC)."""
    record = next((r for r in sanitizer.history if r.get("kind") == "screen"), None)
    if record is None:
        return None
    dropped = np.asarray(record["dropped_now"], dtype=int)
    hits = int(is_poison[dropped].sum())
    out = {"dropped": int(len(dropped)), "poisons_dropped": hits, "clean_dropped": int(len(dropped) - hits),
           "seconds": record["seconds_embed"]}
    z = sanitizer.screen_scores
    if z is not None and is_poison.any():
        classes = np.unique(sanitizer.labels[is_poison])
        clean_same = ~is_poison & np.isin(sanitizer.labels, classes)
        out["auroc_in_class"] = auroc(z[is_poison], z[clean_same])
    return out


def matched_counts(row: dict[str, Any]) -> list[int]:
    """What the random control drops per round to match a density row: the screen's drops go into
    its first round."""
    counts = list(row["dropped_per_round"]) or [0]
    counts[0] += (row.get("screen") or {}).get("dropped", 0)
    return counts


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counted half."""
    if not len(positive) or not len(negative):
        return None
    neg = np.sort(negative)
    below = np.searchsorted(neg, positive, "left")
    equal = np.searchsorted(neg, positive, "right") - below
    return float((below + 0.5 * equal).sum() / (len(positive) * len(negative)))


def score_diagnostics(is_poison: np.ndarray, adversarial_class: int):
    """A round hook recording how the policy's scores separate the poisons (for tuning runs)."""
    def separation(scores: np.ndarray, poison: np.ndarray, in_adv: np.ndarray) -> dict[str, Any]:
        return {"auroc_all": auroc(scores[poison], scores[~poison]),
                "auroc_in_class": auroc(scores[poison & in_adv], scores[~poison & in_adv]),
                "poison_score_median": float(np.median(scores[poison])) if poison.any() else None,
                "clean_score_p95": float(np.percentile(scores[~poison], 95))}

    def hook(sanitizer, epoch, candidates, emb, selection):
        poison = is_poison[candidates]
        in_adv = sanitizer.labels[candidates] == adversarial_class
        out = separation(selection.scores, poison, in_adv)
        if sanitizer.harvester is not None:  # harvest mode: the same round scored on a separate pass, paired
            t0 = time.perf_counter()
            labels = sanitizer.labels[candidates]
            passed = sanitizer.policy.select(sanitizer._embed_rows(candidates), labels,
                                             num_classes=sanitizer.num_classes, seed=sanitizer._round_seed(epoch))
            both = (~passed.keep & ~selection.keep).sum()
            either = (~passed.keep | ~selection.keep).sum()
            out["separate_pass"] = {**separation(passed.scores, poison, in_adv),
                                    "would_drop": int((~passed.keep).sum()),
                                    "drop_jaccard": float(both / either) if either else None,
                                    "seconds": time.perf_counter() - t0}
        return out
    return hook


def signal_recorder(setting: Setting, attack: str, seed: int, target_index: int, adv: int, data: VictimData,
                    cache_dir: Path):
    """The recorder of the undefended victim's per-epoch signals (``--record-signals``)."""
    from benchmarks.signals import SignalRecorder

    preset = setting.preset
    tag = f"{preset.name}_{attack}_eps{round(preset.eps * 255)}_s{seed}{preset.surrogate_tag()}"
    true = int(setting.test_set.labels[target_index])
    labels = data.train.labels.numpy()
    focus = np.flatnonzero((labels == adv) | (labels == true))
    meta = {"preset": asdict(preset), "attack": attack, "seed": seed, "target_index": target_index,
            "target_class": true, "adversarial_class": adv, "poison_indices": np.flatnonzero(data.is_poison).tolist()}
    recorder = SignalRecorder(cache_dir / "signals" / tag, data.train.images, data.train.labels, focus,
                              data.target_input, meta)
    np.save(recorder.out_dir / "labels.npy", labels)
    np.save(recorder.out_dir / "is_poison.npy", data.is_poison)
    return recorder


def run_trial(setting: Setting, attack: str, trial: int, seed: int, defenses: list[str], done: dict[str, dict],
              cache_dir: Path, write, diagnostics: bool = False, record_signals: bool = False,
              victim_seed_offset: int = 0) -> None:
    """Craft once, train the shared prefix once, then one victim per defense not yet in ``done``.

    ``record_signals``: the undefended victim (and the shared prefix) record per-epoch logits and
    features under ``cache_dir/signals`` for the offline detection study. ``victim_seed_offset``: the
    victims train from another seed (initialisation, order, augmentation) on the same poisons, which
    measures how much of a defense's effect is training noise.
    """
    preset = setting.preset
    target_index, adv = draw_trial(setting, seed)
    poisons, craft_seconds = craft(setting, attack, seed, target_index, adv, cache_dir)
    data = setting.victim_data(poisons, target_index)
    seed = seed + victim_seed_offset  # the victims' seed from here on
    config = preset.train_config(seed)
    recorder = (signal_recorder(setting, attack, seed, target_index, adv, data, cache_dir)
                if record_signals and "none" not in done else None)
    record_hooks = {"on_batch": recorder.on_batch, "on_epoch_end": recorder.on_epoch_end} if recorder else {}
    prefix_trace: dict[int, float] = {}
    common = {"preset": preset.name, "attack": attack, "trial": trial, "seed": seed - victim_seed_offset,
              "victim_seed": seed, "target_index": target_index,
              "target_class": int(setting.test_set.labels[target_index]), "adversarial_class": adv,
              "budget": int(data.is_poison.sum()), "train_size": len(data.train), "craft_seconds": craft_seconds,
              "threads": torch.get_num_threads(), "device": str(preset.resolved_device()),
              "attack_loss_final": poisons.params.get("loss_final")}

    def checkpoint_of(name: str, trace: dict) -> EpochCheckpoint:
        """Where a victim's (or the prefix's) epochs are saved, so a killed run resumes at its next epoch."""
        run = json.dumps({"preset": asdict(preset), "attack": attack_params(attack, preset), "seed": seed,
                          "target": target_index, "adv": adv}, sort_keys=True, default=str)
        key = f"{hashlib.sha1(run.encode()).hexdigest()[:12]}_{file_safe(name)}"
        path = cache_dir / "victims" / f"{preset.name}_{attack}_s{seed}_{key}.pt"
        return EpochCheckpoint(path, key, {"trace": trace})

    # The shared prefix: epochs [0, warmup) with every example kept (same sampler as the defended runs).
    prefix_end = min(preset.warmup, config.epochs)
    prefix_checkpoint = checkpoint_of("prefix", prefix_trace)
    model = setting.new_victim(seed)
    optimizer, scheduler = make_optimizer(model, config)
    prefix_seconds = 0.0
    from_scratch = ("clean", "clean-screened", "jpeg")  # victims that do not branch from the prefix
    if any(parse_defense(spec)[0] not in from_scratch and not screens(spec) and spec not in done for spec in defenses):
        keeper = Sanitizer(model, data.train, policy="none", warmup=NEVER, seed=seed)
        prefix_seconds = continue_training(
            model, data.train, config, optimizer, scheduler, keeper, 0, prefix_end, desc="prefix",
            on_batch=record_hooks.get("on_batch"), checkpoint=None if record_hooks else prefix_checkpoint,
            on_epoch_end=chain(record_hooks.get("on_epoch_end"), target_tracer(data, adv, prefix_trace))).seconds

    # Victims in the order the defenses are listed (resumed runs skip the finished ones).
    matched: list[int] | None = None
    for spec in defenses:
        name = parse_defense(spec)[0]
        if name == "density" and matched is None and spec in done:
            matched = matched_counts(done[spec])
        if spec in done:
            continue
        trace: dict[int, float] = {}
        tracer = target_tracer(data, adv, trace)
        # signal recordings write every epoch's rows as they go: a victim recording them starts over
        epochs_checkpoint = None if record_hooks and spec == "none" else checkpoint_of(spec, trace)
        noise_file = None
        if spec in ("clean", "clean-screened"):
            row = clean_victim(setting, data, config, seed, tracer, screened=spec == "clean-screened",
                               checkpoint=epochs_checkpoint)
        elif name == "retrain":
            row = retrain_victim(spec, setting, data, config, seed, (model, optimizer, scheduler), prefix_end, tracer,
                                 epochs_checkpoint)
            row.update(seconds=row["seconds"] + prefix_seconds, seconds_prefix=prefix_seconds)
        elif name in PURIFIERS:
            noise_file = cache_dir / "purified" / f"{preset.name}_{attack}_s{seed}_t{target_index}_a{adv}" \
                f"{preset.surrogate_tag()}_{file_safe(spec)}.npz"
            row = purified_victim(spec, setting, data, config, seed, (model, optimizer, scheduler), prefix_end, tracer,
                                  checkpoint=noise_file, epochs_checkpoint=epochs_checkpoint)
            if row["uses_prefix"]:
                trace.update({e: v for e, v in prefix_trace.items() if e not in trace})
            shared = prefix_seconds if row.pop("uses_prefix") else 0.0
            row.update(seconds=row["seconds"] + shared, seconds_prefix=shared)
        else:
            policy, options = build_policy(spec, preset, matched)
            sched = schedule_for(spec, preset)
            # A policy with the input-noise screen acts when training starts: its victim trains from
            # epoch 0 (the shared prefix has already seen the poisons).
            from_start = policy.screen
            assert from_start == screens(spec), spec
            if from_start:
                m = setting.new_victim(seed)
                opt, sch = make_optimizer(m, config)
            else:
                m, opt, sch = branch(model, optimizer, scheduler, config)
            hooks = [score_diagnostics(data.is_poison, adv)] if diagnostics else None
            sanitizer = Sanitizer(m, data.train, policy=policy, seed=seed, round_hooks=hooks, **sched,
                                  screen_dataset=data.images, **sanitizer_options(spec, preset))
            shared = 0.0 if from_start else prefix_seconds
            if not from_start:
                trace.update(prefix_trace)
            own = record_hooks if spec == "none" else {}
            result = continue_training(m, data.train, config, opt, sch, sanitizer, 0 if from_start else prefix_end,
                                       config.epochs, desc=spec, on_batch=own.get("on_batch"),
                                       on_epoch_end=chain(own.get("on_epoch_end"), tracer),
                                       checkpoint=epochs_checkpoint)
            row = {"defense": spec, "policy_options": options, "schedule": sched, "embedding": sanitizer.embedding,
                   "model": m, **detection(sanitizer, data.is_poison),
                   "seconds": shared + result.seconds, "seconds_prefix": shared}
        outcome = evaluate(row.pop("model"), data, adv)
        resumed = epochs_checkpoint.resumed_at if epochs_checkpoint is not None else None
        row = {**common, **row, **outcome, "target_adv_prob_by_epoch": [trace[e] for e in sorted(trace)],
               **({"resumed_at_epoch": resumed} if resumed is not None else {})}
        write(row)
        done[spec] = row
        if epochs_checkpoint is not None:
            epochs_checkpoint.remove()  # the row is written: the victim's epochs are no longer needed
        if noise_file is not None:
            noise_file.unlink(missing_ok=True)  # nor its friendly noise (600 MB on CIFAR-10)
        if name == "density" and matched is None:
            matched = matched_counts(row)
    prefix_checkpoint.remove()


def retrain_victim(spec: str, setting: Setting, data: VictimData, config, seed: int, prefix, prefix_end: int,
                   on_epoch_end=None, checkpoint: EpochCheckpoint | None = None) -> dict:
    """Detect, then train again from scratch (``retrain:two_sided=true:max_fraction=0.2:warmup=3``): a
    branch of the shared prefix trains up to ``warmup``, where the ``density`` policy (with the
    spec's options) runs one round; a fresh victim then trains from epoch 0 without what it dropped.
    This is what a user does with a short audited first run; it costs the detection epochs on top."""
    preset = setting.preset
    _, options = parse_defense(spec, preset)
    policy_options = {k: v for k, v in options.items() if k not in SCHEDULE_KEYS + SANITIZER_KEYS}
    warmup = int(options.get("warmup", preset.warmup))
    if warmup < prefix_end:
        raise SystemExit(f"{spec}: warmup must be >= the preset's warmup {prefix_end} (the shared prefix)")
    t0 = time.perf_counter()
    m, opt, sch = branch(*prefix, config)
    probe = Sanitizer(m, data.train, policy=make_policy("density", **policy_options), seed=seed, warmup=warmup,
                      every=1, stop_epoch=warmup, embedding=options.get("embedding"))
    continue_training(m, data.train, config, opt, sch, probe, prefix_end, warmup, desc=f"{spec} (detect)")
    probe.start_epoch(warmup)  # the detection round, on the weights after epoch warmup - 1
    detect_seconds = time.perf_counter() - t0
    victim, _ = train_fresh(setting, data, config, seed, probe.keep, spec, on_epoch_end, checkpoint)
    return {"defense": spec, "policy_options": policy_options, "schedule": {"detect_epoch": warmup},
            "embedding": probe.embedding, "model": victim, **detection(probe, data.is_poison),
            "seconds": time.perf_counter() - t0, "seconds_detect": detect_seconds}


def train_fresh(setting: Setting, data: VictimData, config, seed: int, keep: np.ndarray, desc: str,
                on_epoch_end=None, checkpoint: EpochCheckpoint | None = None):
    """A new victim trained from epoch 0 on the examples ``keep`` marks; returns it and its keeper."""
    model = setting.new_victim(seed)
    optimizer, scheduler = make_optimizer(model, config)
    keeper = Sanitizer(model, data.train, policy="none", warmup=NEVER, seed=seed)
    keeper.keep[:] = keep
    continue_training(model, data.train, config, optimizer, scheduler, keeper, 0, config.epochs, desc=desc,
                      on_epoch_end=on_epoch_end, checkpoint=checkpoint)
    return model, keeper


def clean_victim(setting: Setting, data: VictimData, config, seed: int, on_epoch_end=None,
                 screened: bool = False, checkpoint: EpochCheckpoint | None = None) -> dict:
    """Reference, not a defense: the same victim trained without the poisons (an oracle filter at
    epoch 0). Its hits are targets the clean model already sends to the adversarial class.

    ``screened`` (defense ``clean-screened``): also without the images the library default's input screen
    flags on the poisoned set (model-free, so the same ones the default's victim loses before training): a
    poison-free victim on the default's data, without a sanitizer, to tell the dropped clean images apart
    from the sanitizer's mechanics."""
    t1 = time.perf_counter()
    keep = ~data.is_poison
    if screened:
        screen = Sanitizer(setting.new_victim(seed), data.train, policy="density", warmup=NEVER, seed=seed,
                           screen_dataset=data.images, verbose=False)
        screen.run_screen(0)
        keep &= screen.keep
    name = "clean-screened" if screened else "clean"
    m, oracle = train_fresh(setting, data, config, seed, keep, name, on_epoch_end, checkpoint)
    return {"defense": name, "policy_options": {}, "schedule": {}, "embedding": None, "model": m,
            **detection(oracle, data.is_poison), "seconds": time.perf_counter() - t1, "seconds_prefix": 0.0}


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def read_done(path: Path) -> dict[tuple[int, str], dict]:
    """Finished (trial, defense) pairs of a JSONL results file (a torn last line is ignored)."""
    done: dict[tuple[int, str], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("kind") == "victim":
                done[(int(row["trial"]), row["defense"])] = row
    return done


def check_same_run(out: Path, preset: Preset, attack: str, seed_start: int) -> None:
    """Refuse to resume into a file written by a different preset, attack or seed range."""
    if not out.exists():
        return
    for line in out.read_text().splitlines():
        try:
            head = json.loads(line)
        except json.JSONDecodeError:
            continue
        if head.get("kind") != "run":
            continue
        theirs = (head["preset"]["name"], head["attack"], head["seed_start"])
        if theirs != (preset.name, attack, seed_start):
            raise SystemExit(f"{out} holds preset/attack/seed-start {theirs}, not "
                             f"{(preset.name, attack, seed_start)}; write to another --out file")
        return


def run(preset: Preset, attack: str, trials: int, defenses: list[str], out: Path, data_root: str,
        cache_dir: Path, seed_start: int = 0, trial_start: int = 0, diagnostics: bool = False,
        record_signals: bool = False, victim_seed_offset: int = 0) -> Path:
    """Run (or resume) the benchmark and return the results file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    check_same_run(out, preset, attack, seed_start)
    done = read_done(out)
    todo = [t for t in range(trial_start, trial_start + trials) if any((t, d) not in done for d in defenses)]
    if not todo:
        log(f"[poisoning] all {trials} trials × {len(defenses)} defenses already in {out}")
        return out
    setting = make_setting(preset, data_root, cache_dir)
    torn = out.exists() and out.stat().st_size > 0 and not out.read_bytes().endswith(b"\n")
    with out.open("a") as f:
        if torn:  # an interrupted write left half a line: end it so the next row starts clean
            f.write("\n")

        def write(row: dict) -> None:
            f.write(json.dumps({"kind": "victim", **row}) + "\n")
            f.flush()

        if not done:
            f.write(json.dumps({"kind": "run", "preset": asdict(preset), "attack": attack, "defenses": defenses,
                                "seed_start": seed_start, "setting": setting.info,
                                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                                "threads": torch.get_num_threads(), "torch": torch.__version__,
                                "date": time.strftime("%Y-%m-%d")}, default=str) + "\n")
            f.flush()
        for trial in progress(todo, desc=f"{preset.name}/{attack}"):
            trial_done = {d: done[(trial, d)] for d in defenses if (trial, d) in done}
            run_trial(setting, attack, trial, seed_start + trial, defenses, trial_done, cache_dir, write,
                      diagnostics, record_signals, victim_seed_offset)
    return out


def craft_only(preset: Preset, attack: str, trials: int, data_root: str, cache_dir: Path, seed_start: int = 0,
               trial_start: int = 0) -> None:
    """Craft and cache the poisons of trials ``trial_start ..`` without training any victim."""
    setting = make_setting(preset, data_root, cache_dir)
    for trial in progress(range(trial_start, trial_start + trials), desc=f"craft {attack}"):
        seed = seed_start + trial
        target_index, adv = draw_trial(setting, seed)
        _, seconds = craft(setting, attack, seed, target_index, adv, cache_dir)
        log(f"[craft] trial {trial} (seed {seed}): {seconds:.1f}s")


def _limit_blas_threads(threads: int) -> None:
    """numpy/scikit-learn BLAS pools default to every core; on a shared CPU their spin-waiting makes the
    numpy-based policies (EPIC, spectral, activation clustering) many times slower, so pin them too."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        return
    threadpool_limits(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Poisoning benchmark: every defense on the same poisoned sets.")
    parser.add_argument("--preset", default="cifar10-transfer", choices=sorted(PRESETS))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a preset field, e.g. --set epochs=20 --set width=16")
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--attack", default="bullseye_polytope")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--trial-start", type=int, default=0, help="first trial number (seed = seed-start + trial)")
    parser.add_argument("--seed-start", type=int, default=0, help="0.. for reported runs; 1000.. for tuning")
    parser.add_argument("--defenses", default="none,density,epic-0.1,epic-0.2,deep_knn,spectral,"
                                                "activation_clustering,random")
    parser.add_argument("--out", type=Path, help="results JSONL (required unless --craft-only)")
    parser.add_argument("--cache-dir", default=Path("benchmarks/out"), type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--craft-only", action="store_true",
                        help="only craft and cache the trials' poisons (e.g. while tuning runs elsewhere)")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--diagnostics", action="store_true",
                        help="record per round how well the scores separate poisons (for tuning runs)")
    parser.add_argument("--record-signals", action="store_true",
                        help="the undefended victim saves per-epoch logits and features under CACHE_DIR/signals "
                             "for the offline detection study (benchmarks.detection_study)")
    parser.add_argument("--skip-undefended", action="store_true",
                        help="do not add the undefended victim (noise controls that read no time ratio, e.g. a "
                             "second poison-free victim with --victim-seed-offset)")
    parser.add_argument("--victim-seed-offset", type=int, default=0,
                        help="train the victims from seed + OFFSET on the same poisons (training-noise control; "
                             "write to its own --out file)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Reproducible surrogates and victims: same threads + deterministic kernels give the same weights.
    torch.use_deterministic_algorithms(True, warn_only=True)
    _limit_blas_threads(args.threads)
    preset = get_preset(args.preset).with_overrides(args.set)
    if args.craft_only:
        craft_only(preset, args.attack, args.trials, args.data_root, args.cache_dir, args.seed_start, args.trial_start)
        return
    if args.out is None:
        raise SystemExit("--out FILE.jsonl is required (the per-victim results are appended there)")
    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()]
    if "none" not in defenses and not args.skip_undefended:
        defenses.insert(0, "none")  # time ratios need undefended training in the same run
    out = run(preset, args.attack, args.trials, defenses, args.out, args.data_root, args.cache_dir,
              args.seed_start, args.trial_start, args.diagnostics, args.record_signals, args.victim_seed_offset)
    if not args.no_report:
        from benchmarks.report import report
        print(report(out))


if __name__ == "__main__":
    main()
