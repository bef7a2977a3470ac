"""Speed of the density pass, its growth to 1M examples, and EPIC side by side.

    python -m benchmarks.density_speed                     # 50k x 256, 10 classes, + EPIC on the same data
    python -m benchmarks.density_speed --scaling           # 50k .. 1M examples, time and peak memory
    python -m benchmarks.density_speed --scaling --sizes 1000000   # one size only

Each size runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own.
benchmarks/scale.py measures the 1M layouts (10 x 100k, 1,000 x 1k) with recall, the factored kNN of
last-layer gradients, and a side-by-side faiss-flat vs auto round (benchmarks/results/scale.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def synthetic_embeddings(n: int, dim: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gradient-like embeddings: per class five clusters plus 1% scattered points."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = np.empty((n, dim), dtype=np.float32)
    for c in range(classes):
        idx = np.flatnonzero(y == c)
        centers = rng.normal(0, 3, (5, dim)).astype(np.float32)
        x[idx] = centers[rng.integers(0, 5, len(idx))] + rng.normal(0, 1, (len(idx), dim)).astype(np.float32)
    scattered = rng.choice(n, n // 100, replace=False)
    x[scattered] = rng.normal(0, 6, (len(scattered), dim))
    return x, y


def measure(policy: str, n: int, dim: int, repeats: int) -> dict:
    from sanitizer import select

    x, y = synthetic_embeddings(n, dim)
    select(x[:2000], y[:2000], policy=policy)  # warm up faiss / BLAS threads
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        sel = select(x, y, policy=policy)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"policy": policy, "n": n, "dim": dim, "seconds": min(times), "cpu_seconds": min(cpu),
            "peak_rss_mib": round(peak_mib),
            "dropped": int((~sel.keep).sum())}


def run_child(policy: str, n: int, dim: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.density_speed", "--child", policy, str(n), str(dim),
                          str(repeats)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaling", action="store_true", help="grow from 50k to 1M examples")
    parser.add_argument("--sizes", default="50000,200000,500000,1000000",
                        help="comma-separated example counts for --scaling")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        policy, n, dim, repeats = args.child
        print(json.dumps(measure(policy, int(n), int(dim), int(repeats))))
        return
    rows = []
    if args.scaling:
        for n in (int(v) for v in args.sizes.split(",")):
            rows.append(run_child("density", n, args.dim, 1))
            print(rows[-1], flush=True)
    else:
        # EPIC runs on its own 10-dim logit embeddings; ours on D = --dim and on the same 10 dims.
        for policy, dim in (("density", args.dim), ("density", 10), ("epic-0.1", 10)):
            rows.append(run_child(policy, 50_000, dim, 3 if policy == "density" else 1))
            print(rows[-1], flush=True)
    print("\n| policy | examples | D | wall s | CPU s (all threads) | peak RSS (MiB) | dropped |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['n']:,} | {r['dim']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} "
              f"| {r['peak_rss_mib']} | {r['dropped']} |")
    if not args.scaling:
        d = next(r for r in rows if r["policy"] == "density" and r["dim"] == 10)
        e = next(r for r in rows if r["policy"] == "epic-0.1")
        print(f"D=10: epic-0.1 / density: wall {e['seconds'] / d['seconds']:.1f}x, "
              f"CPU {e['cpu_seconds'] / d['cpu_seconds']:.1f}x")


if __name__ == "__main__":
    main()
