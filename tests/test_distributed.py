"""torch.distributed: two gloo processes (torch.multiprocessing) against one process."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from planted import last_layer_rows, planted_dataset, tiny_mlp, weights
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from sanitizer import Sanitizer, make_policy
from sanitizer.distributed import class_owners, gather_embeddings, select_sharded, sharded_round
from sanitizer.embeddings import gradient_embeddings
from sanitizer.errors import SanitizerError

EPOCHS = 4
LOCAL_BATCH = 16
WORLD = 2


def _train(rank: int, world: int, out_dir: str | None) -> dict:
    """The same plain loop in one process (world=1) or as one rank of a DDP group."""
    torch.set_num_threads(1)
    dataset, _ = planted_dataset()
    model = tiny_mlp()
    net = DistributedDataParallel(model) if world > 1 else model
    sanitizer = Sanitizer(net, dataset, warmup=1, every=1, seed=0, harvest=False)  # the pass path
    if world > 1:
        base = DataLoader(dataset, batch_size=LOCAL_BATCH, sampler=DistributedSampler(dataset, shuffle=True, seed=0))
    else:  # the same global batch as WORLD ranks of LOCAL_BATCH
        base = DataLoader(dataset, batch_size=LOCAL_BATCH * WORLD, shuffle=True)
    loader = sanitizer.wrap(base)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    batches = []
    for epoch in range(EPOCHS):
        sanitizer.start_epoch(epoch)
        n = 0
        for x, y, _ in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            n += 1
        batches.append(n)
    # An uneven set of candidates (odd count): shards of 76 and 75 rows.
    candidates = np.arange(1, 2 * 75 + 2)
    rows = (gather_embeddings(sanitizer._embed_rows, candidates) if world > 1
            else sanitizer._embed_rows(candidates))
    result = {"keep": torch.from_numpy(sanitizer.keep.copy()), "batches": torch.tensor(batches),
              "weights": weights(model), "rows": rows, "candidates": torch.from_numpy(candidates),
              "rounds": torch.tensor([r["epoch"] for r in sanitizer.history]),
              "class_sharded": torch.tensor([r.get("class_sharded", False) for r in sanitizer.history])}
    sanitizer.run_round(EPOCHS)  # one more round on the final weights, compared with one process below
    result["keep_after"] = torch.from_numpy(sanitizer.keep.copy())
    result["scores"] = torch.from_numpy(sanitizer.last_scores)
    if out_dir is not None:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    return result


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _train(rank, world, out_dir)
        dist.barrier()  # both ranks done with every collective before gloo tears down (a teardown race
        # once killed a rank with "terminate called without an active exception")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = _train(0, 1, None)
    _, planted = planted_dataset()

    # The same keep mask on every rank, and the planted points are among the dropped.
    assert torch.equal(ranks[0]["keep"], ranks[1]["keep"])
    dropped = np.flatnonzero(~ranks[0]["keep"].numpy())
    assert set(planted) <= set(dropped.tolist())
    assert ranks[0]["rounds"].tolist() == list(range(1, EPOCHS))
    # The density policy decides class by class, so the ranks sharded the classes (no rank held all rows).
    assert ranks[0]["class_sharded"].all() and not single["class_sharded"].any()

    # Equal batch counts on every rank (so no collective hangs), following the shrinking kept set.
    assert torch.equal(ranks[0]["batches"], ranks[1]["batches"])
    assert ranks[0]["batches"][-1] == math.ceil(math.ceil(len(ranks[0]["keep"]) - len(dropped)) / WORLD / LOCAL_BATCH)

    # Gathered rows = one process's rows for the same weights, in candidate order, uneven shards.
    model = tiny_mlp()
    model.load_state_dict(ranks[0]["weights"])
    dataset, _ = planted_dataset()
    direct = gradient_embeddings(model, dataset, indices=ranks[0]["candidates"].numpy())
    for r in ranks:
        torch.testing.assert_close(r["rows"], direct, rtol=1e-5, atol=1e-6)

    # The same round as one process: same weights and mask in, the same mask and scores out.
    reference = Sanitizer(model, dataset, warmup=1, every=1, seed=0, harvest=False)
    reference.keep = ranks[0]["keep"].numpy().copy()
    reference.run_round(EPOCHS)
    assert np.array_equal(reference.keep, ranks[0]["keep_after"].numpy())
    np.testing.assert_allclose(reference.last_scores, ranks[0]["scores"].numpy(), rtol=1e-4, atol=1e-4)

    # One process training on the same global batches drops the planted points too. (Its weights
    # differ slightly: DistributedSampler-style padding repeats an example when the kept count is
    # odd, so the trajectories are not bit-identical and borderline clean drops may differ.)
    assert set(planted) <= set(np.flatnonzero(~single["keep"].numpy()).tolist())


# -- class-sharded rounds ---------------------------------------------------------------------------
def sharding_data(seed=0):
    """Four classes of different sizes (one too small for the policy) with a few isolated points each."""
    rng = np.random.default_rng(seed)
    sizes = {0: 240, 1: 150, 2: 90, 3: 2}
    y = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    rng.shuffle(y)
    centers = rng.normal(0, 8, (4, 12))
    x = centers[y] + rng.normal(0, 1, (len(y), 12))
    outliers = rng.choice(len(y), 12, replace=False)
    x[outliers] += rng.choice([-6.0, 6.0], (12, 12))
    return torch.from_numpy(x.astype(np.float32)), y


def _sharded_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = sharding_data()
        policy = make_policy("density", two_sided=True, max_fraction=0.2)
        # This rank's rows: an uneven, non-interleaved split (rank 0 the first 301, rank 1 the rest).
        positions = np.arange(301) if rank == 0 else np.arange(301, len(y))
        sel = select_sharded(policy, x[positions], positions, y, num_classes=4, seed=3)
        # sharded_round embeds its interleaved shard of a candidate subset itself
        candidates = np.arange(0, len(y), 2)
        seen = []
        embed = lambda idx: (seen.append(idx.copy()), x[idx])[1]  # noqa: E731
        sel2 = sharded_round(embed, candidates, y[candidates], policy, num_classes=4, seed=3)
        # one class: the second rank owns nothing
        one = np.flatnonzero(y == 0)
        sel3 = select_sharded(policy, x[one[rank::world]], np.arange(len(one))[rank::world], y[one])
        try:
            select_sharded(make_policy("deep_knn"), x[positions], positions, y)
            refused = False
        except SanitizerError:
            refused = True
        # the label side looks across classes: its features are gathered from both shards
        rows, flipped_labels, _ = last_layer_rows(separation=4.0, flip_rate=0.1)
        label_policy = make_policy("density")
        label_policy.start_round(1)
        sel4 = select_sharded(label_policy, rows[rank::world], np.arange(len(rows))[rank::world], flipped_labels)
        arrays = {"keep": sel.keep, "scores": sel.scores, "keep2": sel2.keep, "scores2": sel2.scores,
                  "embedded": np.concatenate(seen), "keep3": sel3.keep, "scores3": sel3.scores,
                  "keep4": sel4.keep, "scores4": sel4.scores}
        # tensors and plain types only, so the parent reads them back with weights_only=True
        torch.save({**{k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, "info": _plain(sel.info),
                    "refused": refused}, os.path.join(out_dir, f"sharded{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _plain(info: dict) -> str:
    """A policy's info as JSON text (numpy scalars as numbers), comparable across processes."""
    return json.dumps(info, sort_keys=True, default=lambda o: o.item() if hasattr(o, "item") else str(o))


def test_class_owners_balance_the_knn_cost():
    owners = class_owners(np.repeat([0, 1, 2, 3], [100, 90, 20, 10]), 2)
    assert owners == {0: 0, 1: 1, 2: 1, 3: 1}  # 100² vs 90² + 20² + 10²
    assert set(class_owners(np.array([5, 5, 5]), 3).values()) == {0}


def test_two_process_class_sharded_round_matches_one_process(tmp_path):
    mp.spawn(_sharded_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"sharded{r}.pt", weights_only=True) for r in range(WORLD)]
    x, y = sharding_data()
    policy = make_policy("density", two_sided=True, max_fraction=0.2)
    with pytest.warns(UserWarning, match="fewer than"):
        ref = policy.select(x, y, num_classes=4, seed=3)
    candidates = np.arange(0, len(y), 2)
    with pytest.warns(UserWarning, match="fewer than"):
        ref2 = policy.select(x[candidates], y[candidates], num_classes=4, seed=3)
    one = np.flatnonzero(y == 0)
    ref3 = policy.select(x[one], y[one])
    rows, flipped_labels, _ = last_layer_rows(separation=4.0, flip_rate=0.1)
    label_policy = make_policy("density")
    label_policy.start_round(1)
    ref4 = label_policy.select(rows, flipped_labels)
    assert ref4.info["label_side"]["dropped_by_label_side_only"] > 0
    for r in ranks:
        # every rank holds the whole decision, equal to one process's, over all N candidates
        assert np.array_equal(r["keep"], ref.keep) and (~ref.keep).sum() > 0
        np.testing.assert_allclose(r["scores"], ref.scores, rtol=1e-5, atol=1e-6)
        info = json.loads(r["info"])
        assert info["per_class"] == json.loads(_plain(ref.info))["per_class"]
        assert info["skipped_classes"] == [3]
        assert np.array_equal(r["keep2"], ref2.keep)
        np.testing.assert_allclose(r["scores2"], ref2.scores, rtol=1e-5, atol=1e-6)
        assert np.array_equal(r["keep3"], ref3.keep)
        np.testing.assert_allclose(r["scores3"], ref3.scores, rtol=1e-5, atol=1e-6)
        assert np.array_equal(r["keep4"], ref4.keep)
        # the factored kNN's sums run in another order with other thread counts: the z-scores agree to ~1e-4
        np.testing.assert_allclose(r["scores4"], ref4.scores, rtol=1e-3, atol=1e-4)
        assert r["refused"]  # deep-knn looks across classes: not shardable by class
    # the embedding pass was split: each candidate embedded once, by one rank
    assert sorted(np.concatenate([r["embedded"] for r in ranks]).tolist()) == candidates.tolist()


# -- harvest mode under DDP --------------------------------------------------------------------------
def _frozen_epochs(sanitizer: Sanitizer, net, dataset, drop_last: bool) -> None:
    """Two epochs of a DDP loop with lr 0 (frozen weights), so harvested rows equal a pass's rows."""
    loader = sanitizer.wrap(DataLoader(dataset, batch_size=LOCAL_BATCH, drop_last=drop_last,
                                       sampler=DistributedSampler(dataset, shuffle=True, seed=0)))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    for epoch in range(2):
        sanitizer.start_epoch(epoch)
        for x, y, _ in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()


def _harvest_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Frozen weights (lr 0), harvest mode: the gathered round must equal a one-process pass."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dataset, _ = planted_dataset()
        model = tiny_mlp()
        net = DistributedDataParallel(model)
        captured = {}
        sanitizer = Sanitizer(net, dataset, policy="none", warmup=1, every=1, seed=0, harvest=True, verbose=False,
                              round_hooks=[lambda s, e, cand, emb, sel: captured.update(cand=cand, emb=emb.clone())])
        _frozen_epochs(sanitizer, net, dataset, drop_last=True)
        torch.save({"candidates": torch.from_numpy(captured["cand"]), "emb": captured["emb"],
                    "harvest": torch.tensor([sanitizer.history[-1]["harvest"]["harvested"],
                                             sanitizer.history[-1]["harvest"]["embedded"]]),
                    "class_sharded": torch.tensor(sanitizer.history[-1]["class_sharded"]),
                    "weights": weights(model)}, os.path.join(out_dir, f"harvest{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_harvest_mode_gathers_each_ranks_rows(tmp_path):
    mp.spawn(_harvest_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"harvest{r}.pt", weights_only=True) for r in range(WORLD)]
    dataset, _ = planted_dataset()
    model = tiny_mlp()
    model.load_state_dict(ranks[0]["weights"])
    direct = gradient_embeddings(model, dataset, indices=ranks[0]["candidates"].numpy())
    harvested, embedded = ranks[0]["harvest"].tolist()
    assert harvested > 0 and embedded > 0  # drop_last leaves a remainder that a pass embeds
    assert harvested + embedded == len(dataset)
    assert not ranks[0]["class_sharded"]  # a round hook reads every row, so the round gathered them
    for r in ranks:
        torch.testing.assert_close(r["emb"], direct, rtol=1e-5, atol=1e-6)


def _harvest_sharded_worker(rank: int, world: int, init_file: str, out_dir: str, drop_last: bool) -> None:
    """Frozen weights (lr 0), harvest mode, the density policy and no round hook: the round shards the classes."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dataset, _ = planted_dataset()
        model = tiny_mlp()
        net = DistributedDataParallel(model)
        sanitizer = Sanitizer(net, dataset, warmup=1, every=1, seed=0, harvest=True, verbose=False)
        _frozen_epochs(sanitizer, net, dataset, drop_last)
        record = sanitizer.history[-1]
        torch.save({"keep": torch.from_numpy(sanitizer.keep.copy()), "scores": torch.from_numpy(sanitizer.last_scores),
                    "harvest": torch.tensor([record["harvest"]["harvested"], record["harvest"]["embedded"]]),
                    "class_sharded": torch.tensor(record["class_sharded"]), "weights": weights(model)},
                   os.path.join(out_dir, f"harvest_sharded{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("drop_last", [False, True], ids=["padded epoch", "remainder left out"])
def test_harvested_rounds_shard_the_classes_and_equal_one_process(tmp_path, drop_last):
    mp.spawn(_harvest_sharded_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path), drop_last),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"harvest_sharded{r}.pt", weights_only=True) for r in range(WORLD)]
    dataset, planted = planted_dataset()
    assert all(bool(r["class_sharded"]) for r in ranks)
    harvested, embedded = ranks[0]["harvest"].tolist()
    assert harvested + embedded == len(dataset)  # a padded epoch's repeated example counts once
    assert (embedded > 0) == drop_last  # the left-out remainder is embedded by a pass, shared by the ranks
    model = tiny_mlp()
    model.load_state_dict(ranks[0]["weights"])
    reference = Sanitizer(model, dataset, warmup=1, every=1, seed=0, verbose=False)  # one process, a pass
    reference.start_epoch(0)
    reference.run_round(1)
    for r in ranks:
        assert np.array_equal(r["keep"].numpy(), reference.keep)
        np.testing.assert_allclose(r["scores"].numpy(), reference.last_scores, rtol=1e-4, atol=1e-4)
    assert len(set(planted) & set(np.flatnonzero(~reference.keep).tolist())) >= 4  # a round that drops (untrained)
