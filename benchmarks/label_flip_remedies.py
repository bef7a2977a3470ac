"""What wins back the test error that random label flips cost? (issue 15; the `certify` example's recipe)

Digits, 10 % random flips, the certify recipe (width-32 CNN, 12 epochs, step schedule with cuts at 4.5, 7.5
and 10.5 epochs), runs 0..R-1 with the run's seed for the flips and the training. Arms, each reported as test
errors out of 449 per run:

- ``clean``: no flips (the floor); ``undefended``: the flips, no sanitizer;
- ``drop``: the library default, rounds at epochs 4 and 8 (``--warmup 4 --every 4`` as in the example);
- ``drop-every-2``: the default with rounds every 2 epochs from epoch 2; ``unlearn``: ``action="unlearn"``;
- ``relabel``: an audit-mode sanitizer whose round hook, at epoch 4, gives the examples the label side flags
  (at most 1 of 20 neighbours agree, gate open) their neighbours' plurality label, and training goes on;
- ``relabel+retrain`` / ``drop+retrain``: a fresh model trained from scratch on the data relabelled / without
  the examples flagged at epoch 4; ``clean minus the flagged``: the same examples removed from the clean
  data (what losing those images costs by itself).

    python -m benchmarks.label_flip_remedies --runs 3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sanitizer import Sanitizer
from sanitizer.attacks import make_attack
from sanitizer.data import load_digits_split
from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.embeddings import gradient_embeddings
from sanitizer.label_agreement import mislabelled
from sanitizer.models import make_model
from sanitizer.neighbors import knn
from sanitizer.train import TrainConfig, predict_proba, train_classifier

RECIPE = dict(epochs=12, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, batch_size=128, augment=True,
              milestones=[0.375, 0.625, 0.875], schedule="step")
K = 20


def materialise(data) -> ImageTensorDataset:
    """A plain tensor dataset (own label tensor) of any indexable dataset of (image, label, ...) items."""
    items = [data[i] for i in range(len(data))]
    return ImageTensorDataset(torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items]),
                              None, 10)


def neighbour_plurality(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    unit = (features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-12)).astype(np.float32)
    _, idx = knn(unit, K)
    return np.stack([(labels[idx] == c).sum(1) for c in range(10)], 1).argmax(1)


def test_errors(model, test) -> int:
    return int((predict_proba(model, test.images).argmax(1) != test.labels).sum())


def one_run(run: int, train, test) -> dict[str, int]:
    config = TrainConfig(**RECIPE, seed=run)
    poisoned = materialise(make_attack("label_flip").craft(train, test_set=test, seed=run).apply(train))

    def fit(data, **sanitizer_options) -> tuple[torch.nn.Module, Sanitizer | None]:
        torch.manual_seed(config.seed)
        model = make_model("cnn", 10, 1, 32)
        sanitizer = Sanitizer(model, data, num_classes=10, seed=config.seed, verbose=False,
                              **sanitizer_options) if sanitizer_options else None
        train_classifier(model, data, config, sanitizer=sanitizer)
        return model, sanitizer

    out = {"clean": test_errors(fit(train)[0], test), "undefended": test_errors(fit(poisoned)[0], test),
           "drop": test_errors(fit(poisoned, warmup=4, every=4)[0], test),
           "drop-every-2": test_errors(fit(poisoned, warmup=2, every=2)[0], test),
           "unlearn": test_errors(fit(poisoned, warmup=4, every=4, action="unlearn")[0], test)}
    relabelled = materialise(poisoned)
    flagged_at_4: list[np.ndarray] = []

    def relabel(s, epoch, candidates, emb, selection):
        if epoch != 4:
            return None
        features = gradient_embeddings(s.model, relabelled, embedding="features").numpy()
        y = relabelled.labels.numpy()
        flagged, _, _ = mislabelled(features, y, k=K)
        at = np.flatnonzero(flagged)
        relabelled.labels[torch.from_numpy(at)] = torch.from_numpy(neighbour_plurality(features, y)[at])
        flagged_at_4.append(at)
        return None

    out["relabel"] = test_errors(fit(relabelled, warmup=4, every=4, audit=True, round_hooks=[relabel])[0], test)
    out["relabel+retrain"] = test_errors(fit(relabelled)[0], test)
    keep = torch.from_numpy(np.setdiff1d(np.arange(len(poisoned)), flagged_at_4[0] if flagged_at_4 else []))
    out["drop+retrain"] = test_errors(fit(ImageTensorDataset(poisoned.images[keep], poisoned.labels[keep], None,
                                                             10))[0], test)
    out["clean minus the flagged"] = test_errors(fit(ImageTensorDataset(train.images[keep], train.labels[keep],
                                                                        None, 10))[0], test)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train, test = load_digits_split()
    train = train.without_transform()
    rows = [one_run(run, train, test) for run in range(args.runs)]
    print(f"| arm | test errors per run (of {len(test)}) | total |\n|---|---|---|")
    for arm in rows[0]:
        print(f"| {arm} | {' / '.join(str(r[arm]) for r in rows)} | {sum(r[arm] for r in rows)} |")


if __name__ == "__main__":
    main()
