"""The shared-pattern screen: stamped triggers are found, natural images and low-entropy data are left alone."""

import numpy as np
import torch

from sanitizer import Sanitizer
from sanitizer.attacks.triggers import make_trigger, stamp_trigger
from sanitizer.data import ImageTensorDataset
from sanitizer.models import CompactCNN
from sanitizer.shared_patterns import WindowCollector, shared_pattern_outliers, window_keys


def photos(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """8-bit colour images with texture everywhere (no two windows alike by chance)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).round() / 255


def stamped_dataset(n: int = 400, poisons: int = 12, classes: int = 4, location: str = "bottom_right"):
    images, labels = photos(n), torch.arange(n) % classes
    idx = torch.arange(0, poisons * classes, classes)  # all in class 0
    images[idx] = stamp_trigger(images[idx], make_trigger(3, 3), location, 1, torch.Generator().manual_seed(0))
    return images, labels, idx.numpy()


def test_a_stamped_group_is_flagged_and_nothing_else():
    for location in ("bottom_right", "random"):
        images, labels, planted = stamped_dataset(location=location)
        flagged, info = shared_pattern_outliers(*window_keys(images), labels.numpy())
        assert info["applied"] and info["repeat_rate"] < 0.01
        assert set(np.flatnonzero(flagged)) == set(planted), location
        assert info["groups"][0]["class"] == 0 and info["groups"][0]["images"] == len(planted)


def test_a_pattern_every_class_shares_is_not_a_trigger():
    images, labels = photos(400), torch.arange(400) % 4
    images[:40] = stamp_trigger(images[:40], make_trigger(3, 3))  # ten per class: a watermark, not a backdoor
    flagged, info = shared_pattern_outliers(*window_keys(images), labels.numpy())
    assert info["applied"] and not flagged.any()


def test_too_few_copies_are_chance_and_low_entropy_images_are_not_tested():
    images, labels, planted = stamped_dataset(poisons=4)  # below MIN_GROUP
    flagged, _ = shared_pattern_outliers(*window_keys(images), labels.numpy())
    assert not flagged.any()
    # 4 grey levels on 6x6 images: windows repeat everywhere, so a shared window is no evidence
    coarse = torch.randint(0, 4, (300, 1, 6, 6), generator=torch.Generator().manual_seed(1)).float() / 3
    flagged, info = shared_pattern_outliers(*window_keys(coarse), (torch.arange(300) % 3).numpy())
    assert not info["applied"] and "repeat" in info["reason"] and not flagged.any()


def test_the_collector_matches_one_call_and_refuses_to_grow_past_its_budget():
    images, labels, planted = stamped_dataset()
    collector = WindowCollector()
    for start in range(0, len(images), 64):
        collector(images[start:start + 64], start)
    flagged, info = collector.decide(labels.numpy())
    assert set(np.flatnonzero(flagged)) == set(planted) and info["flagged"] == len(planted)
    small = WindowCollector(max_windows=1000)
    small(images, 0)
    flagged, info = small.decide(labels.numpy())
    assert not info["applied"] and "too large" in info["reason"] and not flagged.any()


def test_the_default_screen_drops_a_patch_backdoor_and_screen_patterns_false_keeps_it():
    images, labels, planted = stamped_dataset()
    ds = ImageTensorDataset(images, labels, None, 4)
    san = Sanitizer(CompactCNN(3, 4, 4), ds, warmup=3, epochs=6, verbose=False)
    san.start_epoch(0)
    (record,) = san.history
    assert set(planted) <= set(san.dropped.tolist())
    assert record["screen"]["shared_patterns"]["flagged"] == len(planted)
    assert (san.screen_scores[planted] > record["screen"]["threshold"]).all()
    off = Sanitizer(CompactCNN(3, 4, 4), ds, warmup=3, epochs=6, verbose=False,
                    policy_options={"screen_patterns": False})
    off.start_epoch(0)
    assert not set(planted) & set(off.dropped.tolist())
    assert off.history[0]["screen"]["shared_patterns"] is None


def test_the_certificate_summary_says_how_many_shared_a_stamped_window():
    from sanitizer.certificate.report import text_summary

    images, labels, planted = stamped_dataset()
    san = Sanitizer(CompactCNN(3, 4, 4), ImageTensorDataset(images, labels, None, 4), warmup=3, epochs=6,
                    verbose=False)
    san.start_epoch(0)
    cert = san.certificate(poison_indices=planted)
    assert cert["audit"]["rounds"][0]["screen"]["shared_patterns"]["groups"][0]["images"] == len(planted)
    assert f"({len(planted)} of them share a stamped window in their class)" in text_summary(cert)


def test_wide_windows_and_normalised_pixels_hash_exactly():
    """Four channels (36 values a window) and mean/std-normalised pixels take the float64 projections."""
    images, labels, planted = stamped_dataset()
    four = torch.cat([images, images[:, :1]], 1)
    flagged, _ = shared_pattern_outliers(*window_keys(four), labels.numpy())
    assert set(np.flatnonzero(flagged)) == set(planted)
    normalised = (images - 0.5) / 0.2
    flagged, _ = shared_pattern_outliers(*window_keys(normalised), labels.numpy())
    assert set(np.flatnonzero(flagged)) == set(planted)


def white_squares(location: str = "bottom_right", per_class=(12, 0, 0, 0), n: int = 400):
    """Textured photos with a flat white 3x3 trigger stamped on ``per_class[c]`` images of each class c. Every
    image also carries one flat grey square of its own shade at its own place (natural flat spots that never
    repeat, so the repeat check has a reference: without any, the trigger's key would be the only one)."""
    images, labels = photos(n), torch.arange(n) % 4
    g = torch.Generator().manual_seed(1)
    for i in range(min(n, 250)):  # shade i: no two alike
        r, c = torch.randint(1, images.shape[2] - 4, (2,), generator=g).tolist()
        images[i, :, r:r + 3, c:c + 3] = i / 255
    chosen = np.concatenate([np.flatnonzero(labels.numpy() == c)[:k] for c, k in enumerate(per_class)])
    idx = torch.from_numpy(chosen)
    images[idx] = stamp_trigger(images[idx], make_trigger(3, 3, "white"), location, 1,
                                torch.Generator().manual_seed(0))
    return images, labels, chosen


def test_a_flat_white_square_at_one_place_in_one_class_is_flagged_and_the_textured_test_misses_it():
    images, labels, planted = white_squares()
    textured, _ = shared_pattern_outliers(*window_keys(images), labels.numpy())
    assert not textured[planted].any()  # no texture: the textured-window test cannot see it
    collector = WindowCollector()
    collector(images, 0)
    flagged, info = collector.decide(labels.numpy())
    assert set(np.flatnonzero(flagged)) == set(planted)
    assert info["flat"]["applied"] and info["flat"]["flagged"] == len(planted)
    assert info["flat"]["groups"][0]["class"] == 0


def test_flat_squares_every_class_shares_or_at_random_places_are_not_flagged():
    collector = WindowCollector()
    collector(white_squares(per_class=(10, 10, 10, 10))[0], 0)  # a watermark on every class
    assert not collector.decide((torch.arange(400) % 4).numpy())[0].any()
    images, labels, _ = white_squares(location="random")  # no shared position: not covered, by design
    collector = WindowCollector()
    collector(images, 0)
    assert not collector.decide(labels.numpy())[0].any()


def test_a_flat_region_is_not_an_isolated_window():
    from sanitizer.shared_patterns import flat_window_keys

    images = photos(20)
    images[:10, :, 4:12, 4:12] = 1.0  # white sky over a quarter of ten images: flat, but no window is bounded
    assert len(flat_window_keys(images)[0]) == 0
    images = photos(8)
    images[:3] = stamp_trigger(images[:3], make_trigger(3, 3, "white"))
    keys, owners = flat_window_keys(images)
    assert set(owners.tolist()) == {0, 1, 2} and len(set(keys.tolist())) == 1
