
import numpy as np
import pytest
import torch
from planted import planted_images, uninterrupted_and_resumed
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, WeightedRandomSampler

from sanitizer import Sanitizer
from sanitizer.data import ImageTensorDataset
from sanitizer.errors import SanitizerError
from sanitizer.models import CompactCNN
from sanitizer.noise_screen import gradient_rounds
from sanitizer.sampler import KeepSampler
from sanitizer.train import TrainConfig, train_classifier

planted_dataset = planted_images  # the name these tests use


def test_keep_sampler_yields_each_kept_index_once_and_never_a_dropped_one():
    mask = np.ones(50, dtype=bool)
    mask[[3, 7, 11]] = False
    s = KeepSampler(lambda: mask, shuffle=True, seed=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        out = list(s)
        assert sorted(out) == list(np.flatnonzero(mask))
        assert len(s) == 47
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first  # reshuffled per epoch
    s.set_epoch(0)
    assert list(s) == first  # but reproducible


def test_dropping_examples_does_not_reshuffle_the_rest():
    full = np.ones(200, dtype=bool)
    defended = full.copy()
    defended[[4, 60, 61, 150]] = False
    for epoch in range(3):
        twin, sampler = KeepSampler(lambda: full, seed=7), KeepSampler(lambda: defended, seed=7)
        twin.set_epoch(epoch)
        sampler.set_epoch(epoch)
        undefended_order = [i for i in twin if defended[i]]
        assert list(sampler) == undefended_order  # the twin's order with the dropped indices skipped


def test_keep_sampler_ranks_partition_with_equal_lengths():
    mask = np.ones(23, dtype=bool)
    mask[5] = False
    parts = [list(KeepSampler(lambda: mask, True, 0, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    assert set().union(*parts) == set(np.flatnonzero(mask))


def test_wrap_copies_loader_settings_and_filters():
    ds, _ = planted_dataset()
    model = CompactCNN(1, 2, width=4)
    san = Sanitizer(model, ds, warmup=0, every=1)
    collate = torch.utils.data.default_collate
    loader = DataLoader(ds, batch_size=16, shuffle=True, drop_last=True, collate_fn=collate, pin_memory=False)
    wrapped = san.wrap(loader)
    assert wrapped.batch_size == 16 and wrapped.drop_last and wrapped.collate_fn is collate
    assert wrapped.dataset is ds
    san.keep[:10] = False
    seen = [int(i) for _, _, idx in wrapped for i in idx]
    assert not set(range(10)) & set(seen)
    assert len(seen) == (len(ds) - 10) // 16 * 16


def test_wrap_rejects_unsupported_loaders():
    ds, _ = planted_dataset()
    san = Sanitizer(CompactCNN(1, 2, width=4), ds)
    weighted = DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler(torch.ones(len(ds)), 10))
    with pytest.raises(SanitizerError, match="custom sampler"):
        san.wrap(weighted)
    batch_sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ds), 4, False)
    with pytest.raises(SanitizerError, match="batch_sampler"):
        san.wrap(DataLoader(ds, batch_sampler=batch_sampler))


def test_iterable_dataset_and_changing_length_are_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1, 8, 8), 0

    with pytest.raises(SanitizerError, match="IterableDataset"):
        Sanitizer(CompactCNN(1, 2, width=4), Stream())

    class Growing(TensorDataset):
        extra = 0

        def __len__(self):
            return super().__len__() + self.extra

    ds = Growing(torch.rand(20, 1, 8, 8), torch.arange(20) % 2)
    san = Sanitizer(CompactCNN(1, 2, width=4), ds)
    ds.extra = 1
    with pytest.raises(SanitizerError, match="changed length"):
        san.run_round(0)


def test_mismatched_embed_dataset_is_refused():
    ds, _ = planted_dataset()
    short = ImageTensorDataset(ds.images[:10], ds.labels[:10])
    with pytest.raises(SanitizerError, match="same examples"):
        Sanitizer(CompactCNN(1, 2, width=4), ds, embed_dataset=short)


def test_schedule():
    ds, _ = planted_dataset()
    san = Sanitizer(CompactCNN(1, 2, width=4), ds, warmup=3, every=2, stop_epoch=7)
    assert [e for e in range(12) if san.is_round_epoch(e)] == [3, 5, 7]


def run(ds, epochs, san_kwargs, stop_after=None, state=None):
    torch.manual_seed(0)
    model = CompactCNN(1, 2, width=4)
    cfg = TrainConfig(epochs=epochs, lr=0.05, batch_size=32, augment=False, seed=0)
    san = Sanitizer(model, ds, **san_kwargs)
    train_classifier(model, ds, cfg, sanitizer=san)
    return model, san


def test_planted_points_are_dropped_during_training():
    ds, planted = planted_dataset()
    _, san = run(ds, 6, dict(warmup=3, every=2))
    assert set(planted) <= set(san.dropped)
    assert san.history[0]["kind"] == "screen" and san.history[0]["epoch"] == 0  # the noise screen first
    rounds = gradient_rounds(san.history)
    assert len(rounds) == 2 and rounds[0]["epoch"] == 3
    assert len(san.dropped) <= len(planted) + 8  # a few clean false positives out of 240


def test_resume_from_state_dict_reproduces_the_uninterrupted_run():
    ds, _ = planted_dataset()
    cfg = TrainConfig(epochs=6, lr=0.05, batch_size=32, augment=False, seed=0)
    (model, san), (model3, san3) = uninterrupted_and_resumed(ds, cfg, stop=3, warmup=2, every=2,
                                                                  policy_options={"threshold": 2.0})

    np.testing.assert_array_equal(san.dropped, san3.dropped)
    assert [r["dropped_now"] for r in san.history] == [r["dropped_now"] for r in san3.history]
    for a, b in zip(model.state_dict().values(), model3.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_an_epoch_checkpoint_resumes_its_own_run_and_ignores_another(tmp_path):
    from sanitizer.train import EpochCheckpoint, continue_training, make_optimizer

    ds, _ = planted_dataset()
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=32, augment=False, seed=0)

    def fresh():
        torch.manual_seed(0)
        model = CompactCNN(1, 2, width=4)
        return (model, *make_optimizer(model, cfg), Sanitizer(model, ds, warmup=1, every=2, verbose=False))

    model, opt, sched, san = fresh()
    continue_training(model, ds, cfg, opt, sched, san, 0, 4)
    path, notes = tmp_path / "run.pt", {"seen": {}}
    model2, opt2, sched2, san2 = fresh()
    continue_training(model2, ds, cfg, opt2, sched2, san2, 0, 2, checkpoint=EpochCheckpoint(path, "run", notes),
                      on_epoch_end=lambda e, m: notes["seen"].update({e: True}))
    other = EpochCheckpoint(path, "another run")
    assert other.restore(*fresh()) is None and other.resumed_at is None
    resumed_notes = {"seen": {}}
    model3, opt3, sched3, san3 = fresh()
    checkpoint = EpochCheckpoint(path, "run", resumed_notes)
    result = continue_training(model3, ds, cfg, opt3, sched3, san3, 0, 4, checkpoint=checkpoint)
    assert checkpoint.resumed_at == 2 and resumed_notes["seen"] == {0: True, 1: True}  # the saved extra is back
    assert result.seconds > 0 and len(result.epoch_seconds) == 2                     # only epochs 2 and 3 ran
    np.testing.assert_array_equal(san.keep, san3.keep)
    for a, b in zip(model.state_dict().values(), model3.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_state_dict_refuses_another_dataset():
    ds, _ = planted_dataset()
    san = Sanitizer(CompactCNN(1, 2, width=4), ds)
    other = Sanitizer(CompactCNN(1, 2, width=4), ImageTensorDataset(ds.images[:50], ds.labels[:50]))
    with pytest.raises(SanitizerError, match="50"):
        other.load_state_dict(san.state_dict())


def test_non_cumulative_mode_can_bring_examples_back():
    ds, _ = planted_dataset()
    san = Sanitizer(CompactCNN(1, 2, width=4), ds, cumulative=False, policy="random",
                    policy_options={"count": 5}, warmup=0, every=1)
    san.run_round(0)
    first = set(san.dropped)
    san.run_round(1)
    assert len(san.dropped) == 5 and set(san.dropped) != first


# -- load_state_dict refuses what it cannot resume, and names the fix --------------------------------------
def _saved(**kwargs):
    ds, _ = planted_dataset()
    san = Sanitizer(CompactCNN(1, 2, width=4), ds, warmup=0, every=1, verbose=False, **kwargs)
    san.run_round(0)
    return ds, san, san.state_dict()


@pytest.mark.parametrize("keep, problem", [
    (torch.ones(239, dtype=torch.bool), r"shape \(239,\), expected \(240,\)"),
    (torch.ones(240, 1, dtype=torch.bool), r"shape \(240, 1\)"),
    (torch.ones(240, dtype=torch.uint8), "dtype uint8, expected bool"),
    (torch.ones(240), "dtype float32"),
])
def test_a_keep_mask_of_the_wrong_length_shape_or_dtype_is_refused(keep, problem):
    ds, _, state = _saved()
    fresh = Sanitizer(CompactCNN(1, 2, width=4), ds, verbose=False)
    state["keep"] = keep
    with pytest.raises(SanitizerError, match=problem):
        fresh.load_state_dict(state)
    assert fresh.keep.all() and not fresh.history  # nothing was half-loaded


def test_a_state_of_another_policy_or_with_missing_keys_is_refused():
    ds, _, state = _saved(policy="random", policy_options={"count": 3})
    with pytest.raises(SanitizerError, match="policy 'random'.*build it with policy='random'"):
        Sanitizer(CompactCNN(1, 2, width=4), ds).load_state_dict(state)
    del state["keep"], state["seed"]
    with pytest.raises(SanitizerError, match="lacks 'keep', 'seed'.*Sanitizer.state_dict"):
        Sanitizer(CompactCNN(1, 2, width=4), ds, policy="random", policy_options={"count": 3}).load_state_dict(state)
    with pytest.raises(SanitizerError, match="lacks 'version'"):  # the model's state by mistake
        Sanitizer(CompactCNN(1, 2, width=4), ds).load_state_dict(CompactCNN(1, 2, width=4).state_dict())


def test_a_resumed_state_with_another_seed_is_adopted_loudly_and_the_sampler_follows_it():
    ds, first, state = _saved(seed=1)
    same = Sanitizer(CompactCNN(1, 2, width=4), ds, seed=1, verbose=False)
    expected = same.wrap(DataLoader(ds, batch_size=16, shuffle=True))
    other = Sanitizer(CompactCNN(1, 2, width=4), ds, seed=0, verbose=False)
    loader = other.wrap(DataLoader(ds, batch_size=16, shuffle=True))
    fixed = other.sampler(seed=7)  # an explicitly seeded sampler keeps its seed
    same.load_state_dict(state)
    with pytest.warns(UserWarning, match="saved with seed=1 but this Sanitizer was built with seed=0; adopting"):
        other.load_state_dict(state)
    assert other.seed == 1 and fixed.seed == 7
    other.start_epoch(1)
    same.start_epoch(1)
    assert list(loader.sampler) == list(expected.sampler)
    assert [r["dropped_now"] for r in other.history] == [r["dropped_now"] for r in same.history]


# -- a round may not empty the training set ----------------------------------------------------------------
def test_a_round_that_would_drop_every_example_raises_and_drops_nothing():
    ds, _ = planted_dataset()
    san = Sanitizer(CompactCNN(1, 2, width=4), ds, warmup=0, every=1, policy="random",
                    policy_options={"count": len(ds)}, verbose=False)
    loader = san.wrap(DataLoader(ds, batch_size=16))
    with pytest.raises(SanitizerError, match="would drop all 240 remaining examples"):
        san.start_epoch(0)
    assert san.keep.all() and not san.history and len(loader) == 15


def test_a_round_that_drops_the_last_examples_of_a_class_warns():
    from sanitizer.policies import Policy, Selection

    class DropClassOne(Policy):
        name = "drop-class-one"

        def select(self, embeddings, labels, num_classes=None, seed=0):
            labels = np.asarray(labels)
            return Selection(labels != 1, (labels == 1).astype(float), {})

    ds, _ = planted_dataset()
    san = Sanitizer(CompactCNN(1, 2, width=4), ds, warmup=0, every=1, policy=DropClassOne(), verbose=False)
    with pytest.warns(UserWarning, match=r"every remaining example of class\(es\) \[1\]"):
        san.start_epoch(0)
    assert len(san.dropped) == 120


def test_wrapping_every_epoch_does_not_grow_the_sanitizer():
    import gc

    from tests.planted import planted_dataset as blobs
    from tests.planted import tiny_mlp

    data, _ = blobs(per_class=20, planted_per_class=0)
    san = Sanitizer(tiny_mlp(), data, warmup=0, every=1, verbose=False)
    for epoch in range(20):
        loader = san.wrap(DataLoader(data, batch_size=8, shuffle=True))
        san.start_epoch(epoch)
        assert loader.sampler.epoch == epoch  # the live loader still follows the epochs
    gc.collect()
    assert len(san._samplers) == 1  # only the last loader's sampler is alive
