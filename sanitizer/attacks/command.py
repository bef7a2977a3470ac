"""``sanitizer attack``: craft a bundled attack from the command line, or list them.

Examples::

    sanitizer attack --list
    sanitizer attack gradient_matching --data digits --out poisons.npz --budget 0.02 --eps 16/255
    sanitizer attack gradient_matching --data cifar10 --data-root ../shared/data/cifar10 \\
        --model resnet18 --surrogate-weights my_model.pt --target-index 7 --adversarial-class 3 \\
        --out poisons.npz --param steps=250 --param restarts=8

Every attack is driven through the calling convention of :data:`sanitizer.attacks.base.CRAFT_ARGUMENTS`.
Attacks that need a model get a surrogate: the ``--model`` architecture loaded from
``--surrogate-weights`` (a ``state_dict`` saved with ``torch.save``; loaded with
``weights_only=True``), or trained here for ``--surrogate-epochs`` on the clean training set.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from fractions import Fraction

import numpy as np
import torch

from sanitizer.attacks.base import available_attacks, make_attack
from sanitizer.data import ImageTensorDataset, load_cifar10, load_digits_split, subset_by_class
from sanitizer.models import make_model
from sanitizer.progress import log


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attack", help="craft a bundled poisoning attack (or --list them)",
        description="Craft poisons with a bundled attack and save them as a PoisonSet (.npz).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Every attack")[0])
    p.add_argument("name", nargs="?", help="attack name (see --list)")
    p.add_argument("--list", action="store_true", help="list the attacks and their threat models")
    p.add_argument("--data", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--data-root", help="CIFAR-10 folder (the torchvision layout)")
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
    p.add_argument("--budget", type=_budget, help="poison count (25) or fraction of the training set (0.01)")
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
    """``["steps=250", "flip=false", "mode=x"]`` → ``{"steps": 250, "flip": False, "mode": "x"}``."""
    params = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--param expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            params[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            params[key.strip()] = {"true": True, "false": False}.get(text.lower(), text)
    return params


def list_attacks() -> str:
    rows = [("NAME", "GOAL", "LABELS", "SETTING", "SUMMARY")]
    for name, tm in available_attacks().items():
        rows.append((name, tm.goal, "clean" if tm.clean_label else "dirty", tm.setting, tm.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows)


def load_data(args) -> tuple[ImageTensorDataset, ImageTensorDataset, np.ndarray | None]:
    """(train set, test set, indices of the subset in the full training set or None)."""
    if args.data == "digits":
        train, test = load_digits_split()
    else:
        if not args.data_root:
            raise SystemExit("--data cifar10 needs --data-root (the folder holding cifar-10-batches-py)")
        train, test = load_cifar10(args.data_root, train=True), load_cifar10(args.data_root, train=False)
    if args.per_class is None:
        return train, test, None
    subset = subset_by_class(train, args.per_class, seed=args.subset_seed)
    idx = torch.from_numpy(subset)
    return ImageTensorDataset(train.images[idx], train.labels[idx], None, train.num_classes), test, subset


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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, test, subset = load_data(args)
    surrogate = build_surrogate(args, train, device) if getattr(attack, "needs_surrogate", True) else None
    t0 = time.perf_counter()
    poisons = craft_with_convention(attack, train, surrogate=surrogate, test_set=test,
                                    target_index=args.target_index, adversarial_class=args.adversarial_class,
                                    source_class=args.source_class, seed=args.seed)
    seconds = time.perf_counter() - t0
    poisons.params.update({"data": args.data, "craft_seconds_cli": seconds,
                           "surrogate": args.surrogate_weights or f"{args.model} trained {args.surrogate_epochs} ep"})
    if subset is not None:
        poisons.indices = subset[poisons.indices]
        poisons.params.update({"per_class": args.per_class, "subset_seed": args.subset_seed})
    poisons.save(args.out)
    what = f"{len(poisons)} poisons"
    if poisons.target_indices is not None:
        what += f" against test image {poisons.target_indices.tolist()} → class {poisons.adversarial_class}"
    log(f"{args.name}: {what} in {seconds:.1f}s, saved to {args.out}")
    return 0
