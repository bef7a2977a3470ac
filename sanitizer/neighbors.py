"""k-nearest-neighbour search within a class and the isolation score built on it.

Backends (``backend="auto"`` picks the first that applies):

- ``faiss-gpu``: a faiss GPU index, when faiss was built with CUDA and a GPU is present;
- ``torch``: exact blockwise matmul + top-k (on the GPU when there is one, else on the CPU);
- ``faiss``: faiss on the CPU: an exact flat index up to ``ivf_threshold`` points, an approximate
  index above (HNSW by default, ``approximate="ivf"`` for the inverted-file index).

``auto`` without a GPU searches exactly with the ``torch`` kernel up to ``ivf_threshold`` points
(it is faster than faiss's flat index on the CPU: see ``benchmarks/results/scale.md``) and with the
approximate faiss index above. Memory is O(n·k) for the results plus one block of queries; never O(n²).

:func:`knn_factored` is the exact search for last-layer gradients given as their factors
``e ⊗ h``: it never forms the ``C·(d+1)`` outer products and costs ``C + d + 1`` per pair.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from sanitizer.errors import SanitizerError

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a dependency; this keeps the torch path usable
    faiss = None

BACKENDS = ("auto", "faiss", "faiss-gpu", "torch")
# Above this many points per class the CPU search is approximate: exact search is O(n²) per class
EXACT_LIMIT = 30_000
APPROXIMATE = ("hnsw", "ivf", "clusters")


TINY_RELATIVE = 2.0 ** -50  # entries below this share of the largest one are set to 0 (see flush_tiny)


def flush_tiny(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the entries below :data:`TINY_RELATIVE` times its largest magnitude set to 0 (a new tensor
    when any is; else ``x`` itself).

    Confident predictions make softmax − onehot entries of 1e-20 and less, and their products in a distance
    matmul fall below float32's normal range: subnormal arithmetic is 50–90× slower on x86 CPUs (a 50k round
    took 24 CPU s instead of ~2; ``benchmarks/results/scale.md``). Such entries change no distance: each
    contributes under 2^-100 of the largest squared entry, far below float32's resolution. The products of the
    entries kept stay normal as long as the largest magnitude is above ~1e-4.
    """
    if x.numel() == 0 or not x.is_floating_point():
        return x
    size = x.abs()
    small = (size < float(size.max()) * TINY_RELATIVE) & (size > 0)
    return x.masked_fill(small, 0.0) if bool(small.any()) else x


def check_backend(backend: str) -> str:
    """``backend`` if it names a kNN backend (:data:`BACKENDS`); policies check it when they are built."""
    if backend not in BACKENDS:
        raise SanitizerError(f"unknown kNN backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str = "auto") -> str:
    check_backend(backend)
    gpu = torch.cuda.is_available()
    faiss_gpu = faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if backend == "auto":
        return "faiss-gpu" if (gpu and faiss_gpu) else "torch" if gpu else "faiss" if faiss is not None else "torch"
    if backend == "faiss-gpu" and not faiss_gpu:
        raise RuntimeError("backend='faiss-gpu' needs faiss with CUDA support (pip install 'sanitizer[gpu]')")
    if backend == "faiss" and faiss is None:
        raise RuntimeError("backend='faiss' needs faiss-cpu (pip install faiss-cpu)")
    return backend


def knn(x: np.ndarray, k: int, backend: str = "auto", ivf_threshold: int = EXACT_LIMIT,
        nprobe: int = 16, seed: int = 0, approximate: str = "hnsw",
        queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances and indices of the ``k`` nearest *other* points of each row of ``x``.

    Returns ``(dist [n, k], idx [n, k])`` sorted by distance. Requires ``k < n``. With ``queries`` (row
    indices) only those rows' neighbours are returned (``[len(queries), k]``, among all rows): the k-means
    lists then search only those rows (a cost in proportion); the other paths search every row. Above
    ``ivf_threshold`` points the CPU faiss path is approximate: ``approximate="hnsw"`` (default;
    every answer's recall@k is checked on a sample and must reach 0.95, else the rows are searched exactly;
    ``benchmarks/scale.py``), ``"clusters"`` (k-means lists searched by blocks of matmul, checked the same
    way; falls back to HNSW, then to exact search; faster than HNSW on the penultimate features of a
    trained network, whose classes make compact lists, up to :data:`CLUSTER_MAX_ROWS` rows, HNSW above) or
    ``"ivf"`` (``nprobe`` lists, unchecked). The rows of a graph's or the lists' answer whose neighbours lie
    unusually far are searched again exactly (:func:`repair_tail`).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not x.flags.writeable:  # torch warns on read-only arrays (np.load with mmap, frozen views)
        x = x.copy()
    x = flush_tiny(torch.from_numpy(x)).numpy()
    n = len(x)
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    if approximate not in APPROXIMATE:
        raise ValueError(f"unknown approximate index {approximate!r}; choose one of {APPROXIMATE}")
    rows = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    requested, backend = backend, resolve_backend(backend)
    graph = backend == "faiss" and n > ivf_threshold and approximate in ("hnsw", "clusters")
    lists = graph and approximate == "clusters" and n <= CLUSTER_MAX_ROWS
    found = _knn_clusters(x, k + 1, seed, queries) if lists else None
    if graph and found is None:
        found = _knn_hnsw(x, k + 1, seed)
        found = found if found is None or queries is None else (found[0][rows], found[1][rows])
    if graph and found is None and n > EXACT_WARN_ROWS:
        warnings.warn(f"no approximate index reached recall@{k} ≥ {RECALL_FLOOR} on these {n} rows (of "
                      f"{x.shape[1]} dimensions; rows of high intrinsic dimension do this): searching them exactly, "
                      "which is quadratic and can take minutes. Lower the dimension of the embedding (max_dim) "
                      "to make the rows searchable", stacklevel=2)
    # exact: the torch kernel, small classes, or rows no graph searches reliably (O(n²), but right)
    if backend == "torch" or (requested == "auto" and backend == "faiss" and n <= ivf_threshold) or \
            (graph and found is None):
        d2, idx = exact_knn_blocked(torch.from_numpy(x), k)
        return np.sqrt(d2.numpy())[rows], idx.numpy()[rows]
    if graph:
        d2, idx = repair_tail(x, *found, rows)
    else:
        d2, idx = _knn_faiss(x, k + 1, backend == "faiss-gpu", ivf_threshold, nprobe, seed)
        d2, idx = d2[rows], idx[rows]
    return _drop_self(d2, idx, k, rows)


TAIL_Z = 2.5  # rows of an approximate answer whose neighbours are this far out (robust z) are searched exactly
# ... at most this many distance entries' worth of them (rows × all rows), farthest first: the re-search is
# exact, so its cost is quadratic (2,100 rows of a million, a few seconds; every tail row of a 200k round)
TAIL_MAX_ENTRIES = 1 << 31


def repair_tail(x: np.ndarray, d2: np.ndarray, idx: np.ndarray,
                rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An approximate answer ``(d2, idx)`` (self included, ``[len(rows), k]``) with the rows of its upper tail
    searched again exactly: those whose mean neighbour distance has a robust z (of its logarithm) above
    :data:`TAIL_Z`, and those with missing neighbours.

    Why: a graph can strand a row, handing it neighbours far beyond its true ones, and stranded rows are
    isolated ones more often than not, which is exactly the tail an isolation score flags. The sampled recall
    check cannot see this (a random sample is mostly the dense bulk): on a 40,002-row class of synthetic gradient
    rows 15 of the 16 rows flagged at z > 3.5 from the graph's answer were flagged because of the graph alone
    (``benchmarks/results/scale.md``, eleventh session). An approximate distance is never below the exact one,
    so every row whose exact score crosses a cut at or above :data:`TAIL_Z` is among those re-searched, up to
    :data:`TAIL_MAX_ENTRIES` (rows with missing neighbours first, then the farthest out)."""
    rows = np.arange(len(d2)) if rows is None else np.asarray(rows, dtype=np.int64)
    mean = np.sqrt(np.maximum(d2, 0)).mean(1)
    missing = (idx < 0).any(1) | ~np.isfinite(mean)
    z = robust_zscore(np.log(np.where(missing, 1.0, mean) + 1e-12))
    z[missing] = np.inf
    tail = np.flatnonzero(z > TAIL_Z)
    if not len(tail):
        return d2, idx
    tail = tail[np.argsort(-z[tail], kind="stable")][:max(1, TAIL_MAX_ENTRIES // len(x))]
    exact_d2, exact_idx = exact_knn_of_rows(torch.from_numpy(x), rows[tail], d2.shape[1])
    d2, idx = d2.copy(), idx.copy()
    d2[tail], idx[tail] = exact_d2.numpy(), exact_idx.numpy()
    return d2, idx


def _drop_self(d2: np.ndarray, idx: np.ndarray, k: int,
               rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Remove each point (row ``rows[i]`` of the data, default ``i``) from its own neighbour list (it may not
    come first when there are ties)."""
    n = len(idx)
    rows = np.arange(n) if rows is None else rows
    is_self = idx == rows[:, None]
    # Rows where self was not returned (approximate search): drop the last column instead.
    missing = ~is_self.any(1)
    is_self[missing, -1] = True
    keep = ~is_self
    d2 = d2[keep].reshape(n, k)
    idx = idx[keep].reshape(n, k)
    return np.sqrt(np.maximum(d2, 0.0)), idx


@functools.lru_cache(maxsize=1)
def _gpu_resources():  # pragma: no cover - needs faiss-gpu
    """One set of faiss GPU resources (scratch memory, streams) for the process, not one per class per round."""
    return faiss.StandardGpuResources()


def _knn_faiss(x: np.ndarray, k: int, gpu: bool, ivf_threshold: int, nprobe: int, seed: int):
    n, d = x.shape
    if n <= ivf_threshold:
        index = faiss.IndexFlatL2(d)
    else:
        # sqrt(n) lists keep k-means training cheap; nprobe lists are searched per query.
        nlist = int(np.sqrt(n))
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        train = x[np.random.default_rng(seed).choice(n, min(n, 40 * nlist), replace=False)]
        index.train(train)
        index.nprobe = nprobe
    if gpu:  # pragma: no cover - needs faiss-gpu
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    index.add(x)
    d2, idx = index.search(x, k)
    return d2, idx


# -- approximate search for large classes: HNSW, on a PCA projection when it keeps the variance ----
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 12, 32, 24  # every answer is recall-checked (see _knn_hnsw)
# efSearch is widened by these factors before the graph gives up: the exact fallback is quadratic, and on a
# million rows it takes tens of minutes where a wider graph search takes seconds
HNSW_EF_FACTORS = (1, 2, 4, 8)
PCA_ENERGY = 0.995  # variance an HNSW graph on a projection must keep; else it is built on x itself


def pca_projection(x: np.ndarray, energy: float = PCA_ENERGY, sample: int = 20_000, seed: int = 0,
                   max_fraction: float = 0.5, multiple: int = 16) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, basis [D, m])`` of the fewest principal directions (a multiple of ``multiple``) that
    keep ``energy`` of the variance of ``x`` (estimated on ``sample`` rows), or None when that takes
    more than ``max_fraction`` of the dimensions (then projecting saves too little)."""
    n, dim = x.shape
    rows = torch.from_numpy(x[np.random.default_rng(seed).choice(n, min(n, sample), replace=False)]).double()
    mean = rows.mean(0)
    centred = rows - mean
    covariance = centred.T @ centred / max(len(rows) - 1, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a D × D eigh takes ms on one thread, seconds on several of a busy machine's cores
    try:
        values, vectors = torch.linalg.eigh(covariance)
    finally:
        torch.set_num_threads(threads)
    values, vectors = values.flip(0).clamp_min(0).numpy(), vectors.flip(1).numpy()
    total = values.sum()
    if total <= 0:
        return None
    m = int(np.searchsorted(np.cumsum(values) / total, energy) + 1)
    m = min(dim, -(-m // multiple) * multiple)
    if m > max_fraction * dim:
        return None
    return mean.numpy().astype(np.float32), np.ascontiguousarray(vectors[:, :m], dtype=np.float32)


RAW_GRAPH_MAX_DIM = 128  # no graph on more raw dimensions than this (no PCA summary): exact search instead
RECALL_FLOOR, RECALL_SAMPLE = 0.95, 256  # an approximate answer is used only if its sampled recall@k reaches this


def _knn_hnsw(x: np.ndarray, k: int, seed: int, chunk: int = 65_536):
    """Approximate ``k`` nearest neighbours (self included) from a faiss HNSW graph, or None when the
    graph's answer cannot be trusted (then the caller searches exactly).

    The graph is built on a PCA projection when one keeps :data:`PCA_ENERGY` of the variance in at most
    half the dimensions (then ``k + max(5, k // 2)`` candidates are re-ranked with exact distances in the
    full space), else on ``x`` itself up to :data:`RAW_GRAPH_MAX_DIM` dimensions. Every answer is checked:
    its recall@k on :data:`RECALL_SAMPLE` rows searched exactly must reach :data:`RECALL_FLOOR`, first at
    the default ``efSearch``, then at 2, 4 and 8 times it (:data:`HNSW_EF_FACTORS`; searching wider costs far
    less than the exact search that follows a failure); else None. Rows of high intrinsic dimension fail it (an
    isotropic 100k × 256 class: recall 0.36, ``benchmarks/results/scale.md``); penultimate features of a
    trained network pass it (CIFAR-10, 50k × 80: 0.98 at half the exact search's time)."""
    n, dim = x.shape
    projection = pca_projection(x, seed=seed) if dim >= 64 else None
    if projection is None and dim > RAW_GRAPH_MAX_DIM:
        return None
    if projection is None:
        space, wanted = x, k
    else:
        mean, basis = projection
        space = np.empty((n, basis.shape[1]), dtype=np.float32)
        for s in range(0, n, chunk):
            space[s:s + chunk] = (x[s:s + chunk] - mean) @ basis
        wanted = min(n, k + max(5, k // 2))
    index = faiss.IndexHNSWFlat(space.shape[1], HNSW_M)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(space)
    for factor in HNSW_EF_FACTORS:
        index.hnsw.efSearch = factor * max(HNSW_EF_SEARCH, wanted)
        d2, idx = index.search(space, wanted)
        if projection is not None:
            d2, idx = rerank(x, idx, k)
        if sampled_recall(x, idx, seed=seed) >= RECALL_FLOOR:
            return d2, idx
    return None


CLUSTER_PROBE_SHARE = 0.125  # lists each list's members are searched against (share of all lists), first try
CLUSTER_MAX_COST = 0.25  # pairs computed, as a share of the n² of an exact search: above it, not worth it
# The lists compute ~n²/8 pairs, a graph ~n log n: on CIFAR-10 features the lists are faster up to about
# 100k rows (one thread: 4.8 vs 7.9 s at 70k, 10.6 vs 12.7 s at 100k), the graph beyond.
CLUSTER_MAX_ROWS = 100_000
EXACT_WARN_ROWS = 100_000  # an exact fallback above this many rows takes minutes: say so


def _knn_clusters(x: np.ndarray, k: int, seed: int,
                  queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Approximate ``k`` nearest neighbours (self included) by k-means lists: the members of each of the
    √n lists are searched exactly (one matmul and top-k) against the members of the lists whose centroids
    are nearest its own (an eighth, then a quarter of the lists). The answer is checked as the graph's is (recall@k on
    :data:`RECALL_SAMPLE` rows ≥ :data:`RECALL_FLOOR`); None when it fails, or when the lists are so
    unequal that the search would compute more than :data:`CLUSTER_MAX_COST` of all pairs (rows of high
    intrinsic dimension, or a mass of identical rows such as the zero gradients of confidently fit
    examples). On CIFAR-10's penultimate features (50k × 80) it takes two thirds of the graph's time at a
    higher recall (0.98 against 0.97; ``benchmarks/label_search.py``). With ``queries`` only those rows are
    searched (and checked), and only their ``[len(queries), k]`` answers are returned."""
    n, dim = x.shape
    asked = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    is_query = np.zeros(n, dtype=bool)
    is_query[asked] = True
    nlist = max(2, int(np.sqrt(n)))
    sample = x[np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)]
    kmeans = faiss.Kmeans(dim, nlist, niter=10, seed=seed, max_points_per_centroid=64)
    kmeans.train(sample)
    assign = kmeans.index.search(x, 1)[1][:, 0]
    counts = np.bincount(assign, minlength=nlist)
    between = torch.cdist(torch.from_numpy(kmeans.centroids), torch.from_numpy(kmeans.centroids))
    between.fill_diagonal_(-1.0)  # each list searches its own members first
    nearest = torch.argsort(between, dim=1).numpy()
    order = np.argsort(assign, kind="stable")
    start = np.concatenate([[0], np.cumsum(counts)])
    rows = torch.from_numpy(x[order])
    sq = (rows * rows).sum(1)
    query_sorted = is_query[order]
    base = max(2, int(np.ceil(CLUSTER_PROBE_SHARE * nlist)))
    for nprobe in (base, 2 * base):
        probes = nearest[:, :nprobe]
        reach = counts[probes].sum(1)
        if (counts * reach).sum() > CLUSTER_MAX_COST * n * n or reach[counts > 0].min() < k:
            return None
        d2 = torch.full((n, k), float("inf"))
        idx = torch.zeros(n, k, dtype=torch.int64)
        for c in np.flatnonzero(counts):
            members = np.arange(start[c], start[c + 1])
            members = torch.from_numpy(members[query_sorted[members]])
            if not len(members):
                continue
            cand = torch.from_numpy(np.concatenate([np.arange(start[p], start[p + 1]) for p in probes[c]]))
            pad = -len(cand) % GROUP
            cols = _padded(rows[cand], pad)
            g = torch.addmm(_padded(sq[cand], pad, float("inf"))[None], rows[members], cols.T, alpha=-2)
            val, pos = _smallest_k(g, k)
            d2[members] = (val + sq[members, None]).clamp_min_(0)
            idx[members] = cand[pos]
        found_d2, found_idx = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        found_d2[order], found_idx[order] = d2.numpy(), order[idx.numpy()]  # sorted positions -> rows
        if sampled_recall(x, found_idx, seed=seed, among=asked) >= RECALL_FLOOR:
            return found_d2[asked], found_idx[asked]
    return None


def sampled_recall(x: np.ndarray, idx: np.ndarray, sample: int = RECALL_SAMPLE, seed: int = 0,
                   among: np.ndarray | None = None) -> float:
    """Recall of the neighbour lists ``idx [n, k]`` (self included, as a search of ``x`` against itself
    returns them) on ``sample`` random rows (of ``among``, default all) searched exactly: the share of
    returned neighbours whose exact distance is within the true k-th smallest (ties count)."""
    n, k = idx.shape
    pool = np.arange(n) if among is None else np.asarray(among)
    rows = np.random.default_rng(seed).choice(pool, min(len(pool), sample), replace=False)
    data = torch.from_numpy(x)
    sq = (data * data).sum(1)
    d2 = torch.addmm(sq[None], data[rows], data.T, alpha=-2).add_(sq[rows, None])
    kth = torch.topk(d2, k, dim=1, largest=False).values[:, -1:]
    found = torch.from_numpy(idx[rows])
    got = torch.gather(d2, 1, found.clamp_min(0)).masked_fill_(found < 0, float("inf"))
    # float32 rounding of the expansion, on the scale of the row itself: a tolerance on the scale of the
    # largest row would pass any answer among rows of small norm (confident examples' gradients), which the
    # test of a half-precision graph showed (benchmarks/results/scale.md, tenth session)
    tolerance = 1e-5 * (kth.abs() + sq[rows, None])
    return float((got <= kth + tolerance).float().mean())


def rerank(x: np.ndarray, candidates: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` candidates of each row nearest to it, with exact squared distances (``-1``: no candidate).

    With faiss, its flat index computes the candidate distances (``compute_distance_subset``): about 8× faster
    than gathering the candidates' rows in torch (100k × 16 candidates of 256 dimensions: 0.45 s against 3.6 s),
    the gather being most of a million-row round's re-ranking."""
    return _rerank_faiss(x, candidates, k) if faiss is not None else _rerank_torch(x, candidates, k, block)


def _rerank_torch(x: np.ndarray, candidates: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    data = torch.from_numpy(x)
    sq = (data * data).sum(1)
    cand = torch.from_numpy(candidates)
    d2 = np.empty((len(x), k), dtype=np.float32)
    idx = np.empty((len(x), k), dtype=np.int64)
    for s in range(0, len(x), block):
        c = cand[s:s + block]
        safe = c.clamp_min(0)
        dot = torch.bmm(data[safe], data[s:s + block, :, None])[:, :, 0]
        dist = (sq[safe] - 2 * dot + sq[s:s + block, None]).clamp_min_(0).masked_fill_(c < 0, float("inf"))
        val, pos = torch.topk(dist, k, dim=1, largest=False)
        d2[s:s + block] = val.numpy()
        idx[s:s + block] = torch.gather(c, 1, pos).numpy()
    return d2, idx


def _rerank_faiss(x: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    data = np.ascontiguousarray(x, dtype=np.float32)
    cand = np.ascontiguousarray(candidates, dtype=np.int64)
    missing = cand < 0
    safe = np.where(missing, 0, cand)  # faiss would read row -1
    index = faiss.IndexFlatL2(data.shape[1])
    index.add(data)
    dist = np.empty(cand.shape, dtype=np.float32)
    index.compute_distance_subset(len(data), faiss.swig_ptr(data), cand.shape[1], faiss.swig_ptr(dist),
                                  faiss.swig_ptr(safe))
    dist[missing] = np.inf
    val, pos = torch.topk(torch.from_numpy(dist), k, dim=1, largest=False)
    return val.numpy(), np.take_along_axis(cand, pos.numpy(), 1)


# -- exact blockwise search (explicit rows or Kronecker factors) ------------------------------------
GROUP = 64  # columns per bucket in the two-stage top-k


def _smallest_k(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise ``k`` smallest of ``g`` [b, n] (n a multiple of GROUP, padding = +inf), sorted.

    Two stages: the k buckets of GROUP columns with the smallest minima hold the k smallest entries
    (a bucket holding one of them has a minimum ≤ the k-th smallest; any other bucket's is ≥ it), so
    top-k runs on n / GROUP bucket minima and then on k·GROUP candidates: 2–3× faster than one
    ``torch.topk`` over the row on the CPU, and exact.
    """
    b, n = g.shape
    buckets = n // GROUP
    if buckets <= 4 * k:
        return torch.topk(g, k, dim=1, largest=False)
    mins = g.view(b, buckets, GROUP).amin(2)
    best = torch.topk(mins, k, dim=1, largest=False).indices
    cand = (best[:, :, None] * GROUP + torch.arange(GROUP, device=g.device)).reshape(b, k * GROUP)
    val, pos = torch.topk(torch.gather(g, 1, cand), k, dim=1, largest=False)
    return val, torch.gather(cand, 1, pos)


def _block_rows(n: int, budget: int = 1 << 22) -> int:
    """Query rows per block: ~``budget`` distance entries (16 MiB of float32) at a time."""
    return int(min(max(budget // max(n, 1), 64), 8192))


def _blocked_search(partial, sq: torch.Tensor, n: int, k: int, block: int | None,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact kNN (self excluded) from ``partial(start, stop)`` = ``|x_j|² − 2 x_i·x_j`` for the query rows
    ``start:stop`` against every (padded) column. Returns squared distances and indices on the CPU."""
    block = block or _block_rows(n)
    d2 = torch.empty(n, k, dtype=torch.float32)
    idx = torch.empty(n, k, dtype=torch.int64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        g = partial(start, stop)
        rows = torch.arange(stop - start, device=device)
        g[rows, rows + start] = float("inf")  # not one's own neighbour
        val, ind = _smallest_k(g, k)
        d2[start:stop] = (val + sq[start:stop, None]).clamp_min_(0).cpu()
        idx[start:stop] = ind.cpu()
    return d2, idx


def _padded(t: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    return torch.cat([t, t.new_full((rows,) + tuple(t.shape[1:]), value)]) if rows else t


def exact_knn_blocked(x: torch.Tensor, k: int, block: int | None = None,
                      device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared distances and indices ``[n, k]`` of the ``k`` nearest other rows of ``x``, by
    blocks of matmul + two-stage top-k (memory O(n·k) plus one block). On the GPU when there is one."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = flush_tiny(x.to(dev, torch.float32))
    n = len(data)
    pad = -n % GROUP
    sq = (data * data).sum(1)
    cols = _padded(data, pad)
    sq_cols = _padded(sq, pad, float("inf"))[None]  # padding columns are infinitely far

    def partial(start: int, stop: int) -> torch.Tensor:
        return torch.addmm(sq_cols, data[start:stop], cols.T, alpha=-2)

    return _blocked_search(partial, sq, n, k, block, dev)


def exact_knn_of_rows(x: torch.Tensor, rows: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared distances and indices ``[len(rows), k]`` of the ``k`` nearest rows of ``x`` (self included,
    as a search of ``x`` against itself returns it) for the rows ``rows`` only, by blocks of matmul + top-k."""
    data = x.to(torch.float32)
    n = len(data)
    pad = -n % GROUP
    sq = (data * data).sum(1)
    cols, sq_cols = _padded(data, pad), _padded(sq, pad, float("inf"))[None]
    queries = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    d2 = torch.empty(len(queries), k)
    idx = torch.empty(len(queries), k, dtype=torch.int64)
    block = _block_rows(n)
    for start in range(0, len(queries), block):
        q = queries[start:start + block]
        val, ind = _smallest_k(torch.addmm(sq_cols, data[q], cols.T, alpha=-2), k)
        d2[start:start + block], idx[start:start + block] = (val + sq[q, None]).clamp_min_(0), ind
    return d2, idx


def knn_factored(e, h, k: int, block: int | None = None,
                 device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of the rows ``e_i ⊗ h_i`` (the last-layer gradient (softmax − onehot) ⊗ [h; 1] of
    :func:`~sanitizer.embeddings.gradient_embeddings`) without forming them.

    Uses ``‖e_i⊗h_i − e_j⊗h_j‖² = ‖e_i‖²‖h_i‖² + ‖e_j‖²‖h_j‖² − 2 (e_i·e_j)(h_i·h_j)``: C + d + 1 work
    per pair instead of C·(d+1), exact (no sketch), memory O(n·k) plus one block of queries.
    ``e``: ``[n, C]``, ``h``: ``[n, d+1]`` (numpy or torch). Returns ``(dist [n, k], idx [n, k])``
    like :func:`knn` (Euclidean distances, self excluded, sorted). Requires ``k < n``.

    Example:
        >>> e, h = np.random.rand(100, 10), np.random.rand(100, 33)
        >>> dist, idx = knn_factored(e, h, k=5)
        >>> dist.shape, idx.shape
        ((100, 5), (100, 5))
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    e = flush_tiny(torch.as_tensor(e).to(dev, torch.float32))
    h = flush_tiny(torch.as_tensor(h).to(dev, torch.float32))
    if e.ndim != 2 or h.ndim != 2 or len(e) != len(h):
        raise ValueError(f"e and h must be [n, C] and [n, d+1] with the same n, got {tuple(e.shape)} and "
                         f"{tuple(h.shape)}")
    n = len(e)
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    pad = -n % GROUP
    sq = (e * e).sum(1) * (h * h).sum(1)
    e_cols, h_cols = _padded(e, pad), _padded(h, pad)
    sq_cols = _padded(sq, pad, float("inf"))[None]

    def partial(start: int, stop: int) -> torch.Tensor:
        return torch.addcmul(sq_cols, e[start:stop] @ e_cols.T, h[start:stop] @ h_cols.T, value=-2)

    d2, idx = _blocked_search(partial, sq, n, k, block, dev)
    return np.sqrt(d2.numpy()), idx.numpy()


def _row_hashes(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """A 64-bit hash of each row's bytes (a random linear form over its 8-byte words, modulo 2⁶⁴)."""
    words = x.view(np.uint8).reshape(len(x), -1)
    if words.shape[1] % 8:
        words = np.concatenate([words, np.zeros((len(x), -words.shape[1] % 8), np.uint8)], 1)
    words = words.view(np.uint64)
    weights = np.random.default_rng(0).integers(1, 2**63, words.shape[1], dtype=np.uint64) | np.uint64(1)
    out = np.empty(len(x), np.uint64)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = (words[s:s + chunk] * weights).sum(1)
    return out


def deduplicate(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows of ``x`` (in order of first occurrence) and, for every row, the index of its unique
    representative. Rows are grouped by a hash of their bytes (3-4x faster than sorting the rows), then
    every row grouped with an earlier one is compared with it: a hash collision falls back to the sort."""
    x = np.ascontiguousarray(x)
    _, first, inverse = np.unique(_row_hashes(x), return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    first, inverse = first[order], rank[inverse.reshape(-1)]
    representative = first[inverse]
    copies = np.flatnonzero(representative != np.arange(len(x)))
    if np.array_equal(x[representative[copies]], x[copies]):
        return x[first], inverse
    view = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()  # a collision: sort the rows
    _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
    return x[first], inverse.reshape(-1)


def class_isolation(x: np.ndarray, k: int, backend: str = "auto", **knn_options) -> np.ndarray:
    """Mean distance from each point of one class to its ``k`` nearest same-class neighbours.

    Exact duplicates count once (so copies of one poison cannot vouch for each other): the
    score is computed on unique rows and shared by all copies. ``k`` is capped at (unique − 1).
    """
    unique, inverse = deduplicate(x)
    if len(unique) < len(x):
        warnings.warn(f"{len(x) - len(unique)} duplicate embeddings in one class; duplicates count once "
                      "in the density estimate", stacklevel=3)
    if len(unique) < 2:
        return np.zeros(len(x))
    dist, _ = knn(unique, min(k, len(unique) - 1), backend, **knn_options)
    return dist.mean(1)[inverse]


def class_isolation_factored(e, h, k: int, block: int | None = None,
                             device: str | torch.device | None = None) -> np.ndarray:
    """:func:`class_isolation` of the rows ``e_i ⊗ h_i`` of one class, computed exactly from the factors
    with :func:`knn_factored` (no outer product, no sketch). Rows with the same ``(e, h)`` count once."""
    e = np.asarray(e.cpu() if isinstance(e, torch.Tensor) else e, dtype=np.float32)
    h = np.asarray(h.cpu() if isinstance(h, torch.Tensor) else h, dtype=np.float32)
    unique, inverse = deduplicate(np.concatenate([e, h], 1))
    if len(unique) < len(e):
        warnings.warn(f"{len(e) - len(unique)} duplicate embeddings in one class; duplicates count once "
                      "in the density estimate", stacklevel=2)
    if len(unique) < 2:
        return np.zeros(len(e))
    c = e.shape[1]
    dist, _ = knn_factored(unique[:, :c], unique[:, c:], min(k, len(unique) - 1), block, device)
    return dist.mean(1)[inverse]


FACTOR_NORM_MAX = 1e30  # squared norms of the factors above this would overflow float32 products of two of them


def outer_product_factors(x: np.ndarray, num_classes: int, rtol: float = 1e-4) -> tuple[np.ndarray, np.ndarray] | None:
    """``(e [n, C], h1 [n, m])`` with ``x[i] = e[i] ⊗ h1[i]`` and ``h1[:, -1] = 1``, when the rows of ``x``
    are exactly such outer products (the explicit last-layer embedding of
    :func:`~sanitizer.embeddings.gradient_embeddings`, whose last coordinate per class is the bias
    gradient e_c · 1); else None (sketched rows, features, anything else). Checked by reconstruction,
    so a wrong guess falls back to the explicit rows."""
    n, dim = x.shape
    if num_classes < 2 or dim % num_classes or dim // num_classes < 2:
        return None
    # float32 throughout: its rounding (~1e-7 relative) is far below rtol, and float64 copies of a 50k × 810
    # round cost seconds
    rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(n, num_classes, dim // num_classes)
    e = rows[:, :, -1]
    pivot = e.abs().argmax(1)
    everyone = torch.arange(n)
    scale = e[everyone, pivot]
    if bool((scale == 0).any()):
        return None
    h1 = rows[everyone, pivot] / scale[:, None]
    # a bias gradient near float32's smallest normals makes h1 huge: its squared norm would overflow the factored
    # distances (then inf and NaN isolation), so such rows take the explicit path
    if max(float(f.double().square().sum(1).max()) for f in (e, h1)) > FACTOR_NORM_MAX:
        return None
    error = torch.linalg.vector_norm(torch.addcmul(-rows, e[:, :, None], h1[:, None, :]))
    if float(error) > rtol * max(float(torch.linalg.vector_norm(rows)), 1e-30):
        return None
    return e.clone().numpy(), h1.numpy()


def robust_zscore(values: np.ndarray) -> np.ndarray:
    """(v − median) / (1.4826 · MAD), falling back to the standard deviation when MAD is 0."""
    med = np.median(values)
    scale = 1.4826 * np.median(np.abs(values - med))
    if scale <= 1e-12:
        scale = values.std()
    if scale <= 1e-12:
        return np.zeros_like(values)
    return (values - med) / scale


def principal_deviation(x: np.ndarray, iterations: int = 100, seed: int = 0, tol: float = 1e-9) -> np.ndarray:
    """How far each row sits along its set's top principal direction: ``|p − median(p)|``, with
    ``p`` the projection of the mean-centred rows on the top right singular vector.

    A group of poisons that moved together (towards one target) shifts its class along one direction
    and dominates that direction, while each poison may still have close neighbours (its fellow
    poisons), which hides it from kNN isolation. The direction is found by power iteration (stopping
    once it moves by less than ``tol``), so the cost is O(iterations · n · D) and no D × D or n × n
    matrix is formed.
    """
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 3:
        return np.zeros(len(x))
    from sanitizer.policies.spectral import top_direction  # here: a top-level import would be circular

    c = x - x.mean(0)
    v = top_direction(c, "power", iterations, seed, tol)
    if v is None:  # all rows identical: no direction to speak of
        return np.zeros(len(x))
    proj = c @ v
    return np.abs(proj - np.median(proj))
