"""A new user's mistakes surface when the Sanitizer is built, not after the warm-up epochs."""

import warnings

import pytest
import torch
from torch import nn

from sanitizer import Sanitizer
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
        Sanitizer(CompactCNN(1, 2, 4), noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sanitizer(CompactCNN(1, 2, 4), noisy, embed_dataset=noisy.without_transform())


def test_a_schedule_that_never_runs_a_round_warns_early_and_at_the_last_epoch():
    with pytest.warns(UserWarning, match="no sanitization round will run"):
        san = Sanitizer(CompactCNN(1, 2, 4), data(), warmup=10, every=5, epochs=10)
    for epoch in range(9):
        san.start_epoch(epoch)
    with pytest.warns(UserWarning, match="no sanitization round has run"):
        san.start_epoch(9)


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
    assert table[0].startswith("round 0 at epoch 0") and len(table) == 2 + 2  # header, columns, 2 classes
    assert table[2].split()[0] == "0" and int(table[2].split()[1]) + int(table[2].split()[2]) == 20
