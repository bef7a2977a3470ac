"""Bad inputs that used to be silently wrong now get a clear error (a first batch of issue 13's list)."""

import numpy as np
import pytest
import torch

from sanitizer import Sanitizer, gradient_embeddings, select
from sanitizer.data import ImageTensorDataset
from sanitizer.errors import SanitizerError
from sanitizer.models import CompactCNN


@pytest.fixture(scope="module")
def small():
    gen = torch.Generator().manual_seed(0)
    return CompactCNN(1, 2, 4), ImageTensorDataset(torch.rand(20, 1, 8, 8, generator=gen), torch.arange(20) % 2)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -1.0, 0.0, "high"])
def test_a_threshold_that_would_drop_nothing_is_refused(threshold):
    with pytest.raises(SanitizerError, match="threshold"):
        select(np.random.default_rng(0).normal(size=(30, 4)), np.zeros(30, int), threshold=threshold)


def test_embeddings_without_coordinates_or_complex_are_refused():
    y = np.zeros(10, int)
    with pytest.raises(SanitizerError, match="no coordinates"):
        select(np.zeros((10, 0)), y)
    with pytest.raises(SanitizerError, match="complex"):
        select(np.ones((10, 3)) * (1 + 2j), y)


@pytest.mark.parametrize("k", [0, 2.5, True])
def test_k_must_be_a_positive_integer(k):
    with pytest.raises(SanitizerError, match="k must be"):
        select(np.random.default_rng(0).normal(size=(30, 4)), np.zeros(30, int), k=k)


def test_negative_or_out_of_range_indices_are_refused(small):
    model, data = small
    with pytest.raises(SanitizerError, match="index -1"):
        gradient_embeddings(model, data, indices=[-1])
    with pytest.raises(SanitizerError, match="index 20"):
        gradient_embeddings(model, data, indices=[0, 20])
    with pytest.raises(SanitizerError, match="batch_size"):
        gradient_embeddings(model, data, batch_size=0)
    with pytest.raises(SanitizerError, match="max_dim"):
        gradient_embeddings(model, data, max_dim=0)


@pytest.mark.parametrize("kwargs", [{"every": 1.5}, {"warmup": -1}, {"every": 0}, {"epochs": 0},
                                    {"stop_epoch": 2.5}])
def test_fractional_or_negative_schedules_are_refused(small, kwargs):
    model, data = small
    with pytest.raises(SanitizerError):
        Sanitizer(model, data, **kwargs)
