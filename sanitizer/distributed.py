"""torch.distributed helpers: shard the embedding pass, gather the rows, agree on one keep mask.

Used by :class:`~sanitizer.core.Sanitizer` automatically when a process group with more than one
process is initialised (torchrun, ``mp.spawn``, Lightning's DDP strategy, accelerate). Nothing here
imports a trainer framework.

Every rank embeds the candidates ``candidates[rank::world_size]`` (an interleaved shard, so the
shards differ in size by at most one), the shards are all-gathered (padded to a common length,
then trimmed) and put back in candidate order, so every rank holds the same ``[N, D]`` embeddings.
Rank 0's keep decision is then broadcast so the mask is bit-identical on every rank even when a
policy is not bit-reproducible (e.g. a GPU kNN index).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from sanitizer.errors import SanitizerError


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the process that writes files."""
    return rank() == 0


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo and mpi move CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_uneven(local: torch.Tensor) -> list[torch.Tensor]:
    """All-gather 2-D tensors whose row counts differ between ranks (and may be zero)."""
    device = _comm_device()
    # A rank with an empty shard does not know the width; it reports -1 and takes the others'.
    shape = torch.tensor([local.shape[0], local.shape[1] if local.numel() else -1], device=device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    widths = {int(s[1]) for s in shapes if int(s[0]) > 0}
    if len(widths) > 1:
        raise SanitizerError(f"ranks computed embeddings of different widths {sorted(widths)}; every rank "
                             "must run the same model and sanitizer configuration")
    width = widths.pop() if widths else 0
    padded = torch.zeros(max(rows), width, dtype=local.dtype, device=device)
    if rows[dist.get_rank()]:
        padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    return [p[:n].cpu() for p, n in zip(parts, rows, strict=True)]


def gather_embeddings(embed: Callable[[np.ndarray], torch.Tensor], candidates: np.ndarray) -> torch.Tensor:
    """Embed this rank's shard of ``candidates`` with ``embed(indices)`` and return all rows, in order.

    Every rank must call this together (it runs collectives). Rows follow ``candidates``.

    Example (inside a DDP process)::

        emb = gather_embeddings(lambda idx: gradient_embeddings(model, data, indices=idx), candidates)
    """
    r, w = dist.get_rank(), dist.get_world_size()
    mine = candidates[r::w]
    local = embed(mine) if len(mine) else torch.zeros(0, 0)
    parts = _all_gather_uneven(local)
    width = max(p.shape[1] for p in parts)
    out = torch.empty(len(candidates), width, dtype=parts[0].dtype if parts[0].numel() else local.dtype)
    for source, part in enumerate(parts):
        out[source::w] = part
    return out


def broadcast_mask(mask: np.ndarray, src: int = 0) -> np.ndarray:
    """Rank ``src``'s boolean mask on every rank (the same length everywhere)."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8)).to(_comm_device())
    dist.broadcast(t, src)
    return t.cpu().numpy().astype(bool)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel``: its forward runs no collectives, so ranks
    may run different numbers of embedding batches without hanging."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
