"""The input-noise screen: the estimate, the outlier rule, and how the Sanitizer runs it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sanitizer import Sanitizer
from sanitizer.data import ImageTensorDataset
from sanitizer.errors import SanitizerError
from sanitizer.models import CompactCNN
from sanitizer.noise_screen import QUANTISATION_FLOOR, noise_outliers, patch_noise_floor


def natural_images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """Smooth, colour-correlated 8-bit images with a little sensor noise (about 2/255, varying from
    image to image): low-rank patches plus a noise floor, like photographs."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=(size, size), mode="bicubic",
                         align_corners=False)
    colour = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    sensor = 2 / 255 * torch.exp(0.15 * torch.randn(n, 1, 1, 1, generator=g))
    images = base * colour + 0.1 * torch.rand(n, 3, 1, 1, generator=g)
    images = (images + sensor * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return (images * 255).round() / 255


def perturb(images: torch.Tensor, eps: float, seed: int = 1) -> torch.Tensor:
    """An ℓ∞-bounded perturbation with independent pixels and channels (what poisons look like)."""
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand(images.shape, generator=g) * 2 - 1) * eps
    return ((images + delta).clamp(0, 1) * 255).round() / 255


def test_the_floor_estimates_the_variance_of_added_white_noise():
    flat = torch.full((20, 3, 16, 16), 0.5)
    for sigma in (0.01, 0.03, 0.1):
        noisy = flat + sigma * torch.randn(flat.shape, generator=torch.Generator().manual_seed(0))
        floor = patch_noise_floor(noisy, smallest=3)
        # the smallest eigenvalues of a 27×27 sample covariance of 196 patches sit below sigma² (the
        # Marchenko–Pastur lower edge, (1 − sqrt(27/196))² ≈ 0.40 of it), and above that edge's half
        assert (floor < sigma ** 2).all() and (floor > 0.2 * sigma ** 2).all(), (sigma, floor[:3])
    # a flat image has no noise: the estimate stops at 8-bit quantisation noise
    assert torch.allclose(patch_noise_floor(flat), torch.full((20,), QUANTISATION_FLOOR, dtype=torch.float64))


def test_perturbed_images_stand_out_and_clean_ones_do_not():
    clean = natural_images(400)
    floor_clean = patch_noise_floor(clean)
    floor_poisoned = patch_noise_floor(perturb(clean[:40], 8 / 255))
    assert (floor_poisoned > floor_clean[:40]).all()
    images = torch.cat([perturb(clean[:40], 8 / 255), clean[40:]])
    labels = torch.zeros(400, dtype=torch.long)
    flagged, z = noise_outliers(patch_noise_floor(images), labels)
    assert flagged[:40].mean() >= 0.95          # recall on a tight group of perturbed images
    assert flagged[40:].mean() <= 0.01          # at most 1 % of the clean images
    assert z.shape == (400,)


def test_a_class_of_uniformly_noisy_images_is_not_emptied():
    """The reference is the class itself: a class that is noisy throughout is normal for itself."""
    clean = natural_images(300, seed=2)
    images = torch.cat([clean[:150], perturb(clean[150:], 16 / 255)])
    labels = torch.cat([torch.zeros(150), torch.ones(150)]).long()
    flagged, _ = noise_outliers(patch_noise_floor(images), labels)
    assert flagged[:150].mean() <= 0.02 and flagged[150:].mean() <= 0.02


def test_tiny_classes_get_no_score_and_bad_images_a_clear_error():
    flagged, z = noise_outliers(np.array([1e-3, 1e-1, 1e-4]), np.array([0, 0, 1]))
    assert not flagged.any() and (z == 0).all()
    with pytest.raises(SanitizerError, match="NaN"):
        patch_noise_floor(torch.full((2, 3, 8, 8), float("nan")))
    with pytest.raises(SanitizerError, match="float images"):
        patch_noise_floor(torch.zeros(4, 10))
    assert patch_noise_floor(torch.rand(3, 8, 8)).shape == (3,)  # [N, H, W]: one channel


def screened_dataset():
    clean = natural_images(240, seed=3)
    labels = torch.arange(240) % 2
    images = clean.clone()
    planted = np.arange(0, 24, 2)  # 12 perturbed images of class 0
    images[planted] = perturb(clean[planted], 16 / 255)
    return ImageTensorDataset(images, labels, None, 2), planted


def test_the_sanitizer_screens_once_when_training_starts():
    ds, planted = screened_dataset()
    san = Sanitizer(CompactCNN(3, 2, 4), ds, warmup=3, every=2, epochs=6, verbose=False)
    san.start_epoch(0)
    assert set(planted) <= set(san.dropped.tolist()) and len(san.dropped) <= len(planted) + 3
    (record,) = san.history
    assert record["kind"] == "screen" and record["epoch"] == 0 and record["policy"] == "noise_screen"
    assert sorted(record["dropped_now"]) == san.dropped.tolist()
    san.start_epoch(1)
    assert len(san.history) == 1  # once
    # resumed from a checkpoint: the screen is not run again
    resumed = Sanitizer(CompactCNN(3, 2, 4), ds, warmup=3, every=2, epochs=6, verbose=False)
    resumed.load_state_dict(san.state_dict())
    resumed.start_epoch(2)
    assert len(resumed.history) == 1 and resumed.dropped.tolist() == san.dropped.tolist()


def test_audit_screens_without_dropping_and_screen_false_turns_it_off():
    ds, planted = screened_dataset()
    audit = Sanitizer(CompactCNN(3, 2, 4), ds, warmup=3, epochs=6, audit=True, verbose=False)
    audit.start_epoch(0)
    assert len(audit.dropped) == 0
    assert (audit.scores("noise_screen", 0)[planted] > 3.5).all()
    off = Sanitizer(CompactCNN(3, 2, 4), ds, warmup=3, epochs=6, policy_options={"screen": False}, verbose=False)
    off.start_epoch(0)
    assert off.history == [] and len(off.dropped) == 0
    epic = Sanitizer(CompactCNN(3, 2, 4), ds, policy="epic-0.1", warmup=3, epochs=6, verbose=False)
    epic.start_epoch(0)
    assert epic.history == []  # the screen belongs to the density policy


def test_inputs_that_are_not_images_are_not_screened():
    x = torch.randn(60, 5)
    ds = torch.utils.data.TensorDataset(x, torch.arange(60) % 2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    san = Sanitizer(model, ds, warmup=1, epochs=3, verbose=False)
    san.start_epoch(0)
    assert san.history == [] and len(san.dropped) == 0


def test_screen_dataset_lets_feature_training_be_screened_on_its_images():
    ds, planted = screened_dataset()
    features = torch.utils.data.TensorDataset(ds.images.flatten(1)[:, :8], ds.labels)
    head = torch.nn.Linear(8, 2)
    san = Sanitizer(head, features, screen_dataset=ds, warmup=3, epochs=6, verbose=False)
    san.start_epoch(0)
    assert set(planted) <= set(san.dropped.tolist())
    with pytest.raises(SanitizerError, match="screen_dataset has 10 examples"):
        Sanitizer(head, features, screen_dataset=torch.utils.data.Subset(ds, range(10)), epochs=6)


def test_a_class_holding_a_group_of_mildly_noisy_images_gets_the_lower_cut():
    """Poisons come in groups: a class whose tail (z > 2.5) is an outlier among the classes' tails is
    cut at 2.5; the other classes keep 3.5."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 500)
    log_floor = rng.normal(0, 1, len(labels))
    group = np.flatnonzero(labels == 3)[:50]
    log_floor[group] = rng.uniform(3.3, 3.9, 50)
    floor = np.exp(log_floor)
    fixed, _ = noise_outliers(floor, labels, group_cut=None)
    grouped, z = noise_outliers(floor, labels)
    assert (z[group] > 2.5).all() and (z[group] < 3.5).all()  # above the class's bulk, below the usual cut
    assert fixed[group].sum() == 0 and grouped[group].all()
    others = labels != 3
    assert (grouped[others] == fixed[others]).all()  # the other classes keep the usual cut
    clean_3 = (labels == 3) & ~np.isin(np.arange(len(labels)), group)
    assert grouped[clean_3].mean() <= 0.02  # at most 2 % of the class's clean examples
    # no group: the tails are alike and nobody gets the lower cut
    plain = np.exp(rng.normal(0, 1, len(labels)))
    assert (noise_outliers(plain, labels)[0] == noise_outliers(plain, labels, group_cut=None)[0]).all()
