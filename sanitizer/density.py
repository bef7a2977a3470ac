"""k-nearest-neighbour search within a class and the isolation score built on it.

Backends (``backend="auto"`` picks the first that applies):

- ``faiss-gpu``: a faiss GPU index, when faiss was built with CUDA and a GPU is present;
- ``torch``: blockwise matmul + top-k on the GPU when faiss has no GPU support;
- ``faiss``: faiss on the CPU: an exact flat index below ``ivf_threshold`` points, IVF above.

Memory is O(n·k) for the results plus one block of queries; never O(n²).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a dependency; this keeps the torch path usable
    faiss = None

BACKENDS = ("auto", "faiss", "faiss-gpu", "torch")


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose one of {BACKENDS}")
    gpu = torch.cuda.is_available()
    faiss_gpu = faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if backend == "auto":
        return "faiss-gpu" if (gpu and faiss_gpu) else "torch" if gpu else "faiss" if faiss is not None else "torch"
    if backend == "faiss-gpu" and not faiss_gpu:
        raise RuntimeError("backend='faiss-gpu' needs faiss with CUDA support (pip install 'sanitizer[gpu]')")
    if backend == "faiss" and faiss is None:
        raise RuntimeError("backend='faiss' needs faiss-cpu (pip install faiss-cpu)")
    return backend


def knn(x: np.ndarray, k: int, backend: str = "auto", ivf_threshold: int = 30_000,
        nprobe: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances and indices of the ``k`` nearest *other* points of each row of ``x``.

    Returns ``(dist [n, k], idx [n, k])`` sorted by distance. Requires ``k < n``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    backend = resolve_backend(backend)
    if backend == "torch":
        d2, idx = _knn_torch(x, k + 1)
    else:
        d2, idx = _knn_faiss(x, k + 1, backend == "faiss-gpu", ivf_threshold, nprobe, seed)
    return _drop_self(d2, idx, k)


def _drop_self(d2: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each point from its own neighbour list (it may not come first when there are ties)."""
    n = len(idx)
    is_self = idx == np.arange(n)[:, None]
    # Rows where self was not returned (approximate search): drop the last column instead.
    missing = ~is_self.any(1)
    is_self[missing, -1] = True
    keep = ~is_self
    d2 = d2[keep].reshape(n, k)
    idx = idx[keep].reshape(n, k)
    return np.sqrt(np.maximum(d2, 0.0)), idx


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
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    d2, idx = index.search(x, k)
    return d2, idx


def _knn_torch(x: np.ndarray, k: int, block: int = 4096):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = torch.from_numpy(x).to(dev)
    sq = (data * data).sum(1)
    dists, idxs = [], []
    for start in range(0, len(data), block):
        q = data[start:start + block]
        d2 = sq[start:start + block, None] - 2 * q @ data.T + sq[None]
        val, ind = torch.topk(d2, k, dim=1, largest=False)
        dists.append(val.clamp_min_(0).cpu())
        idxs.append(ind.cpu())
    return torch.cat(dists).numpy(), torch.cat(idxs).numpy()


def deduplicate(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows of ``x`` and, for every row, the index of its unique representative."""
    view = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
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
    c = x - x.mean(0)
    v = np.random.default_rng(seed).standard_normal(x.shape[1])
    v /= np.linalg.norm(v)
    for _ in range(iterations):
        w = c.T @ (c @ v)
        norm = np.linalg.norm(w)
        if norm <= 1e-12:  # all rows identical: no direction to speak of
            return np.zeros(len(x))
        w /= norm
        moved = np.linalg.norm(w - v)
        v = w
        if moved < tol:
            break
    proj = c @ v
    return np.abs(proj - np.median(proj))
