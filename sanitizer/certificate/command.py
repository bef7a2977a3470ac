"""``sanitizer certify`` (train under the sanitizer and write a certificate and report),
``sanitizer verify`` (check a certificate's chain, seal, signature and, given the data, its
fingerprint) and ``sanitizer keygen`` (an ed25519 key pair to sign certificates with)."""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path
from typing import Any

import torch

from sanitizer.errors import SanitizerError

DATASETS = ("digits", "cifar10")


def register(subparsers) -> None:
    p = subparsers.add_parser("certify", help="train under the sanitizer and write a certificate and report",
                              description="Train a model under the sanitizer on a bundled dataset, then write a "
                                          "certificate (JSON) and an HTML report. Optionally measure attack "
                                          "success on a proxy run and add a partition-aggregation certificate.")
    _data_args(p)
    p.add_argument("--subset-per-class", type=int, default=None, help="use this many training examples per class")
    p.add_argument("--model", default="cnn", choices=("cnn", "resnet18"))
    p.add_argument("--width", type=int, default=None, help="model width (cnn default 32, resnet18 default 64)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--policy", default="density")
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy option, e.g. threshold=3.0 (repeatable)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacks", default="", help="comma-separated bundled attacks for the measured-robustness "
                                                 "section, e.g. label_flip,badnets (empty: skip)")
    p.add_argument("--runs", type=int, default=2, help="runs per attack in the robustness section")
    p.add_argument("--proxy-per-class", type=int, default=None,
                   help="training examples per class in the robustness proxy (default: all used)")
    p.add_argument("--proxy-epochs", type=int, default=None, help="epochs of each proxy run (default: --epochs)")
    p.add_argument("--partitions", type=int, default=0, help="k > 0 adds a partition-aggregation certificate")
    p.add_argument("--partition-epochs", type=int, default=None,
                   help="epochs per part model (default: --epochs); parts are k times smaller, so they usually "
                        "need more epochs to train")
    p.add_argument("--out", default="certificate/cert.json", help="certificate JSON path")
    p.add_argument("--report-dir", default=None, help="report folder (default: beside the certificate)")
    p.add_argument("--signing-key", default=None, metavar="KEY.pem",
                   help="sign the certificate with this ed25519 private key (make one with `sanitizer keygen`)")
    p.set_defaults(handler=run_certify)

    v = subparsers.add_parser("verify", help="check a certificate's hash chain, seal, signature and, given the "
                                             "data, its fingerprint")
    v.add_argument("certificate", help="certificate JSON file")
    _data_args(v, default=None)
    v.add_argument("--public-key", default=None, metavar="KEY.pub.pem",
                   help="the issuer's ed25519 public key: the certificate must carry a valid signature by it")
    v.add_argument("--seal", default=None, metavar="HASH",
                   help="a seal published elsewhere (64 hex characters): the certificate's seal must equal it")
    v.set_defaults(handler=run_verify)

    k = subparsers.add_parser("keygen", help="write an ed25519 key pair for signing certificates",
                              description="Write an ed25519 private key (PEM, readable by you only) and its public "
                                          "key beside it (key.pem -> key.pub.pem). Sign with `sanitizer certify "
                                          "--signing-key key.pem`; publish key.pub.pem for `sanitizer verify "
                                          "--public-key`.")
    k.add_argument("--out", default="key.pem", help="private key path (default key.pem)")
    k.add_argument("--force", action="store_true", help="replace existing key files")
    k.set_defaults(handler=run_keygen)


def _data_args(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    p.add_argument("--data", choices=DATASETS, default=default,
                   help="bundled dataset" + ("" if default else " to check the fingerprint against"))
    p.add_argument("--data-root", default="../shared/data/cifar10", help="CIFAR-10 folder (torchvision layout)")
    p.add_argument("--poisons", default=None, help="a PoisonSet .npz to apply to the training set")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_source(source: dict[str, Any], data_root: str, poisons_path: str | None):
    """``(train, test, poison_positions)`` exactly as described by a certificate's ``dataset.source``.

    Poisons (crafted against the whole training set) are applied before the optional per-class
    subset; ``poison_positions`` are the poisons' indices in the returned training set.
    """
    import numpy as np

    from sanitizer.attacks import PoisonSet
    from sanitizer.data import ImageTensorDataset, load_cifar10, load_digits_split, subset_by_class

    name = source.get("name")
    if name == "digits":
        train, test = load_digits_split()
    elif name == "cifar10":
        train, test = load_cifar10(data_root, train=True), load_cifar10(data_root, train=False)
    else:
        raise SanitizerError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if source.get("poisons_sha256"):
        if poisons_path is None:
            raise SanitizerError("the certificate was made on a poisoned training set; pass the same file with "
                                 "--poisons to rebuild it")
        if file_sha256(poisons_path) != source["poisons_sha256"]:
            raise SanitizerError(f"{poisons_path} is not the poison file the certificate was made with "
                                 "(its sha256 differs)")
    is_poison = np.zeros(len(train), dtype=bool)
    if poisons_path is not None:
        poisons = PoisonSet.load(poisons_path)
        train = poisons.apply(train)
        is_poison[poisons.indices] = True
    if source.get("subset_per_class"):
        idx = subset_by_class(train, source["subset_per_class"], source.get("subset_seed", 0))
        train = ImageTensorDataset(train.images[torch.from_numpy(idx)], train.labels[torch.from_numpy(idx)], None,
                                   train.num_classes)
        is_poison = is_poison[idx]
    return train, test, (np.flatnonzero(is_poison) if poisons_path is not None else None)


def _policy_options(pairs: list[str]) -> dict[str, Any]:
    from sanitizer.options import parse_key_values  # the one KEY=VALUE grammar (attack --param too)

    return parse_key_values(pairs, "--policy-option")


def _error(command: str, exc: Exception | str) -> int:
    print(f"sanitizer {command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def check_certify_args(args: argparse.Namespace):
    """Refuse bad ``certify`` arguments before any work starts (one clear message); return the signing key."""
    from sanitizer.attacks import available_attacks
    from sanitizer.certificate.signing import load_private_key
    from sanitizer.policies import make_policy

    def at_least(name: str, minimum: int, optional: bool = False) -> None:
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value is None and optional:
            return
        if value < minimum:
            raise SanitizerError(f"{name} must be >= {minimum}, got {value}")

    for name in ("--epochs", "--batch-size", "--every", "--runs"):
        at_least(name, 1)
    for name in ("--warmup", "--seed", "--partitions"):
        at_least(name, 0)
    for name in ("--subset-per-class", "--width", "--proxy-per-class", "--proxy-epochs", "--partition-epochs"):
        at_least(name, 1, optional=True)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise SanitizerError(f"--lr must be a positive number, got {args.lr}")
    first = f"the sanitizer's first round is at epoch --warmup {args.warmup}"
    if args.epochs <= args.warmup:
        raise SanitizerError(f"--epochs {args.epochs} ends before {first}: nothing would be sanitized or "
                             "certified; train longer or lower --warmup")
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = sorted(set(attacks) - set(available_attacks()))
    if unknown:
        raise SanitizerError(f"unknown attacks {', '.join(unknown)} in --attacks; available: "
                             f"{', '.join(available_attacks())}")
    if attacks and (args.proxy_epochs or args.epochs) <= args.warmup:
        raise SanitizerError(f"--proxy-epochs {args.proxy_epochs} ends before {first}: the sanitized proxy arm "
                             "would never sanitize")
    if args.partitions and (args.partition_epochs or args.epochs) <= args.warmup:
        raise SanitizerError(f"--partition-epochs {args.partition_epochs} ends before {first}: the part models "
                             "would never be sanitized")
    make_policy(args.policy, **_policy_options(args.policy_option))
    if args.poisons is not None and not Path(args.poisons).is_file():
        raise SanitizerError(f"--poisons {args.poisons}: no such file")
    out = Path(args.out)
    if out.is_dir():
        raise SanitizerError(f"--out {args.out} is a folder; give the certificate's file path")
    _check_folder_can_exist(out.parent, "--out", args.out)
    report_dir = Path(args.report_dir) if args.report_dir else out.parent / "report"
    option = "--report-dir" if args.report_dir else "the report folder (by default beside --out)"
    if report_dir.exists() and not report_dir.is_dir():
        raise SanitizerError(f"{option} {report_dir} is a file; give --report-dir a folder for the report")
    _check_folder_can_exist(report_dir, option, report_dir)
    return load_private_key(args.signing_key) if args.signing_key else None


def _check_folder_can_exist(folder: Path, option: str, given) -> None:
    """Refuse a folder that cannot be created because a part of its path is a file (found only after training)."""
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise SanitizerError(f"{option} {given}: {part} is a file, so the folder cannot be created")
            return


def run_certify(args: argparse.Namespace) -> int:
    from sanitizer.certificate import BoundRecorder, measure_robustness, partition_certificate, sanitizer_options
    from sanitizer.certificate.report import text_summary
    from sanitizer.core import Sanitizer
    from sanitizer.models import make_model
    from sanitizer.progress import log
    from sanitizer.train import TrainConfig, accuracy, train_classifier

    try:
        signing_key = check_certify_args(args)
        source = {"name": args.data, "subset_per_class": args.subset_per_class, "subset_seed": args.seed,
                  "poisons_sha256": file_sha256(args.poisons) if args.poisons else None}
        train, test, poison_positions = load_source(source, args.data_root, args.poisons)
    except (SanitizerError, OSError, ValueError) as exc:
        return _error("certify", exc)
    in_ch, classes = train.images.shape[1], train.num_classes

    def factory() -> torch.nn.Module:
        return make_model(args.model, classes, in_ch, args.width)

    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    torch.manual_seed(args.seed)
    model = factory()
    sanitizer = Sanitizer(model, train, policy=args.policy, policy_options=_policy_options(args.policy_option),
                          warmup=args.warmup, every=args.every, seed=args.seed, num_classes=classes)
    BoundRecorder.attach(sanitizer)
    train_classifier(model, train, config, sanitizer=sanitizer, desc="certified run")
    log(f"clean test accuracy {accuracy(model, test):.3f}; dropped {len(sanitizer.dropped)} of {len(train)}")
    options = sanitizer_options(sanitizer)
    robustness = None
    attacks = [a for a in args.attacks.split(",") if a]
    if attacks:
        proxy_config = TrainConfig(**{**config.to_dict(), "epochs": args.proxy_epochs or args.epochs})
        base = train if args.poisons is None else \
            load_source({**source, "poisons_sha256": None}, args.data_root, None)[0]
        robustness = measure_robustness(factory, base, test, proxy_config, attacks, args.runs,
                                        args.proxy_per_class, options, args.seed)
    partition = None
    if args.partitions:
        part_config = TrainConfig(**{**config.to_dict(), "epochs": args.partition_epochs or args.epochs})
        partition = partition_certificate(factory, train, test, args.partitions, part_config, options)
    out = Path(args.out)
    report_dir = Path(args.report_dir) if args.report_dir else out.parent / "report"
    cert = sanitizer.certificate(out, train_config=config, dataset_source=source,
                                 poison_indices=poison_positions,
                                 robustness=robustness, partition=partition, report_dir=report_dir,
                                 seeds={"run": args.seed}, signing_key=signing_key)
    print(f"certificate: {out}\nreport:      {report_dir / 'report.html'}\nseal:        {cert['seal']['hash']}")
    if cert.get("signature"):
        print(f"signed:      ed25519 key {cert['signature']['key_id']}")
    print("\n" + text_summary(cert))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from sanitizer.certificate import validate, verify_certificate
    from sanitizer.certificate.signing import load_public_key
    from sanitizer.certificate.strict import CertificateFormatError, read_certificate

    try:
        key = load_public_key(args.public_key) if args.public_key else None
    except SanitizerError as exc:
        return _error("verify", exc)
    try:
        cert = read_certificate(args.certificate)
    except CertificateFormatError as exc:
        print(f"FAILED: {exc}")
        return 1
    dataset = test = None
    if args.data is not None and not validate(cert):
        source = dict(cert["audit"]["dataset"].get("source") or {})
        if source.get("name") not in (None, args.data):
            print(f"FAILED: the certificate was made on {str(source['name'])[:40]!r}, not {args.data!r}")
            return 1
        source["name"] = args.data
        try:
            dataset, test, _ = load_source(source, args.data_root, args.poisons)
        except (SanitizerError, OSError, ValueError, TypeError) as exc:
            return _error("verify", f"cannot rebuild the dataset: {exc}")
    result = verify_certificate(cert, dataset, public_key=key, seal=args.seal, test_dataset=test)
    for item in result.checked:
        print(f"checked: {item}")
    for problem in result.problems:
        print(f"FAILED: {problem}")
    if result.ok:
        print(f"OK: the certificate is intact (seal {cert['seal']['hash']})"
              + (", signed by the given public key" if key is not None else ""))
    for note in result.notes:
        print(("warning: " if "UNSIGNED" in note else "note: ") + note)
    if result.ok and dataset is None:
        print("note: no dataset given, so its fingerprint was not checked (pass --data ...)")
    return 0 if result.ok else 1


def run_keygen(args: argparse.Namespace) -> int:
    from sanitizer.certificate.signing import generate_key_pair, key_id, load_public_key

    try:
        private, public = generate_key_pair(args.out, overwrite=args.force)
    except (SanitizerError, OSError) as exc:
        return _error("keygen", exc)
    print(f"private key: {private}  (keep it secret; sign with `sanitizer certify --signing-key {private}`)\n"
          f"public key:  {public}  (publish it; check with `sanitizer verify CERT --public-key {public}`)\n"
          f"key id:      {key_id(load_public_key(public))}")
    return 0
