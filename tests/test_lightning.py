"""PyTorch Lightning: SanitizerCallback drops planted points, resumes exactly, refuses bad setups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from planted import planted_dataset, tiny_mlp, weights
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from sanitizer import Sanitizer
from sanitizer.errors import SanitizerError

L = pytest.importorskip("lightning.pytorch")
from sanitizer.integrations.lightning import SanitizerCallback  # noqa: E402

EPOCHS = 5


class LitClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp()
        self.seen: list[int] = []  # examples trained on, per epoch

    def forward(self, x):
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        self.seen.append(0)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        self.seen[-1] += len(y)
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _trainer(tmp_path, callbacks, max_epochs=EPOCHS, **kwargs):
    options = dict(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks,
                   reload_dataloaders_every_n_epochs=1, deterministic=True)
    options.update(kwargs)
    return L.Trainer(**options)


def _setup():
    dataset, planted = planted_dataset()
    model = LitClassifier()
    sanitizer = Sanitizer(model, dataset, warmup=1, every=2, seed=0)
    callback = SanitizerCallback(sanitizer)
    loader = callback.wrap(DataLoader(dataset, batch_size=32, shuffle=True))
    return dataset, planted, model, sanitizer, callback, loader


def test_fit_drops_planted_points_and_resumes_exactly(tmp_path):
    dataset, planted, model, sanitizer, callback, loader = _setup()
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                        filename="{epoch}")
    _trainer(tmp_path, [callback, saver]).fit(model, train_dataloaders=loader)

    assert [r["epoch"] for r in sanitizer.history] == [1, 3]
    assert set(planted) <= set(sanitizer.dropped.tolist())
    assert len(sanitizer.dropped) <= 0.1 * len(dataset)
    # Epochs after a round iterate only the kept examples (each once).
    n = len(dataset)
    kept_after_first = n - len(sanitizer.history[0]["dropped_now"])
    assert model.seen == [n, kept_after_first, kept_after_first, len(dataset) - len(sanitizer.dropped),
                          len(dataset) - len(sanitizer.dropped)]

    # Resume from the end of epoch 2 (after the first round, before the second) in a fresh process state.
    _, _, model2, sanitizer2, callback2, loader2 = _setup()
    torch.manual_seed(123)  # the global RNG must not matter
    _trainer(tmp_path / "resumed", [callback2]).fit(model2, train_dataloaders=loader2,
                                                    ckpt_path=str(tmp_path / "ckpt" / "epoch=2.ckpt"))
    assert np.array_equal(sanitizer2.dropped, sanitizer.dropped)
    assert [r["dropped_now"] for r in sanitizer2.history] == [r["dropped_now"] for r in sanitizer.history]
    for key, value in weights(model).items():
        assert torch.equal(weights(model2)[key], value), key


def test_resume_from_checkpoint_saved_before_the_round(tmp_path):
    """A checkpoint taken at the end of epoch 0 holds no round; the resumed run runs round 1 itself."""
    _, _, model, sanitizer, callback, loader = _setup()
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                        filename="{epoch}")
    _trainer(tmp_path, [callback, saver], max_epochs=3).fit(model, train_dataloaders=loader)
    state = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    assert [r["epoch"] for r in state["callbacks"]["SanitizerCallback"]["history"]] == []

    _, _, model2, sanitizer2, callback2, loader2 = _setup()
    _trainer(tmp_path / "r", [callback2], max_epochs=3).fit(model2, train_dataloaders=loader2,
                                                           ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert np.array_equal(sanitizer2.dropped, sanitizer.dropped)
    for key, value in weights(model).items():
        assert torch.equal(weights(model2)[key], value), key


def test_requires_reloading_the_train_loader(tmp_path):
    _, _, model, _, callback, loader = _setup()
    with pytest.raises(SanitizerError, match="reload_dataloaders_every_n_epochs=1"):
        _trainer(tmp_path, [callback], reload_dataloaders_every_n_epochs=0).fit(model, train_dataloaders=loader)


def test_refuses_a_loader_that_is_not_wrapped(tmp_path):
    dataset, _, model, _, callback, _ = _setup()
    plain = DataLoader(dataset, batch_size=32, shuffle=True)
    with pytest.raises(SanitizerError, match="does not draw from the sanitizer"):
        _trainer(tmp_path, [callback]).fit(model, train_dataloaders=plain)


def test_refuses_a_sanitizer_built_on_another_model(tmp_path):
    dataset, _ = planted_dataset()
    callback = SanitizerCallback(Sanitizer(LitClassifier(), dataset, warmup=1))
    loader = callback.wrap(DataLoader(dataset, batch_size=32))
    with pytest.raises(SanitizerError, match="different model"):
        _trainer(tmp_path, [callback]).fit(LitClassifier(), train_dataloaders=loader)


def test_refuses_mismatched_length_and_iterable_datasets():
    dataset, _, _, _, callback, _ = _setup()
    other, _ = planted_dataset(per_class=50)
    with pytest.raises(SanitizerError, match="examples but the sanitizer was built on"):
        callback.wrap(DataLoader(other, batch_size=32))

    class Stream(IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.raises(SanitizerError, match="map-style dataset"):
        callback.wrap(DataLoader(Stream(), batch_size=32))


def test_mismatched_checkpoint_is_refused():
    _, _, _, sanitizer, callback, _ = _setup()
    state = callback.state_dict()
    other, _ = planted_dataset(per_class=50)
    with pytest.raises(SanitizerError, match="dataset of 300 examples"):
        SanitizerCallback(Sanitizer(LitClassifier(), other)).load_state_dict(state)


class _RecordRanks(L.Callback):
    """Each rank writes its keep mask and per-epoch example counts (ddp_spawn returns no callback state)."""

    def __init__(self, sanitizer: Sanitizer, out_dir: str) -> None:
        self.sanitizer, self.out_dir = sanitizer, out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"keep": torch.from_numpy(self.sanitizer.keep.copy()), "seen": torch.tensor(pl_module.seen),
                    "rounds": torch.tensor([r["epoch"] for r in self.sanitizer.history])},
                   f"{self.out_dir}/rank{trainer.global_rank}.pt")


def test_ddp_two_processes_share_one_keep_mask(tmp_path):
    dataset, planted, model, sanitizer, callback, loader = _setup()
    trainer = _trainer(tmp_path, [callback, _RecordRanks(sanitizer, str(tmp_path))], max_epochs=4,
                       strategy="ddp_spawn", devices=2, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=loader)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["keep"], ranks[1]["keep"])
    assert ranks[0]["rounds"].tolist() == [1, 3]
    dropped = np.flatnonzero(~ranks[0]["keep"].numpy())
    assert set(planted) <= set(dropped.tolist())
    # Lightning's DistributedSamplerWrapper splits the kept set evenly: equal counts on both ranks.
    assert torch.equal(ranks[0]["seen"], ranks[1]["seen"])
    assert ranks[0]["seen"][-1] == -(-(len(dataset) - len(dropped)) // 2)


def test_each_round_reaches_the_logger(tmp_path):
    import csv

    _, _, model, sanitizer, callback, loader = _setup()
    logger = L.loggers.CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, [callback], max_epochs=4, logger=logger, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=loader)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sanitizer/dropped_now")]
    logged = [(int(float(r["epoch"])), int(float(r["sanitizer/dropped_now"])), int(float(r["sanitizer/dropped_total"])))
              for r in rows]
    expected = [(r["epoch"], len(r["dropped_now"]), r["dropped_total"]) for r in sanitizer.history]
    assert [e for e, _, _ in expected] == [1, 3] and expected[0][1] > 0
    assert logged == expected
    assert trainer.callback_metrics["sanitizer/dropped_total"] == len(sanitizer.dropped)



class FrozenLit(LitClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_harvest_mode_matches_rows_to_indices_under_lightning(tmp_path):
    """With weights that do not move, the harvested round must equal a separate pass exactly."""
    from sanitizer.embeddings import gradient_embeddings

    dataset, _ = planted_dataset()
    model = FrozenLit()
    captured = {}
    sanitizer = Sanitizer(model, dataset, policy="none", warmup=1, every=2, seed=0, harvest=True, verbose=False,
                          round_hooks=[lambda s, e, cand, emb, sel: captured.update({e: (cand, emb.clone())})])
    callback = SanitizerCallback(sanitizer)
    loader = callback.wrap(DataLoader(dataset, batch_size=32, shuffle=True))
    _trainer(tmp_path, [callback], max_epochs=2, enable_checkpointing=False).fit(model, train_dataloaders=loader)
    candidates, emb = captured[1]
    record = sanitizer.history[-1]["harvest"]
    assert {k: record[k] for k in ("harvested", "embedded", "off")} == {"harvested": len(dataset), "embedded": 0,
                                                                        "off": None}
    assert record["check"]["ok"]
    assert torch.allclose(emb, gradient_embeddings(model, dataset, indices=candidates), atol=1e-5)


def test_harvest_mode_drops_the_planted_points(tmp_path):
    dataset, planted = planted_dataset()
    model = LitClassifier()
    sanitizer = Sanitizer(model, dataset, warmup=2, every=2, seed=0, harvest=True)
    callback = SanitizerCallback(sanitizer)
    loader = callback.wrap(DataLoader(dataset, batch_size=32, shuffle=True))
    _trainer(tmp_path, [callback], enable_checkpointing=False).fit(model, train_dataloaders=loader)
    assert all(r["harvest"]["harvested"] == r["candidates"] for r in sanitizer.history)
    assert set(planted) <= set(sanitizer.dropped.tolist())


class _RankLoaderLit(LitClassifier):
    """Builds its own rank's loader (use_distributed_sampler=False): a DistributedSampler that wrap() keeps."""

    def __init__(self, dataset, callback_box: list) -> None:
        super().__init__()
        self.dataset, self.callback_box = dataset, callback_box

    def train_dataloader(self):
        sampler = DistributedSampler(self.dataset, num_replicas=self.trainer.world_size, rank=self.global_rank)
        return self.callback_box[0].wrap(DataLoader(self.dataset, batch_size=32, sampler=sampler))


class _RecordHarvest(L.Callback):
    def __init__(self, sanitizer: Sanitizer, out_dir: str) -> None:
        self.sanitizer, self.out_dir = sanitizer, out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        rounds = [r["harvest"] for r in self.sanitizer.history]
        torch.save({"keep": torch.from_numpy(self.sanitizer.keep.copy()),
                    "candidates": torch.tensor([r["candidates"] for r in self.sanitizer.history]),
                    "harvested": torch.tensor([r["harvested"] for r in rounds]),
                    "off": [r["off"] or "" for r in rounds]}, f"{self.out_dir}/harvest{trainer.global_rank}.pt")


def test_ddp_spawn_harvests_each_ranks_rows_with_its_own_distributed_sampler(tmp_path):
    """ddp_spawn pickles the model (with its hook) and the sanitizer into each process; with each rank's
    order known (its DistributedSampler), the last round takes every candidate's row from training."""
    dataset, planted = planted_dataset()
    box: list = []
    model = _RankLoaderLit(dataset, box)
    sanitizer = Sanitizer(model, dataset, warmup=1, every=2, seed=0, harvest=True, verbose=False)
    box.append(SanitizerCallback(sanitizer))
    trainer = _trainer(tmp_path, [box[0], _RecordHarvest(sanitizer, str(tmp_path))], max_epochs=4,
                       strategy="ddp_spawn", devices=2, enable_checkpointing=False, use_distributed_sampler=False)
    trainer.fit(model)
    ranks = [torch.load(tmp_path / f"harvest{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["keep"], ranks[1]["keep"])
    assert set(planted) <= set(np.flatnonzero(~ranks[0]["keep"].numpy()).tolist())
    assert ranks[0]["off"] == ["", ""]  # harvesting stayed on in both rounds (no replica, no mismatch)
    assert ranks[0]["harvested"][-1] == ranks[0]["candidates"][-1] > 0  # every candidate of the epoch-3 round
