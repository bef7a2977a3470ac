"""Scale of the density round: 50k x 256, and 1M examples as 10 x 100k or 1,000 x 1,000; and the
factored kNN of last-layer gradients against sketch + faiss.

    python -m benchmarks.scale                          # the density round at 50k, 10 x 100k, 1,000 x 1,000
    python -m benchmarks.scale --configs 50k            # one configuration (see CONFIGS)
    python -m benchmarks.scale --data clusters          # the isotropic-cluster data of density_speed.py
    python -m benchmarks.scale --extrapolate            # 10M from measured points (layouts 10 x n, 1,000 x n)
    python -m benchmarks.scale --factored               # factored kNN vs sketch + faiss (one thread)
    python -m benchmarks.scale --policy-round --threads 1  # the policy's select, factored vs explicit rows
    python -m benchmarks.scale --compare-backends --threads 1   # 50k round: faiss flat vs auto, side by side
    python -m benchmarks.scale --rerank --threads 2     # re-ranking graph candidates: faiss vs torch, side by side

Each configuration runs in a fresh subprocess, so its peak resident memory (ru_maxrss, which includes
the input embeddings and the interpreter with torch and faiss) is its own. Wall and CPU seconds are
printed side by side with their ratio to the 50k row of the same run (the machine is shared; compare
ratios, not absolute times across runs). Recall@k is measured on a sample of queries of the largest
class: a returned neighbour counts when its exact distance is within the true k-th distance (ties).

Data (``--data``):

- ``gradient`` (default): last-layer gradients (softmax(z) − onehot(y)) ⊗ [h; 1] of a simulated network
  (class means + a rank-8 latent, ReLU features, 1 % flipped labels), rotated or Kronecker-sketched to D,
  as ``gradient_embeddings`` makes them;
- ``clusters``: the isotropic Gaussian clusters of ``benchmarks/density_speed.py`` (intrinsic dimension
  = D: the worst case for any approximate index).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

CONFIGS = {  # name: (examples, classes)
    "50k": (50_000, 10),
    "1m-10x100k": (1_000_000, 10),
    "1m-1000x1k": (1_000_000, 1_000),
}


def gradient_like(n: int, classes: int, dim: int = 256, rank: int = 8, flip: float = 0.01, seed: int = 0,
                  scale: float = 0.2, factors: bool = False, chunk: int = 65_536, width: int | None = None):
    """Synthetic last-layer gradient embeddings ``[n, dim]`` float32 and labels; with ``factors=True``
    also ``e [n, C]`` and ``h1 [n, d+1]`` (so that row i is e_i ⊗ h1_i before the rotation/sketch).
    ``width``: the simulated network's penultimate width d (default: what fits ``dim`` unsketched)."""
    from sanitizer.sketch import KroneckerSketch

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    d1 = width + 1 if width else max(2, dim // classes) if 2 * classes <= dim else 16  # features and the 1
    d = d1 - 1
    y_true = np.arange(n) % classes
    y = y_true.copy()
    flipped = rng.choice(n, int(flip * n), replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, classes, len(flipped))) % classes
    means = torch.from_numpy(rng.normal(0, 1.5, (classes, d))).float()
    mix = torch.from_numpy(rng.normal(0, 1, (rank, d)) / np.sqrt(rank)).float()
    # logits grow like d (h · class mean): rescale so a wide network is about as confident as the d = 24 one
    logit_scale = scale * (24 / d if width else 1.0)
    weight = torch.from_numpy(rng.normal(0, 1, (d, classes))).float() + means.T
    if classes * d1 <= dim:  # explicit outer product, rotated into dim coordinates (distances kept)
        sketch = None
        rotation = torch.linalg.qr(torch.randn(dim, classes * d1, generator=gen))[0].T.contiguous()
    else:
        sketch = KroneckerSketch(classes, d1, dim, seed)
        dim = sketch.out_dim  # the sketch's own size (a multiple of its class factor's)
    out = np.empty((n, dim), dtype=np.float32)
    es, hs = [], []
    for s in range(0, n, chunk):
        yt, yy = torch.from_numpy(y_true[s:s + chunk]), torch.from_numpy(y[s:s + chunk])
        z = torch.randn(len(yt), rank, generator=gen)
        h = torch.relu(means[yt] + z @ mix + 0.3 * torch.randn(len(yt), d, generator=gen))
        temperature = torch.exp(0.5 * torch.randn(len(yt), 1, generator=gen))
        e = torch.softmax(h @ weight * temperature * logit_scale, 1) - torch.nn.functional.one_hot(yy, classes).float()
        h1 = torch.cat([h, torch.ones(len(h), 1)], 1)
        emb = (e[:, :, None] * h1[:, None, :]).reshape(len(e), -1) @ rotation if sketch is None else sketch(e, h1)
        out[s:s + len(emb)] = emb.numpy()
        if factors:
            es.append(e)
            hs.append(h1)
    if factors:
        return out, y, torch.cat(es).numpy(), torch.cat(hs).numpy()
    return out, y


def make_data(data: str, n: int, classes: int, dim: int, width: int | None = None):
    if data == "gradient":
        return gradient_like(n, classes, dim, width=width)
    from benchmarks.density_speed import synthetic_embeddings

    return synthetic_embeddings(n, dim, classes)


def recall_at_k(x: np.ndarray, k: int, queries: int = 1000, seed: int = 0) -> tuple[float, str]:
    """Recall@k of ``knn(x, k)`` (the policy's call) against brute force on a sample of query rows."""
    from sanitizer.neighbors import deduplicate, knn

    x, _ = deduplicate(x)
    n = len(x)
    _, idx = knn(x, k)
    q = np.random.default_rng(seed).choice(n, min(n, queries), replace=False)
    data = torch.from_numpy(x)
    d2 = torch.cdist(data[q], data).square_()
    d2[torch.arange(len(q)), torch.from_numpy(q)] = float("inf")
    kth = torch.topk(d2, k, dim=1, largest=False).values[:, -1:]
    got = torch.gather(d2, 1, torch.from_numpy(idx[q]))
    return float((got <= kth * (1 + 1e-5) + 1e-12).float().mean()), "approximate" if n > 30_000 else "exact"


def measure(data: str, n: int, classes: int, dim: int, threads: int, recall: bool, width: int | None = None) -> dict:
    import faiss

    from sanitizer import select

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    x, y = make_data(data, n, classes, dim, width)
    input_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    select(x[:2000], y[:2000] % 2, policy="density")  # warm up faiss / BLAS threads
    t0, c0 = time.perf_counter(), time.process_time()
    sel = select(x, y, policy="density")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    label = data if width is None else f"{data}, width {width}"
    row = {"data": label, "n": n, "classes": classes, "dim": dim, "threads": threads, "seconds": wall,
           "cpu_seconds": cpu, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "rss_before_round_mib": round(input_rss), "dropped": int((~sel.keep).sum())}
    if recall:
        largest = np.bincount(y).argmax()
        row["recall_at_10"], row["search"] = recall_at_k(np.ascontiguousarray(x[y == largest]), 10)
    return row


def compare_backends(data: str, n: int, classes: int, dim: int, threads: int, repeats: int = 3) -> None:
    """The density round with faiss's flat index (the CPU default before) and with ``auto`` (the torch
    kernel below ivf_threshold), interleaved in one process, best of ``repeats``."""
    import faiss

    from sanitizer import select

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    x, y = make_data(data, n, classes, dim)
    select(x[:2000], y[:2000] % 2, policy="density")
    best = {"faiss": (np.inf, np.inf), "auto": (np.inf, np.inf)}
    keeps = {}
    for _ in range(repeats):
        for backend in best:
            t0, c0 = time.perf_counter(), time.process_time()
            keeps[backend] = select(x, y, policy="density", backend=backend).keep
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[backend] = (min(best[backend][0], wall), min(best[backend][1], cpu))
    (fw, fc), (aw, ac) = best["faiss"], best["auto"]
    print(f"{data} {n:,} x {dim}, {classes} classes, {threads} thread(s), best of {repeats}: faiss flat {fw:.2f} s "
          f"wall / {fc:.2f} CPU s, auto {aw:.2f} s wall / {ac:.2f} CPU s: faiss / auto = {fw / aw:.1f}x wall, "
          f"{fc / ac:.1f}x CPU; same keep mask: {np.array_equal(keeps['faiss'], keeps['auto'])}")


def run_child(*args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_rows(rows: list[dict]) -> None:
    base = rows[0]
    print("\n| data | examples | classes x per class | threads | wall s | CPU s | wall / first row | peak RSS MiB "
          "| RSS before the round MiB | recall@10 (largest class) | dropped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rec = f"{r['recall_at_10']:.3f} ({r['search']})" if "recall_at_10" in r else "-"
        print(f"| {r['data']} | {r['n']:,} | {r['classes']:,} x {r['n'] // r['classes']:,} | {r['threads']} "
              f"| {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['seconds'] / base['seconds']:.1f}x "
              f"| {r['peak_rss_mib']:,} | {r['rss_before_round_mib']:,} | {rec} | {r['dropped']:,} |")


def extrapolate(rows: list[dict], target: int) -> None:
    """Fit time = a·n^b (log-log least squares) and RSS = c + m·n (linear) per layout; print them at ``target``."""
    print(f"\nExtrapolation to {target:,} examples (fits over the measured rows of each layout):")
    for classes in sorted({r["classes"] for r in rows}):
        pts = sorted((r for r in rows if r["classes"] == classes), key=lambda r: r["n"])
        if len(pts) < 2:
            continue
        n = np.array([r["n"] for r in pts], dtype=float)
        cpu = np.array([r["cpu_seconds"] for r in pts])
        rss = np.array([r["peak_rss_mib"] for r in pts], dtype=float)
        b, log_a = np.polyfit(np.log(n), np.log(cpu), 1)
        m, c = np.polyfit(n, rss, 1)
        print(f"- {classes:,} classes, n = {', '.join(f'{v:,.0f}' for v in n)}: CPU s = {np.exp(log_a):.3g}·n^{b:.2f} "
              f"-> {np.exp(log_a) * target ** b:,.0f} CPU s at {target:,}; peak RSS = {c:,.0f} MiB + "
              f"{m * 1e6:,.0f} MiB per 1M examples -> {(c + m * target) / 1024:,.1f} GiB")


# -- factored kNN vs sketch + faiss ------------------------------------------------------------------
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (no tie correction): how well the sketch keeps the order of the isolation scores."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def policy_round(threads: int, n: int = 50_000, classes: int = 10, d1: int = 81, repeats: int = 3) -> None:
    """The density policy's select on explicit last-layer rows (CIFAR-10 from scratch: 10 classes, 80 features
    + bias): the factored path it now takes against the explicit kNN (``backend="torch"``, the same exact
    kernel on the C·(d+1) rows), interleaved, best of ``repeats``."""
    from sanitizer import make_policy

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    h = torch.relu(torch.randn(n, d1 - 1, generator=g) + 0.3)
    z = h @ torch.randn(d1 - 1, classes, generator=g) / (d1 - 1) ** 0.5 + 3 * torch.nn.functional.one_hot(labels)
    e = torch.softmax(z, 1) - torch.nn.functional.one_hot(labels, classes)
    x = (e[:, :, None] * torch.cat([h, torch.ones(n, 1)], 1)[:, None, :]).reshape(n, -1).numpy()
    y = labels.numpy()
    best: dict[str, float] = {}
    keep = {}
    for _ in range(repeats):
        for name, backend in (("factored (auto)", "auto"), ("explicit (torch exact)", "torch")):
            t0 = time.perf_counter()
            keep[name] = make_policy("density", backend=backend).select(x, y, num_classes=classes).keep
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    print(f"density select, {n:,} x {x.shape[1]} explicit last-layer rows, {classes} classes, {threads} thread(s), "
          f"best of {repeats}:")
    for name, seconds in best.items():
        print(f"  {name}: {seconds:.2f} s")
    print(f"  explicit / factored: {best['explicit (torch exact)'] / best['factored (auto)']:.2f}x; "
          f"same keep mask: {bool(np.array_equal(*keep.values()))}")


def factored_vs_sketch(sizes, classes_list, dims, max_dim: int, k: int = 10) -> None:
    import faiss

    from sanitizer.neighbors import exact_knn_blocked, knn_factored
    from sanitizer.sketch import KroneckerSketch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    print("One thread (torch.set_num_threads(1), faiss.omp_set_num_threads(1)); one class of n points; "
          f"sketch to max_dim={max_dim} when C·(d+1) > max_dim, as gradient_embeddings does. CPU seconds. "
          "Recall and Spearman compare the kNN of the (sketched) embedding with the exact factored kNN: "
          "recall@10 of the neighbour sets, Spearman of the isolation scores (mean distance to the 10 NN).\n")
    print("| n | C | d+1 | explicit C·(d+1) | embedding D | sketch + faiss flat s | sketch + torch exact s "
          "| factored s | faiss / factored | torch / factored | recall@10 of the sketch | Spearman of isolation |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for classes in classes_list:
            for d1 in dims:
                g = torch.Generator().manual_seed(0)
                h = torch.relu(torch.randn(n, d1 - 1, generator=g) + 0.3)
                h1 = torch.cat([h, torch.ones(n, 1)], 1)
                z = h @ torch.randn(d1 - 1, classes, generator=g) / (d1 - 1) ** 0.5
                e = torch.softmax(z, 1) - torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), classes)
                t0 = time.process_time()
                if classes * d1 <= max_dim:
                    emb = (e[:, :, None] * h1[:, None, :]).reshape(n, -1)
                else:
                    emb = KroneckerSketch(classes, d1, max_dim, 0)(e, h1)
                t_embed = time.process_time() - t0
                x = np.ascontiguousarray(emb.numpy())
                t0 = time.process_time()
                index = faiss.IndexFlatL2(x.shape[1])
                index.add(x)
                index.search(x, k + 1)
                t_faiss = t_embed + time.process_time() - t0
                t0 = time.process_time()
                sketch_d2, sketch_idx = exact_knn_blocked(emb, k)
                t_torch = t_embed + time.process_time() - t0
                t0 = time.process_time()
                dist, idx = knn_factored(e, h1, k)
                t_fact = time.process_time() - t0
                recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(sketch_idx.numpy(), idx)])
                rho = spearman(sketch_d2.sqrt().mean(1).numpy(), dist.mean(1))
                print(f"| {n:,} | {classes:,} | {d1:,} | {classes * d1:,} | {x.shape[1]:,} | {t_faiss:.2f} "
                      f"| {t_torch:.2f} | {t_fact:.2f} | {t_faiss / t_fact:.1f}x | {t_torch / t_fact:.1f}x "
                      f"| {recall:.3f} | {rho:.3f} |", flush=True)


def compare_rerank(n: int, dim: int, threads: int, repeats: int = 2) -> None:
    """The HNSW path's re-ranking of 16 graph candidates per row on one n-row class of gradient data: faiss's
    flat-index distances (the library) against the torch gather (without faiss), interleaved in one process."""
    import faiss

    from sanitizer import neighbors

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    x, y = make_data("gradient", 2 * n, 2, dim, None)
    rows = np.ascontiguousarray(x[y == 0])
    mean, basis = neighbors.pca_projection(rows)
    space = np.ascontiguousarray((rows - mean) @ basis)
    graph = faiss.IndexHNSWFlat(space.shape[1], neighbors.HNSW_M)
    graph.add(space)
    _, candidates = graph.search(space, 16)
    ways = {"faiss": neighbors.rerank, "torch": neighbors._rerank_torch}
    for _ in range(repeats):
        for name, rerank in ways.items():
            t0 = time.perf_counter()
            rerank(rows, candidates, 11)
            print(f"{len(rows)} x {dim}, 16 candidates per row: {name} {time.perf_counter() - t0:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--data", choices=("gradient", "clusters"), default="gradient")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--width", type=int, help="gradient data: the simulated network's penultimate width "
                        "(e.g. 512: rows e ⊗ [h; 1] of C · 513 dims, sketched to --dim as gradient_embeddings does)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch and faiss threads in each child (default: all cores)")
    parser.add_argument("--no-recall", action="store_true", help="skip the recall@10 check (it re-runs one class)")
    parser.add_argument("--extrapolate", action="store_true",
                        help="measure 10 x {40k, 70k, 100k} (all above the exact threshold) and "
                             "1,000 x {250, 500, 1k}; fit 10M")
    parser.add_argument("--policy-round", action="store_true",
                        help="the density policy's select at 50k explicit last-layer rows: factored vs explicit")
    parser.add_argument("--factored", action="store_true", help="factored kNN vs sketch + faiss")
    parser.add_argument("--compare-backends", action="store_true",
                        help="the 50k round with faiss flat and with auto side by side in one process")
    parser.add_argument("--sizes", default="2000,8000", help="class sizes for --factored")
    parser.add_argument("--classes", default="10,100,1000", help="class counts C for --factored")
    parser.add_argument("--feature-dims", default="33,129,513", help="d+1 values for --factored")
    parser.add_argument("--max-dim", type=int, default=2048, help="sketch size for --factored (the default max_dim)")
    parser.add_argument("--rerank", action="store_true", help="re-ranking of graph candidates: faiss vs torch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    if args.policy_round:
        policy_round(args.threads or 1)
        return
    if args.factored:
        ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
        factored_vs_sketch(ints(args.sizes), ints(args.classes), ints(args.feature_dims), args.max_dim)
        return
    if args.rerank:
        compare_rerank(100_000, args.dim, args.threads or 1)
        return
    if args.compare_backends:
        n, classes = CONFIGS["50k"]
        compare_backends(args.data, n, classes, args.dim, args.threads)
        return
    if args.extrapolate:
        plan = [(n, c) for c, sizes in ((10, (40_000, 70_000, 100_000)), (1_000, (250, 500, 1_000)))
                for n in (c * s for s in sizes)]
    else:
        plan = [CONFIGS[name] for name in args.configs.split(",")]
    rows = []
    for n, classes in plan:
        rows.append(run_child(args.data, n, classes, args.dim, args.threads, not args.no_recall, args.width))
        print(json.dumps(rows[-1]), flush=True)
    print_rows(rows)
    if args.extrapolate:
        extrapolate(rows, 10_000_000)


if __name__ == "__main__":
    main()
