"""Stamped triggers: find the images of one class that share an exact local pattern, before training.

A patch backdoor (BadNets, the clean-label patch backdoor) stamps the same small pattern on every
poison. On natural 8-bit photographs an exact 3×3×C window of pixels with some contrast almost never
repeats between two different images (full CIFAR-10: no textured window is shared by more than two of
its 50,000 images; ``benchmarks/RESULTS.md``). So a window that many images of *one* class share,
and the other classes do not, is a planted pattern: the density of that point in window space is
abnormal, and the images that carry it are dropped with the input-noise screen. Patch triggers on
colour images leave the noise floor alone (the checkerboard is the same in the three channels), which
is why the screen needs this second statistic.

The test per (window, class): ``w`` distinct images of the class contain the window, ``o`` images of
the other classes do. Under the null the class holds its share of the window's occurrences, so
``w`` is Poisson with mean ``max(o, 1) · n_c / (N − n_c)`` (at least one occurrence elsewhere: a
conservative floor). Flagged when ``w ≥ min_group`` and the tail probability is below ``alpha``
divided by the number of (window, class) pairs tested (Bonferroni).

**Flat triggers** (a white or black square) have no texture, and flat windows repeat everywhere in nature
(sky, saturated areas), so they get a test of their own, by *position*: a flat window counts only where it
is *isolated* (each side of the ring of pixels around it has one that differs from it by ``MIN_CONTRAST``
grey levels in some channel, as around a stamped square on a natural background and not inside or along
the edge of a patch of sky), and it is keyed by its exact pixels *and* its position. The same class-share
test then runs on these keys. A flat trigger placed at a random position is not covered (measured on
CIFAR-10 in ``benchmarks/RESULTS.md``, "flat triggers").

Where exact windows repeat naturally (tiny or coarsely quantised images such as scikit-learn's 8×8
digits, where strokes repeat within a class), a shared window is no evidence: when more than
``max_repeat_rate`` of the windows occur in two or more images, the test is not applied and
the result says so (each test checks its own keys). Not covered: blended triggers (opacity < 1), triggers
smaller than the window, flat triggers at random positions, and poisons JPEG-compressed after stamping (the
window is no longer exact).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> images = torch.rand(300, 3, 16, 16, generator=g)
    >>> labels = torch.arange(300) % 3
    >>> images[:30:3, :, -4:-1, -4:-1] = (torch.arange(3)[:, None] + torch.arange(3)) % 2.0  # 10 stamped, class 0
    >>> flagged, info = shared_pattern_outliers(*window_keys(images), labels.numpy())
    >>> int(flagged[:30:3].sum()), int(flagged.sum())
    (10, 10)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WINDOW = 3  # pixels per side of the compared windows
MIN_CONTRAST = 16  # of 255: flatter windows (sky, saturated areas) are skipped
MIN_GROUP = 5  # a poisoning needs many copies of its trigger
ALPHA = 1e-3  # family-wise error over the (window, class) pairs tested
MAX_REPEAT_RATE = 0.01  # above this share of repeated textured windows the test is not applied
MAX_WINDOWS = 200_000_000  # about 2.4 GB of hashes; larger datasets are not pattern-screened (said in the info)

# Integer projections of the integer-valued windows. With 8-bit pixels and weights below 2**11 every partial
# sum is an integer below 2**24, so float32 matmuls give the same value for equal windows in any summation
# order; six of them make two different windows collide with probability about 2**-66. Pixels outside
# [0, 255] (normalised images) or windows of more than 32 values take float64 and weights below 2**20 instead.
_RNG = np.random.default_rng(20261201)
_SMALL = torch.from_numpy(_RNG.integers(1, 2**11, size=(4096, 6))).float()
_LARGE = torch.from_numpy(_RNG.integers(1, 2**20, size=(4096, 3))).double()
_MIX = torch.from_numpy(_RNG.integers(1, 2**62, size=6) | 1)
_BUCKETS = 22  # bits of the hash used to pre-select the windows that may belong to a repeated one


def _hash_windows(x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """64-bit hashes (int64, wrapping) of the rows of ``windows`` [b, L, values], cut from the 8-bit batch ``x``."""
    exact_in_float32 = x.abs().max() <= 255 and windows.shape[2] * 255 * 2**11 < 2**24  # up to 32 values
    weights = _SMALL if exact_in_float32 else _LARGE
    projected = (windows.to(weights.dtype) @ weights[:windows.shape[2]]).to(torch.int64)
    return (projected * _MIX[:projected.shape[2]]).sum(2)  # wraps modulo 2**64


def window_keys(images: torch.Tensor, window: int = WINDOW, min_contrast: int = MIN_CONTRAST,
                first_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(keys uint64, image int32)``: a 64-bit hash of every textured ``window``×``window``×C window of
    every image (pixels quantised to 8 bits; images in [0, 1], values outside are kept, not clipped) and
    the index of the image it came from (``first_index`` + position in ``images``)."""
    return all_window_keys(images, window, min_contrast, first_index)[0]


def flat_window_keys(images: torch.Tensor, window: int = WINDOW, min_contrast: int = MIN_CONTRAST,
                     first_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(keys uint64, image int32)`` like :func:`window_keys`, for the *isolated flat* windows: every value
    within ``min_contrast`` grey levels of every other (over all channels), and bounded on all four sides: each
    side of the ring of pixels around the window (corners left out; outside the image counts as different) has
    a pixel that differs from the window's mean by ``min_contrast`` or more in some channel. A stamped square
    on a natural background is; a window inside or along the edge of a larger flat region (sky) is not. The
    key includes the window's position."""
    return all_window_keys(images, window, min_contrast, first_index)[1]


def all_window_keys(images: torch.Tensor, window: int = WINDOW, min_contrast: int = MIN_CONTRAST,
                    first_index: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(textured, flat)``: :func:`window_keys` and :func:`flat_window_keys` from one pass over the windows."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    w = window
    # ring offsets (in the image padded by 1) of the four sides, corners left out: a corner pixel would let the
    # corner window of a larger flat region pass
    sides = torch.tensor([[(0, d) for d in range(1, w + 1)], [(w + 1, d) for d in range(1, w + 1)],
                          [(d, 0) for d in range(1, w + 1)], [(d, w + 1) for d in range(1, w + 1)]])  # [4, w, 2]
    parts: tuple[list, list, list, list] = ([], [], [], [])
    for start in range(0, len(images), 256):
        x = torch.round(images[start:start + 256].detach().to("cpu", torch.float32) * 255)
        windows = F.unfold(x, w).transpose(1, 2)  # [b, L, C·w·w]
        spread = windows.amax(2) - windows.amin(2)
        hashed = _hash_windows(x, windows)
        textured = spread >= min_contrast
        rows, _ = textured.nonzero(as_tuple=True)
        parts[0].append(hashed[textured].numpy().view(np.uint64))
        parts[1].append((rows + first_index + start).to(torch.int32).numpy())
        image, position = (spread < min_contrast).nonzero(as_tuple=True)  # flat windows: is each one bounded?
        if len(image):
            cols = x.shape[3] - w + 1
            mean = windows[image, position].view(len(image), x.shape[1], w * w).mean(2)  # [m, C]
            padded = F.pad(x, (1, 1, 1, 1), value=-1e4)  # outside the image: unlike anything
            y0, x0 = position // cols, position % cols
            ring = padded[image[:, None, None], :, y0[:, None, None] + sides[..., 0], x0[:, None, None] + sides[..., 1]]
            differs = ((ring - mean[:, None, None, :]).abs() >= min_contrast).any(3)  # [m, 4, w]
            bounded = differs.any(2).all(1)
            image, position = image[bounded], position[bounded]
            # the key includes the position: the same pixels elsewhere are another key
            parts[2].append((hashed[image, position] * 1_000_003 + position).numpy().view(np.uint64))
            parts[3].append((image + first_index + start).to(torch.int32).numpy())
    joined = [np.concatenate(p) if p else np.zeros(0, np.uint64 if i % 2 == 0 else np.int32)
              for i, p in enumerate(parts)]
    return (joined[0], joined[1]), (joined[2], joined[3])


def shared_pattern_outliers(keys: np.ndarray, image: np.ndarray, labels: np.ndarray, min_group: int = MIN_GROUP,
                            alpha: float = ALPHA, max_repeat_rate: float = MAX_REPEAT_RATE, kind: str = "textured"
                            ) -> tuple[np.ndarray, dict]:
    """(flagged bool [N], info) from :func:`window_keys`'s output: the images that carry a window
    over-represented in their class (see the module docstring). ``info`` holds the repeat rate, whether
    the test applied, and the flagged groups."""
    from scipy.stats import poisson

    labels = np.asarray(labels)
    n = len(labels)
    flagged = np.zeros(n, dtype=bool)
    if len(keys) == 0:
        return flagged, {"applied": False, "reason": f"no {kind} windows", "groups": []}
    ordered = np.sort(keys)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    per_key = np.diff(np.r_[starts, len(ordered)])  # occurrences (an image may hold a window twice)
    repeat_rate = float((per_key >= 2).mean())
    info = {"repeat_rate": repeat_rate, "windows": int(len(starts)), "groups": []}
    if repeat_rate > max_repeat_rate:
        return flagged, {**info, "applied": False,
                         "reason": f"{repeat_rate:.1%} of the {kind} windows repeat between images (above "
                                   f"{max_repeat_rate:.0%}): shared windows are no evidence on these images"}
    info["applied"] = True
    heavy = ordered[starts[per_key >= min_group]]
    if len(heavy) == 0:
        return flagged, info
    # the windows that hold a repeated key: a bucket table first (cheap), then an exact lookup
    mask = np.uint64((1 << _BUCKETS) - 1)
    table = np.zeros(1 << _BUCKETS, dtype=bool)
    table[(heavy & mask).astype(np.int64)] = True
    hit = np.flatnonzero(table[(keys & mask).astype(np.int64)])
    where = np.minimum(np.searchsorted(heavy, keys[hit]), len(heavy) - 1)
    exact = heavy[where] == keys[hit]
    pairs = np.unique(where[exact].astype(np.int64) * n + image[hit[exact]])  # distinct (key, image)
    key_id, member = pairs // n, pairs % n
    classes = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=classes)
    total = np.bincount(key_id, minlength=len(heavy))  # distinct images per key
    cell, count = np.unique(key_id * classes + labels[member], return_counts=True)  # per (key, class)
    cell_key, cell_class = cell // classes, cell % classes
    tested = count >= min_group
    expected = np.maximum(total[cell_key] - count, 1) * sizes[cell_class] / np.maximum(n - sizes[cell_class], 1)
    p = poisson.sf(count - 1, expected)
    significant = tested & (p < alpha / max(int(tested.sum()), 1))
    flagged[member[np.isin(key_id * classes + labels[member], cell[significant])]] = True
    groups = [{"class": int(c), "images": int(m), "p": float(q)}
              for c, m, q in zip(cell_class[significant], count[significant], p[significant])]
    info["groups"] = sorted(groups, key=lambda g: -g["images"])[:20]
    return flagged, info


class WindowCollector:
    """Hashes the windows of image batches as a pass reads them (``collector(batch, first_index)``), then
    decides (``collector.decide(labels)``). Stops hashing, and says so, past ``max_windows`` windows.

    Example:
        >>> import torch
        >>> collector = WindowCollector()
        >>> collector(torch.rand(20, 3, 8, 8), 0)
        >>> flagged, info = collector.decide(torch.arange(20).numpy() % 2)
        >>> int(flagged.sum()), info["applied"]
        (0, True)
    """

    def __init__(self, max_windows: int = MAX_WINDOWS) -> None:
        self.max_windows = max_windows
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.flat_parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.count = 0
        self.overflow = False

    def __call__(self, images: torch.Tensor, first_index: int) -> None:
        if self.overflow:
            return
        part, flat = all_window_keys(images, first_index=first_index)
        self.count += len(part[0]) + len(flat[0])
        if self.count > self.max_windows:
            self.overflow, self.parts, self.flat_parts = True, [], []
            return
        self.parts.append(part)
        self.flat_parts.append(flat)

    def decide(self, labels: np.ndarray) -> tuple[np.ndarray, dict]:
        if self.overflow:
            return np.zeros(len(labels), dtype=bool), {
                "applied": False, "groups": [],
                "reason": f"more than {self.max_windows:,} textured windows: too large to hash in memory"}
        flagged, info = shared_pattern_outliers(*_joined(self.parts), labels)
        flat, flat_info = shared_pattern_outliers(*_joined(self.flat_parts), labels, kind="flat")
        self.parts, self.flat_parts = [], []
        flagged |= flat
        flat_info["flagged"] = int(flat.sum())
        return flagged, {**info, "flagged": int(flagged.sum()), "flat": flat_info}


def _joined(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The keys and owners of a collector's batches, concatenated."""
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int32)
    return np.concatenate([k for k, _ in parts]), np.concatenate([o for _, o in parts])
