"""The label side's gate ratio on harvested rows against a pass, per epoch of recorded runs (issue 12's
cheapest mix: in harvest mode the label side pays for a pass only when the harvested rows' ratio exceeds
``label_pass_trigger``).

Reads ``benchmarks.poisoning --record-signals`` folders, whose epochs hold the eval-mode penultimate
features of every training example (``features``, what a pass sees) and, from epoch 1 on, the features the
training steps themselves produced (``train_features``, what harvest mode sees). For each epoch it prints the
library's gate ratio R (``sanitizer.label_agreement``, k = 20) on both, and whether the trigger would ask for
a pass and the gate (R > 1 on the pass) would open. On the harvested rows it also runs what a large round runs
first (``sanitizer.label_agreement.sampled_gate``: R on 8,192 random examples and its upper 95 % bound; the full
search is skipped when the bound is at most the trigger) and prints its time beside the full search's, measured
in one process one after the other (the ratio is what to read on a shared machine).

    python -m benchmarks.harvested_gate benchmarks/out/signals/cifar10-scratch-full_label_flip_eps16_s1001 \\
        benchmarks/out/signals/cifar10-scratch-full_gradient_matching_eps16_s1001
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from sanitizer.label_agreement import gate_ratio, label_agreement, sampled_gate
from sanitizer.policies.density import DensityPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="--record-signals folders")
    defaults = DensityPolicy()  # the library's k, trigger and gate
    parser.add_argument("--k", type=int, default=defaults.label_k)
    args = parser.parse_args()
    trigger, gate = defaults.label_pass_trigger, defaults.label_gate
    print(f"trigger {trigger}, gate {gate}, k {args.k}\n")
    print("| run | epoch | R on the pass | R on harvested rows | pass asked for | gate opens on the pass | "
          "sampled R (upper bound) | full search skipped | seconds: sample / full search |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        labels = np.load(run / "labels.npy")
        for path in sorted(run.glob("epoch*.npz"), key=lambda p: int(p.stem[5:])):
            if ".partial" in path.name:
                continue
            with np.load(path, allow_pickle=False) as f:
                if "train_features" not in f.files:
                    continue
                passed, harvested = f["features"].astype(np.float32), f["train_features"].astype(np.float32)
            r_pass = gate_ratio(label_agreement(passed, labels, args.k))
            t0 = time.perf_counter()
            r_harvest = gate_ratio(label_agreement(harvested, labels, args.k))
            t1 = time.perf_counter()
            estimate = sampled_gate(harvested, labels, args.k)
            t2 = time.perf_counter()
            sampled = "–" if estimate is None else \
                f"{estimate[2]['gate_ratio']:.3f} ({estimate[2]['gate_ratio_upper']:.3f})"
            skipped = estimate is not None and estimate[2]["gate_ratio_upper"] <= trigger
            print(f"| {run.name} | {path.stem[5:]} | {r_pass:.3f} | {r_harvest:.3f} | "
                  f"{'yes' if r_harvest > trigger else 'no'} | {'yes' if r_pass > gate else 'no'} | {sampled} | "
                  f"{'yes' if skipped else 'no'} | {t2 - t1:.2f} / {t1 - t0:.2f} |", flush=True)


if __name__ == "__main__":
    main()
