"""A new user's mistakes surface when the Sanitizer is built, not after the warm-up epochs."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from planted import planted_blobs, tiny_mlp, weights
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sanitizer
from sanitizer import RoundRecord, SanitizedLoader, Sanitizer
from sanitizer.data import ImageTensorDataset
from sanitizer.errors import SanitizerError
from sanitizer.models import CompactCNN


def data(n=40, transform=None):
    gen = torch.Generator().manual_seed(0)
    return ImageTensorDataset(torch.rand(n, 1, 8, 8, generator=gen), torch.arange(n) % 2, transform, 2)


class NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 8)

    def forward(self, x):
        return self.conv(x).flatten(1)


def test_a_model_without_a_last_linear_layer_fails_at_construction_and_names_the_option():
    with pytest.raises(SanitizerError, match="embedding='params'"):
        Sanitizer(NoLinear(), data())
    Sanitizer(NoLinear(), data(), embedding="params")  # the suggested fix works


def test_items_the_model_cannot_take_fail_at_construction():
    class Words(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return "a string", i % 2

    with pytest.raises(SanitizerError, match="one example of embed_dataset"):
        Sanitizer(CompactCNN(1, 2, 4), Words())


def test_an_augmented_embed_dataset_warns():
    noisy = data(transform=lambda x: x + 0.01 * torch.randn_like(x))
    with pytest.warns(UserWarning, match="different example each time"):
        Sanitizer(CompactCNN(1, 2, 4), noisy, epochs=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sanitizer(CompactCNN(1, 2, 4), noisy, embed_dataset=noisy.without_transform(), epochs=10)


def test_a_schedule_that_never_runs_a_round_warns_early_and_at_the_last_epoch():
    with pytest.warns(UserWarning, match="no sanitization round will run"):
        san = Sanitizer(CompactCNN(1, 2, 4), data(), warmup=10, every=5, epochs=10)
    for epoch in range(9):
        san.start_epoch(epoch)
    with pytest.warns(UserWarning, match="no sanitization round has run"):
        san.start_epoch(9)


def test_a_sanitizer_that_does_not_know_the_run_length_says_so():
    # A README-only script with a 10-epoch loop and no schedule: it must run a round or say why not.
    with pytest.warns(UserWarning, match="Pass epochs="):
        Sanitizer(CompactCNN(1, 2, 4), data())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        san = Sanitizer(CompactCNN(1, 2, 4), data(), epochs=10)
    assert any(san.is_round_epoch(e) for e in range(10))


def test_one_log_line_per_round_by_default_and_a_summary_table():
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    san = Sanitizer(CompactCNN(1, 2, 4), data(), warmup=0, every=1)
    assert "no sanitization round has run yet" in san.summary()
    collect = Collect()
    logger = logging.getLogger("sanitizer")
    logger.addHandler(collect)
    try:
        san.start_epoch(0)
    finally:
        logger.removeHandler(collect)
    assert sum("[sanitizer] epoch 0" in m for m in collect.messages) == 1
    table = san.summary(top=2).splitlines()
    # round 0 is the input-noise screen, which ran first at epoch 0
    assert table[0].startswith("round 1 at epoch 0") and len(table) == 2 + 2  # header, columns, 2 classes
    assert table[2].split()[0] == "0" and int(table[2].split()[1]) + int(table[2].split()[2]) == 20


# -- the one-call set-up: sanitizer.attach -------------------------------------------------------------
def _blobs():
    """The planted blobs as plain (x, y) pairs, so loops read `for x, y in loader:`."""
    images, labels, planted = planted_blobs()
    return TensorDataset(images, labels), planted


def _fresh(seed=0):
    model = tiny_mlp(seed)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _train_one_epoch(model, optimizer, loader):
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _explicit_run(dataset, epochs=10):
    model, optimizer = _fresh()
    san = Sanitizer(model, dataset, epochs=epochs, verbose=False)
    loader = san.wrap(DataLoader(dataset, batch_size=32, shuffle=True))
    for epoch in range(epochs):
        san.start_epoch(epoch)
        _train_one_epoch(model, optimizer, loader)
    return model, san


def test_attach_runs_the_same_rounds_and_drops_the_same_examples_as_the_explicit_api():
    dataset, planted = _blobs()
    model, san = _explicit_run(dataset)

    model2, optimizer2 = _fresh()
    loader = sanitizer.attach(model2, DataLoader(dataset, batch_size=32, shuffle=True), epochs=10, verbose=False)
    assert isinstance(loader, SanitizedLoader) and loader.batch_size == 32
    for _ in range(10):
        _train_one_epoch(model2, optimizer2, loader)

    assert [r["epoch"] for r in san.history] == [3, 5, 7, 9]  # the default schedule for 10 epochs
    assert [r["epoch"] for r in loader.sanitizer.history] == [3, 5, 7, 9]
    assert [r["dropped_now"] for r in loader.sanitizer.history] == [r["dropped_now"] for r in san.history]
    assert set(planted) <= set(loader.sanitizer.dropped.tolist())
    assert loader.sanitizer.epoch == 9
    for key, value in weights(model).items():
        assert torch.equal(weights(model2)[key], value), key


def test_attach_resumes_from_a_checkpoint_with_the_next_epoch():
    dataset, _ = _blobs()
    model, san = _explicit_run(dataset)

    def attached():
        model, optimizer = _fresh()
        loader = sanitizer.attach(model, DataLoader(dataset, batch_size=32, shuffle=True), epochs=10,
                                  verbose=False)
        return model, optimizer, loader

    model2, optimizer2, loader2 = attached()
    for _ in range(6):  # epochs 0-5: the rounds at 3 and 5 have run
        _train_one_epoch(model2, optimizer2, loader2)
    checkpoint = copy.deepcopy({"model": model2.state_dict(), "optimizer": optimizer2.state_dict(),
                                "sanitizer": loader2.sanitizer.state_dict()})
    assert [r["epoch"] for r in checkpoint["sanitizer"]["history"]] == [3, 5]

    model3, optimizer3, loader3 = attached()
    model3.load_state_dict(checkpoint["model"])
    optimizer3.load_state_dict(checkpoint["optimizer"])
    loader3.sanitizer.load_state_dict(checkpoint["sanitizer"])
    for _ in range(6, 10):
        _train_one_epoch(model3, optimizer3, loader3)
    assert [r["epoch"] for r in loader3.sanitizer.history] == [3, 5, 7, 9]
    assert np.array_equal(loader3.sanitizer.dropped, san.dropped)
    for key, value in weights(model).items():
        assert torch.equal(weights(model3)[key], value), key


def test_attach_passes_sanitizer_options_and_refuses_what_is_not_a_loader():
    dataset, _ = _blobs()
    loader = sanitizer.attach(tiny_mlp(), DataLoader(dataset, batch_size=300), warmup=0, every=1, policy="random",
                              policy_options={"count": 7}, verbose=False)
    assert sum(len(y) for _, y in loader) == 300 - 7  # the round at epoch 0 ran before the first batch
    assert loader.sanitizer.policy.name == "random" and loader.sanitizer.epoch == 0
    with pytest.raises(SanitizerError, match="DataLoader"):
        sanitizer.attach(tiny_mlp(), dataset)


def test_a_pass_with_no_batches_left_raises_instead_of_yielding_nothing():
    dataset, _ = _blobs()
    loader = sanitizer.attach(tiny_mlp(), DataLoader(dataset, batch_size=296, drop_last=True), warmup=0, every=1,
                              policy="random", policy_options={"count": 5}, verbose=False)
    with pytest.raises(SanitizerError, match="no batches"):
        iter(loader)


# -- dict items: to_xy -----------------------------------------------------------------------------------
class NamedDicts(torch.utils.data.Dataset):
    """Hugging Face style items whose keys are not the model's keyword arguments."""

    def __init__(self, images, labels):
        self.images, self.labels_ = images, labels

    def __len__(self):
        return len(self.labels_)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels_[i])}


def test_dict_items_fail_with_a_message_naming_to_xy_and_to_xy_fixes_them():
    images, labels, _ = planted_blobs()
    with pytest.raises(SanitizerError, match=r"to_xy=lambda item: \(input, label\)"):
        Sanitizer(tiny_mlp(), NamedDicts(images, labels))

    model = tiny_mlp()
    san = Sanitizer(model, NamedDicts(images, labels), to_xy=lambda d: (d["image"], d["label"]), warmup=0, every=1,
                    verbose=False)
    assert np.array_equal(san.labels, labels.numpy())
    san.start_epoch(0)
    reference = Sanitizer(model, TensorDataset(images, labels), warmup=0, every=1, verbose=False)
    reference.start_epoch(0)
    np.testing.assert_allclose(san.last_scores, reference.last_scores, rtol=1e-5)  # the same examples embedded
    assert san.history[0]["candidates"] == 300


def test_items_without_any_label_entry_and_a_broken_to_xy_name_the_fix():
    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"img": torch.zeros(1, 2, 4), "target": i % 3}

    with pytest.raises(SanitizerError, match="to_xy="):
        Sanitizer(tiny_mlp(), Unlabelled())
    with pytest.raises(SanitizerError, match="to_xy raised KeyError"):
        Sanitizer(tiny_mlp(), Unlabelled(), to_xy=lambda d: (d["image"], d["target"]))
    with pytest.raises(SanitizerError, match=r"\(input, label\) pair"):
        Sanitizer(tiny_mlp(), Unlabelled(), to_xy=lambda d: d["img"])
    Sanitizer(tiny_mlp(), Unlabelled(), to_xy=lambda d: (d["img"], d["target"]))  # the fix


# -- round records print as one line ------------------------------------------------------------------------
def test_round_records_print_as_one_line_and_stay_plain_dicts_in_the_state(tmp_path):
    dataset, _ = _blobs()
    san = Sanitizer(tiny_mlp(), dataset, warmup=0, every=1, policy="random", policy_options={"count": 4},
                    verbose=False)
    record = san.start_epoch(0)
    assert record is san.history[-1] and isinstance(record, RoundRecord) and isinstance(record, dict)
    line = str(record)
    assert line == repr(record) and "\n" not in line and len(line) < 200
    assert "round 0 at epoch 0" in line and "dropped 4 of 300 candidates, 4 in total" in line
    assert len(str(dict(record))) > 2 * len(line)  # what print showed before
    assert json.loads(json.dumps(record)) == json.loads(json.dumps(dict(record)))
    assert record["per_class"]["0"]["candidates"] == 100

    torch.save(san.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert all(type(r) is dict for r in state["history"])
    resumed = Sanitizer(tiny_mlp(), dataset, warmup=0, every=1, policy="random", policy_options={"count": 4},
                        verbose=False)
    resumed.load_state_dict(state)
    assert isinstance(resumed.history[0], RoundRecord) and resumed.history[0] == record
    assert resumed.history[0].metrics() == {"sanitizer/round": 0.0, "sanitizer/dropped_now": 4.0,
                                            "sanitizer/dropped_total": 4.0, "sanitizer/candidates": 300.0}


def test_an_audit_record_says_what_would_be_dropped():
    dataset, _ = _blobs()
    san = Sanitizer(tiny_mlp(), dataset, warmup=0, every=1, policy="random", policy_options={"count": 3},
                    audit=True, verbose=False)
    line = str(san.start_epoch(0))
    assert "would drop 3 of 300 candidates (audit: nothing dropped)" in line and "audit" in line.split(";")[-1]
    assert san.history[0].metrics()["sanitizer/dropped_now"] == 3.0 and not len(san.dropped)
