"""torch.distributed helpers: shard the embedding pass, gather the rows, agree on one keep mask.

Used by :class:`~sanitizer.core.Sanitizer` automatically when a process group with more than one
process is initialised (torchrun, ``mp.spawn``, Lightning's DDP strategy, accelerate). Nothing here
imports a trainer framework.

Every rank embeds the candidates ``candidates[rank::world_size]`` (an interleaved shard, so the
shards differ in size by at most one), the shards are all-gathered (padded to a common length,
then trimmed) and put back in candidate order, so every rank holds the same ``[N, D]`` embeddings.
Rank 0's keep decision is then broadcast so the mask is bit-identical on every rank even when a
policy is not bit-reproducible (e.g. a GPU kNN index).

:func:`select_sharded` (and :func:`sharded_round`, which also embeds) is the class-sharded round for
per-class policies: classes are spread over the ranks, each rank receives only the rows of its own
classes (one all-to-all), runs the policy on them, and the per-example keep flags and scores (not the
embeddings) are all-gathered. No rank ever holds all N × D rows, and the kNN work is split W ways.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from sanitizer.errors import SanitizerError, check_embeddings, check_labels
from sanitizer.policies.base import Policy, Selection


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


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks (a copy; the input is left alone)."""
    out = values.to(_comm_device()).clone()
    dist.all_reduce(out)
    return out.cpu()


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


def gather_rows_by_position(local: torch.Tensor, positions: np.ndarray, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """Every rank contributes rows for some of ``n`` positions (harvest mode: the candidates it trained on
    in the last epoch); returns ``([n, D]`` rows, bool ``[n]`` filled) on every rank. A position that several
    ranks hold (a padded DDP epoch) takes the highest rank's row. Collective: every rank must call it."""
    parts = _all_gather_uneven(local if len(positions) else torch.zeros(0, 0))
    where = _all_gather_uneven(torch.as_tensor(np.asarray(positions, dtype=np.int64))[:, None])
    width = max((p.shape[1] for p in parts if p.numel()), default=0)
    dtype = next((p.dtype for p in parts if p.numel()), torch.float32)
    out = torch.zeros(n, width, dtype=dtype)
    filled = np.zeros(n, dtype=bool)
    for part, pos in zip(parts, where, strict=True):
        if len(pos):
            out[pos[:, 0]] = part.to(dtype)
            filled[pos[:, 0].numpy()] = True
    return out, filled


def position_holders(positions: np.ndarray, n: int) -> np.ndarray:
    """For each of ``n`` positions, the highest rank that holds it (−1: no rank does), on every rank.

    Harvest mode under DDP: each rank holds rows for the examples it trained on, and a padded epoch gives
    some examples to two ranks; keeping only the holder's row makes every position count once (the same
    rule as :func:`gather_rows_by_position`). Collective: every rank must call it."""
    holders = np.full(n, -1, dtype=np.int64)
    for source, part in enumerate(_all_gather_uneven(torch.as_tensor(np.asarray(positions, dtype=np.int64))[:, None])):
        if len(part):  # (when no rank holds any position the parts are [0, 0])
            holders[part[:, 0].numpy()] = source
    return holders


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


# -- class-sharded rounds ---------------------------------------------------------------------------
def class_owners(labels: np.ndarray, world: int) -> dict[int, int]:
    """The rank that owns each class: greedy longest-processing-time on the kNN cost n_c² (the largest
    class first, to the least-loaded rank; ties to the lower rank), so the split is the same on every rank."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    load = np.zeros(world)
    owners: dict[int, int] = {}
    for i in sorted(range(len(classes)), key=lambda i: (-int(counts[i]), int(classes[i]))):
        r = int(np.argmin(load))
        owners[int(classes[i])] = r
        load[r] += float(counts[i]) ** 2
    return owners


def decides_by_class(policy: Policy) -> bool:
    """Whether the policy decides class by class (keeps :meth:`Policy.select`), so its classes can be sharded."""
    return type(policy).select is Policy.select


def _exchange_rows(rows: torch.Tensor, positions: np.ndarray, dest: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Send row i to rank ``dest[i]`` (one all-to-all); return the rows this rank received and their positions."""
    w, device = dist.get_world_size(), _comm_device()
    order = np.argsort(dest, kind="stable")
    send_counts = np.bincount(dest, minlength=w)
    width = rows.shape[1] if rows.numel() else -1
    meta = torch.tensor([*send_counts.tolist(), width], dtype=torch.int64, device=device)
    metas = [torch.empty_like(meta) for _ in range(w)]
    dist.all_gather(metas, meta)
    recv_counts = [int(m[dist.get_rank()]) for m in metas]
    widths = {int(m[-1]) for m in metas if int(m[-1]) >= 0 and int(m[:-1].sum()) > 0}
    if len(widths) > 1:
        raise SanitizerError(f"ranks computed embeddings of different widths {sorted(widths)}; every rank "
                             "must run the same model and sanitizer configuration")
    width = widths.pop() if widths else 0
    dtype = rows.dtype if rows.numel() else torch.float32
    send = rows[torch.from_numpy(order)].to(device) if len(order) else torch.zeros(0, width, dtype=dtype,
                                                                                  device=device)
    recv = torch.empty(sum(recv_counts), width, dtype=dtype, device=device)
    dist.all_to_all_single(recv, send.reshape(len(order), width), recv_counts, send_counts.tolist())
    pos_send = torch.from_numpy(np.asarray(positions, dtype=np.int64)[order]).to(device)
    pos_recv = torch.empty(sum(recv_counts), dtype=torch.int64, device=device)
    dist.all_to_all_single(pos_recv, pos_send, recv_counts, send_counts.tolist())
    return recv.cpu(), pos_recv.cpu().numpy()


def select_sharded(policy: Policy, local_rows, local_positions: np.ndarray, labels,
                   num_classes: int | None = None, seed: int = 0) -> Selection:
    """One round of a per-class policy with its classes sharded over the ranks.

    ``labels`` are the labels of all N candidates (the same on every rank); ``local_rows`` ``[m, D]``
    are the embeddings this rank computed, of the candidates at ``local_positions`` (indices into
    ``labels``; the ranks' positions together cover each candidate once). Each class is owned by one
    rank (:func:`class_owners`); its rows go to that rank in one all-to-all, in candidate order, so
    the policy sees exactly what one process would see for that class. The per-example keep flags and
    scores and the per-class info are then all-gathered: every rank returns the same
    :class:`~sanitizer.policies.base.Selection` over all N candidates, and no rank holds more than its
    own shard plus its classes' rows. Every rank must call this together (it runs collectives).

    Only for policies that decide class by class (they implement ``select_class`` and keep
    :meth:`Policy.select`, like ``density``); others raise :class:`SanitizerError`.
    """
    if not decides_by_class(policy):
        raise SanitizerError(f"policy {policy.name or type(policy).__name__!r} does not decide class by class "
                             "(it overrides select); gather the embeddings on every rank instead "
                             "(gather_embeddings + broadcast_mask)")
    labels = check_labels(labels, num_classes)
    local_positions = np.asarray(local_positions, dtype=np.int64)
    local_rows = torch.as_tensor(local_rows)
    if len(local_rows) != len(local_positions):
        raise SanitizerError(f"{len(local_rows)} local rows but {len(local_positions)} positions")
    owners = class_owners(labels, dist.get_world_size())
    dest = np.array([owners[int(c)] for c in labels[local_positions]], dtype=np.int64)
    rows, positions = _exchange_rows(local_rows, local_positions, dest)
    order = np.argsort(positions, kind="stable")
    rows, positions = rows[torch.from_numpy(order)], positions[order]
    if len(positions):
        sel = policy.select_by_class(check_embeddings(rows, len(positions)), labels[positions],
                                     num_classes=num_classes, seed=seed)
        keep, scores, info = sel.keep, sel.scores, sel.info
    else:
        keep, scores, info = np.ones(0, dtype=bool), np.zeros(0), {"per_class": {}, "skipped_classes": []}
    mine = torch.from_numpy(np.stack([positions.astype(np.float64), keep.astype(np.float64), scores], 1)
                            if len(positions) else np.zeros((0, 3)))
    full_keep = np.ones(len(labels), dtype=bool)
    full_scores = np.zeros(len(labels), dtype=np.float64)
    for part in _all_gather_uneven(mine):
        at = part[:, 0].numpy().astype(np.int64)
        full_keep[at] = part[:, 1].numpy() > 0.5
        full_scores[at] = part[:, 2].numpy()
    infos: list = [None] * dist.get_world_size()
    dist.all_gather_object(infos, info)
    merged = {"per_class": {c: i for part in infos for c, i in part["per_class"].items()},
              "skipped_classes": sorted(c for part in infos for c in part["skipped_classes"]),
              "class_owner": owners}
    merged["per_class"] = dict(sorted(merged["per_class"].items()))
    selection = Selection(full_keep, full_scores, merged)
    policy.gate_classes(selection, labels)
    num_classes = num_classes if num_classes is not None else int(labels.max()) + 1
    _select_across_sharded(policy, local_rows, local_positions, labels, num_classes, selection)
    return selection


def _select_across_sharded(policy: Policy, local_rows: torch.Tensor, local_positions: np.ndarray,
                           labels: np.ndarray, num_classes: int, selection: Selection) -> None:
    """The policy's cross-class step (e.g. density's label side) on the small per-row features it asks for,
    gathered from every rank's shard; every rank computes the same result from the same inputs."""
    local = policy.cross_class_features(check_embeddings(local_rows, len(local_positions)), num_classes) \
        if len(local_positions) else None
    wanted = [None] * dist.get_world_size()
    dist.all_gather_object(wanted, None if local is None else local.shape[1])
    widths = {w for w in wanted if w is not None}
    if not widths:
        return
    width = min(widths)  # 0: some rank's rows gave no features, so the step is skipped everywhere
    if local is None or local.shape[1] != width:  # an empty shard, or a rank whose rows gave no features
        local = np.zeros((len(local_positions), width), np.float32)
    mine = torch.from_numpy(np.concatenate([np.asarray(local_positions, np.float64)[:, None],
                                            local.astype(np.float64)], 1))
    features = np.zeros((len(labels), width), np.float32)
    for part in _all_gather_uneven(mine):
        features[part[:, 0].numpy().astype(np.int64)] = part[:, 1:].numpy()
    policy.select_across(features, labels, selection, num_classes)


def sharded_round(embed: Callable[[np.ndarray], torch.Tensor], candidates: np.ndarray, labels, policy: Policy,
                  num_classes: int | None = None, seed: int = 0) -> Selection:
    """Embed this rank's interleaved shard ``candidates[rank::world_size]`` with ``embed(indices)`` and run
    :func:`select_sharded` on it. ``labels`` are the candidates' labels (``[len(candidates)]``).

    Example (inside a DDP process; every rank calls it)::

        sel = sharded_round(lambda idx: gradient_embeddings(model, data, indices=idx), candidates,
                            all_labels[candidates], make_policy("density"))
    """
    r, w = dist.get_rank(), dist.get_world_size()
    positions = np.arange(len(candidates))[r::w]
    local = embed(candidates[positions]) if len(positions) else torch.zeros(0, 0)
    return select_sharded(policy, local, positions, labels, num_classes, seed)
