import os

import pytest
import torch

os.environ.setdefault("SANITIZER_PROGRESS", "0")
# one thread per xdist worker (the workers already share the cores); two otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_images():
    """Two well-separated classes of random 1x6x6 images and labels."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(60, 1, 6, 6, generator=gen)
    y = torch.arange(60) % 2
    x[y == 1] += 1.0
    return x / 2, y
