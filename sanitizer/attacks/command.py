"""``sanitizer attack``: craft a bundled attack from the command line, or list them.

Examples::

    sanitizer attack --list
    sanitizer attack gradient_matching --data digits --out poisons.npz --budget 0.02 --eps 16/255
    sanitizer attack gradient_matching --data cifar10 --data-root ../shared/data/cifar10 \\
        --model resnet18 --surrogate-weights my_model.pt --target-index 7 --adversarial-class 3 \\
        --out poisons.npz --param steps=250 --param restarts=8
    sanitizer attack label_flip --data my_images.npz --out poisons.npz --budget 0.05
    sanitizer attack badnets --data photos/train --test-data photos/test --out poisons.npz

``--data`` is ``digits``, ``cifar10`` or your own images: an ``.npz`` file (``images`` floats in [0, 1]
``[N, C, H, W]`` or uint8 ``[N, H, W, C]``, ``labels``; optional ``test_images``/``test_labels``,
``num_classes``) or an image folder (``root/<class>/<image>``, the torchvision ImageFolder layout).
Without test images, ``--test-data`` (another .npz or folder) supplies the targets, else ``--holdout``
of the images is held out (drawn from ``--split-seed``); poison indices always refer to the images
of ``--data`` in their own order. Every input is checked before any crafting starts.

Every attack is driven through the calling convention of :data:`sanitizer.attacks.base.CRAFT_ARGUMENTS`.
Attacks that need a model get a surrogate: the ``--model`` architecture loaded from
``--surrogate-weights`` (a ``state_dict`` saved with ``torch.save``; loaded with
``weights_only=True``), or trained here for ``--surrogate-epochs`` on the clean training set.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from sanitizer.attacks.base import available_attacks, default_budget, make_attack, resolve_budget
from sanitizer.data import (
    ImageTensorDataset,
    holdout_split,
    load_cifar10,
    load_digits_split,
    load_image_folder,
    load_npz,
    subset_by_class,
)
from sanitizer.errors import SanitizerError
from sanitizer.models import make_model
from sanitizer.options import parse_key_values
from sanitizer.progress import log

DATA_NAMES = ("digits", "cifar10")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attack", help="craft a bundled poisoning attack (or --list them)",
        description="Craft poisons with a bundled attack and save them as a PoisonSet (.npz).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Every attack")[0] + budget_epilog())
    p.add_argument("name", nargs="?", help="attack name (see --list)")
    p.add_argument("--list", action="store_true", help="list the attacks, their threat models and default budgets")
    p.add_argument("--data", default="digits", metavar="digits|cifar10|PATH",
                   help="digits, cifar10, an .npz file or an image folder (default: digits; write ./digits for a "
                   "folder of that name)")
    p.add_argument("--data-root", help="CIFAR-10 folder (the torchvision layout)")
    p.add_argument("--test-data", metavar="PATH", help="with --data PATH: test images (an .npz or image folder) "
                   "the targets are drawn from")
    p.add_argument("--holdout", type=float, default=0.2, help="with --data PATH and no test images: the fraction "
                   "held out as the test set (default 0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the --holdout split")
    p.add_argument("--per-class", type=int, help="craft on a class-balanced subset with this many images per "
                   "class (indices in the output still refer to the full training set)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--out", help="where to write the PoisonSet (.npz)")
    p.add_argument("--model", choices=("cnn", "resnet18"), default="cnn", help="surrogate architecture")
    p.add_argument("--width", type=int, help="surrogate width (cnn: 32, resnet18: 64 by default)")
    p.add_argument("--surrogate-epochs", type=int, default=20)
    p.add_argument("--surrogate-lr", type=float, default=0.1)
    p.add_argument("--surrogate-weights", help="state_dict of your own --model to craft against")
    p.add_argument("--eps", type=_eps, help="L∞ bound in [0, 1] pixel units, e.g. 16/255 or 0.0627")
    p.add_argument("--budget", type=_budget, help="poison count (25) or fraction of the training set (0.01); "
                   "the default differs per attack (listed below)")
    p.add_argument("--target-index", type=int, help="index of the target in the test set (default: drawn "
                   "from --seed)")
    p.add_argument("--adversarial-class", type=int)
    p.add_argument("--source-class", type=int, help="backdoors: the class whose patched images are attacked")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other attack parameter, e.g. --param steps=250 (values parsed as JSON)")
    p.set_defaults(handler=run)


def _eps(text: str) -> float:
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 16/255, got {text!r}") from None
    if value > 1:
        raise argparse.ArgumentTypeError(f"eps={text} is in [0, 1] pixel units; for 16 levels write 16/255")
    return value


def _budget(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a count or a fraction, got {text!r}") from None
    return int(value) if value.is_integer() else value


def parse_params(items: list[str]) -> dict:
    """``--param`` values: ``["steps=250", "flip=false", "mode=x"]`` → ``{"steps": 250, "flip": False,
    "mode": "x"}`` (see :func:`sanitizer.options.parse_key_values`, which other commands share)."""
    return parse_key_values(items, "--param", SystemExit)


# Training-set sizes of the bundled data sets, to show what a fractional default budget comes to
# (CIFAR-10 has 50000 training images; a test checks the digits split against its loader).
TRAIN_SIZES = {"digits": 1348, "cifar10": 50000}


def describe_budget(name: str, short: bool = False) -> str:
    """An attack's default budget in words, from its constructor (see :func:`default_budget`)."""
    default = default_budget(name)
    if default is None:
        return "-" if short else "no budget parameter"
    kind, value = default
    if kind == "fraction":
        return f"fraction={value:g}" if short else \
            f"no --budget: perturbs fraction={value:g} of the training set (--param fraction=...)"
    counts = {data: resolve_budget(value, n) for data, n in TRAIN_SIZES.items()}
    fractional = isinstance(value, float) and value < 1
    if short:
        return f"{value:g}" + (f" ({counts['digits']} on digits)" if fractional else "")
    if fractional:
        examples = ", ".join(f"{count} on {data}" for data, count in counts.items())
        return f"{value:g} = {value * 100:g}% of the training set ({examples})"
    return f"{value:g} poison" + ("s" if value != 1 else "")


def budget_epilog() -> str:
    width = max(len(name) for name in available_attacks())
    return "default budgets (--budget: a count, or a fraction of the training set below 1):\n" + "\n".join(
        f"  {name.ljust(width)}  {describe_budget(name)}" for name in available_attacks()) + "\n"


def list_attacks() -> str:
    rows = [("NAME", "GOAL", "LABELS", "SETTING", "BUDGET", "SUMMARY")]
    for name, tm in available_attacks().items():
        rows.append((name, tm.goal, "clean" if tm.clean_label else "dirty", tm.setting,
                     describe_budget(name, short=True), tm.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows)


def check_arguments(args) -> None:
    """Refuse bad paths and options before any data is read or anything is crafted."""
    out = Path(args.out)
    if out.is_dir():
        raise SystemExit(f"--out {out} is a folder; give a file name such as {out / 'poisons.npz'}")
    if not out.absolute().parent.is_dir():
        raise SystemExit(f"--out {out}: the folder {out.absolute().parent} does not exist; create it first")
    for option, value in (("--data", None if args.data in DATA_NAMES else args.data),
                          ("--test-data", args.test_data), ("--surrogate-weights", args.surrogate_weights)):
        if value is not None and not Path(value).exists():
            hint = f" (or one of {', '.join(DATA_NAMES)})" if option == "--data" else ""
            raise SystemExit(f"{option} {value}: no such file or folder{hint}")
    if args.data not in DATA_NAMES and Path(args.data).is_file() and Path(args.data).suffix.lower() != ".npz":
        raise SystemExit(f"--data {args.data}: a file must be an .npz of images and labels (or give an image folder)")
    if args.test_data is not None and args.data in DATA_NAMES:
        raise SystemExit(f"--test-data goes with --data PATH; --data {args.data} has its own test set")
    if not 0 < args.holdout < 1:
        raise SystemExit(f"--holdout must lie in (0, 1), got {args.holdout}")
    for option, value in (("--per-class", args.per_class), ("--width", args.width),
                          ("--surrogate-epochs", None if args.surrogate_weights else args.surrogate_epochs)):
        if value is not None and value < 1:
            raise SystemExit(f"{option} must be >= 1, got {value}")
    for option, value in (("--seed", args.seed), ("--split-seed", args.split_seed),
                          ("--subset-seed", args.subset_seed)):
        if value < 0:
            raise SystemExit(f"{option} must be >= 0 (numpy takes no negative seeds), got {value}")
    if not (math.isfinite(args.surrogate_lr) and args.surrogate_lr > 0):
        raise SystemExit(f"--surrogate-lr must be a positive number, got {args.surrogate_lr}")
    check_device(args.device)


def check_device(name: str | None) -> torch.device:
    """``--device`` as a torch device that exists here (default: cuda when available, else the CPU)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SystemExit(f"--device {name!r} is not a torch device; pass cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise SystemExit(f"--device {name}: CUDA is not available on this machine; pass --device cpu")
        if device.index is not None and device.index >= count:
            raise SystemExit(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def load_path(path: str, classes: list[str] | None = None) -> tuple[ImageTensorDataset, ImageTensorDataset | None,
                                                                      list[str] | None]:
    """(train, test or None, class names or None) from an .npz file or an image folder."""
    if Path(path).is_dir():
        train, names = load_image_folder(path, classes)
        return train, None, names
    train, test = load_npz(path)
    return train, test, None


def load_data(args) -> tuple[ImageTensorDataset, ImageTensorDataset, np.ndarray | None, dict]:
    """(train set, test set, index of each crafting example in --data or None, what to record in params)."""
    index_map, record = None, {}
    if args.data == "digits":
        train, test = load_digits_split()
    elif args.data == "cifar10":
        if not args.data_root:
            raise SystemExit("--data cifar10 needs --data-root (the folder holding cifar-10-batches-py)")
        train, test = load_cifar10(args.data_root, train=True), load_cifar10(args.data_root, train=False)
    else:
        train, test, names = load_path(args.data)
        if names is not None:
            record["class_names"] = names
        if args.test_data is not None:
            if test is not None:
                raise SystemExit(f"{args.data} holds test_images already; drop --test-data or those arrays")
            test, _, _ = load_path(args.test_data, names)
            if test.images.shape[1:] != train.images.shape[1:]:
                raise SystemExit(f"--test-data images are {tuple(test.images.shape[1:])}, --data images "
                                 f"{tuple(train.images.shape[1:])}; they need one shape")
            if test.num_classes > train.num_classes:
                raise SystemExit(f"--test-data has labels up to {test.num_classes - 1} but --data only "
                                 f"{train.num_classes} classes")
            test = ImageTensorDataset(test.images, test.labels, None, train.num_classes)
        elif test is None:
            index_map, test_idx = holdout_split(len(train), args.holdout, args.split_seed)
            test = _take(train, test_idx)
            train = _take(train, index_map)
            record.update(holdout=args.holdout, split_seed=args.split_seed)
    if train.num_classes < 2:
        raise SystemExit(f"--data {args.data} has a single class; poisoning needs at least two")
    if args.per_class is not None:
        subset = subset_by_class(train, args.per_class, seed=args.subset_seed)
        train = _take(train, subset)
        index_map = subset if index_map is None else index_map[subset]
    return train, test, index_map, record


def _take(dataset: ImageTensorDataset, indices: np.ndarray) -> ImageTensorDataset:
    idx = torch.from_numpy(indices)
    return ImageTensorDataset(dataset.images[idx], dataset.labels[idx], None, dataset.num_classes)


def check_targets(args, train: ImageTensorDataset, test: ImageTensorDataset) -> None:
    """Class and target options in range for the loaded data (before a surrogate is trained)."""
    for option, value in (("--adversarial-class", args.adversarial_class), ("--source-class", args.source_class)):
        if value is not None and not 0 <= value < train.num_classes:
            raise SystemExit(f"{option} {value} is not a class of the data (classes 0..{train.num_classes - 1})")
    if args.target_index is not None and not 0 <= args.target_index < len(test):
        raise SystemExit(f"--target-index {args.target_index} is outside the {len(test)} test images")


def build_surrogate(args, train: ImageTensorDataset, device: torch.device):
    from sanitizer.attacks.gradient_matching import train_surrogate

    model = make_model(args.model, train.num_classes, train.images.shape[1], args.width).to(device)
    if args.surrogate_weights:
        try:
            state = torch.load(args.surrogate_weights, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - report any unreadable file the same way
            raise SystemExit(f"cannot read {args.surrogate_weights} as a state_dict ({exc}); save it with "
                             "torch.save(model.state_dict(), path)") from exc
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise SystemExit(f"{args.surrogate_weights} does not fit --model {args.model} "
                             f"--width {args.width}: {exc}") from exc
        log(f"surrogate: {args.model} loaded from {args.surrogate_weights}")
        return model.eval()
    log(f"surrogate: training a {args.model} for {args.surrogate_epochs} epochs on {len(train)} images")
    return train_surrogate(train, model, epochs=args.surrogate_epochs, lr=args.surrogate_lr, seed=args.seed)


def craft_with_convention(attack, train, **arguments):
    """Call ``attack.craft`` with the conventional arguments it accepts (all of them if it takes ``**kw``)."""
    signature = inspect.signature(attack.craft)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        arguments = {k: v for k, v in arguments.items() if k in signature.parameters}
    return attack.craft(train, **arguments)


def run(args) -> int:
    if args.list:
        print(list_attacks())
        return 0
    if not args.name:
        raise SystemExit("name an attack (sanitizer attack --list shows them)")
    if not args.out:
        raise SystemExit("--out PATH is required (where to write the poisons, e.g. poisons.npz)")
    check_arguments(args)
    params = parse_params(args.param)
    if args.eps is not None:
        params["eps"] = args.eps
    if args.budget is not None:
        params["budget"] = args.budget
    try:
        attack = make_attack(args.name, **params)
    except TypeError as exc:
        raise SystemExit(f"attack {args.name!r} does not take these parameters ({exc}); "
                         f"see help(sanitizer.attacks.make_attack({args.name!r}))") from exc
    device = check_device(args.device)
    try:
        train, test, index_map, record = load_data(args)
        check_targets(args, train, test)
    except (SanitizerError, ValueError, OSError) as exc:  # bad data: one line, before any crafting
        raise SystemExit(str(exc)) from None
    surrogate = build_surrogate(args, train, device) if getattr(attack, "needs_surrogate", True) else None
    t0 = time.perf_counter()
    poisons = craft_with_convention(attack, train, surrogate=surrogate, test_set=test,
                                    target_index=args.target_index, adversarial_class=args.adversarial_class,
                                    source_class=args.source_class, seed=args.seed)
    seconds = time.perf_counter() - t0
    poisons.params.update({"data": args.data, "craft_seconds_cli": seconds, **record,
                           "surrogate": args.surrogate_weights or f"{args.model} trained {args.surrogate_epochs} ep"})
    if args.test_data is not None:
        poisons.params["test_data"] = args.test_data
    if index_map is not None:
        poisons.indices = index_map[poisons.indices]
    if args.per_class is not None:
        poisons.params.update({"per_class": args.per_class, "subset_seed": args.subset_seed})
    poisons.num_classes = train.num_classes
    poisons.save(args.out)
    saved = args.out if str(args.out).endswith(".npz") else f"{args.out}.npz"  # numpy adds the suffix
    what = f"{len(poisons)} poisons"
    if poisons.target_indices is not None:
        what += f" against test image {poisons.target_indices.tolist()} → class {poisons.adversarial_class}"
    log(f"{args.name}: {what} in {seconds:.1f}s, saved to {saved}")
    return 0
