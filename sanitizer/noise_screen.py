"""The input-noise screen: find images that carry an added small perturbation, before training.

Natural image patches are nearly low-rank: neighbouring pixels and the three colour channels move
together, so the covariance of an image's small patches (3×3 pixels × channels) has a few large
eigenvalues and many tiny ones. Its smallest eigenvalues measure the image's noise floor (the
patch-PCA noise-level estimators of image processing rest on this). An additive perturbation that
is independent from pixel to pixel and from channel to channel, which is what ℓ∞-bounded poisons
(gradient matching, MetaPoison, bullseye polytope, sleeper agent, ...) look like, raises exactly
these eigenvalues.

The screen scores every example by the robust z-score of log(noise floor) within its labelled
class and flags z > ``threshold`` (3.5: the Iglewicz–Hoaglin outlier rule). The score needs no
model, so it runs once, at the start of training, before a poison has been learned.

Why not kNN density here: a poisoning attack perturbs hundreds of images the same way, and in this
space they form their own dense cluster, so each poison's nearest neighbours are other poisons.
The class's median and MAD are robust to anything under half the class.

Example:
    >>> import torch
    >>> images = torch.rand(200, 3, 16, 16).cumsum(-1).cumsum(-2) / 256  # smooth "natural" images
    >>> images[:10] += (torch.rand(10, 3, 16, 16) - 0.5) * 0.06          # ten perturbed ones
    >>> floor = patch_noise_floor(images)
    >>> flagged, z = noise_outliers(floor, torch.zeros(200, dtype=torch.long))
    >>> flagged[:10].all().item(), int(flagged[10:].sum())
    (True, 0)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sanitizer.errors import SanitizerError
from sanitizer.neighbors import robust_zscore

# The noise floor of an 8-bit image cannot be below its quantisation noise, (1/255)² / 12: a floor on
# the estimate keeps flat images (all eigenvalues 0) from becoming extreme low outliers.
QUANTISATION_FLOOR = (1 / 255) ** 2 / 12
THRESHOLD = 3.5
# Poisons come in groups: in a class whose count above z = 2.5 is an outlier among the classes, the cut
# drops to 2.5 (benchmarks/RESULTS.md, "a class-level cut"); None turns this off
GROUP_CUT: float | None = 2.5
PATCH, SMALLEST = 3, 1  # 3×3×C patches, the smallest eigenvalue (benchmarks/RESULTS.md, "noise screen")


def gradient_rounds(rounds: list[dict]) -> list[dict]:
    """The rounds of a history that embedded gradients (the screen's record has ``kind == "screen"``)."""
    return [r for r in rounds if r.get("kind") != "screen"]


def is_image_batch(x: object) -> bool:
    """True for a float tensor [N, C, H, W] (or [N, H, W]) with room for a 3×3 patch."""
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() in (3, 4)
            and x.shape[-1] >= 3 and x.shape[-2] >= 3)


@torch.no_grad()
def patch_noise_floor(images: torch.Tensor, patch: int = PATCH, smallest: int = SMALLEST,
                      stride: int = 1) -> torch.Tensor:
    """Per-image noise floor: the mean of the ``smallest`` eigenvalues of the covariance of the
    image's ``patch``×``patch``×C patches. Returns float64 [N].

    ``stride=2`` reads a quarter of the patches (4× faster, nearly the same estimate on 32×32 images).
    """
    if not is_image_batch(images):
        raise SanitizerError(f"the noise screen needs float images [N, C, H, W] with H, W >= 3, got "
                             f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    # float32 patches and covariances (3× faster than float64, same decisions on the CIFAR-10 sets),
    # float64 eigenvalues
    x = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise SanitizerError("the noise screen got images with NaN or infinite pixels; fix or remove those images")
    return noise_floor_of(x, patch, smallest, stride)


def noise_floor_of(x: torch.Tensor, patch: int = PATCH, smallest: int = SMALLEST, stride: int = 1) -> torch.Tensor:
    """:func:`patch_noise_floor` without checks, differentiable in ``x`` (the adaptive attack uses it)."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    patches = F.unfold(x, patch, stride=stride).transpose(1, 2)  # [N, L, C·p·p]
    patches = patches - patches.mean(1, keepdim=True)
    cov = (patches.transpose(1, 2) @ patches / patches.shape[1]).double()
    eig = torch.linalg.eigvalsh(cov)  # ascending
    return eig[:, :min(smallest, eig.shape[1])].mean(1).clamp_min(QUANTISATION_FLOOR)


def noise_outliers(floor: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                   threshold: float = THRESHOLD, group_cut: float | None = GROUP_CUT
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(flagged bool [N], z float [N]): robust z of log(noise floor) within each class, flagged above
    ``threshold``. Classes with fewer than 3 examples get z = 0 (no reference to compare with).

    ``group_cut``: poisons come in groups, so a class whose count of examples above ``group_cut`` is an
    outlier among the classes' counts (:func:`attacked_classes`) is flagged above ``group_cut``
    instead of ``threshold``."""
    flagged, z, _ = screen_decision(floor, labels, threshold, group_cut)
    return flagged, z


def screen_decision(floor: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                    threshold: float = THRESHOLD, group_cut: float | None = GROUP_CUT
                    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """:func:`noise_outliers` plus the classes that got the lower cut."""
    log_floor = np.log(np.asarray(floor, dtype=np.float64))
    labels = np.asarray(labels)
    z = np.zeros(len(log_floor))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) >= 3:
            z[members] = robust_zscore(log_floor[members])
    attacked = attacked_classes(z, labels, group_cut, threshold) if group_cut is not None else []
    cut = np.where(np.isin(labels, attacked), group_cut if attacked else threshold, threshold)
    return z > cut, z, attacked


def attacked_classes(z: np.ndarray, labels: np.ndarray, cut: float, threshold: float,
                     alpha: float = 1e-4) -> list[int]:
    """Classes whose share of examples with z > ``cut`` stands out among the classes. Two tests, both
    required: a robust z across the classes' shares above ``threshold`` (the classes' tails vary more
    than chance allows, so compare with how much they really vary) and a Poisson tail probability of
    the class's count below ``alpha`` / number of classes at the other classes' pooled share (small
    classes: a handful of examples above the cut is chance)."""
    from scipy.stats import poisson

    classes = np.unique(labels)
    if len(classes) < 3:
        return []
    sizes = np.array([(labels == c).sum() for c in classes])
    counts = np.array([(z[labels == c] > cut).sum() for c in classes])
    rates = counts / sizes
    out = []
    for i, c in enumerate(classes):
        others = np.delete(rates, i)
        med = np.median(others)
        spread = 1.4826 * np.median(np.abs(others - med))
        stands_out = rates[i] > med and (spread == 0 or (rates[i] - med) / spread > threshold)
        pooled = np.delete(counts, i).sum() / np.delete(sizes, i).sum()
        expected = max(pooled, 1 / sizes.sum()) * sizes[i]
        if stands_out and poisson.sf(counts[i] - 1, expected) < alpha / len(classes):
            out.append(int(c))
    return out


def dataset_noise_floor(batches: Callable[[], object], size: int, patch: int = PATCH, smallest: int = SMALLEST,
                        stride: int = 1, on_images: Callable[[torch.Tensor, int], None] | None = None
                        ) -> np.ndarray | None:
    """The noise floor of every example, reading ``(inputs, labels)`` batches in dataset order from
    ``batches()``; ``None`` when the inputs are not images (the screen does not apply). ``on_images(batch,
    first_index)`` sees every image batch too (the shared-pattern screen hashes the same pass)."""
    out, seen = [], 0
    for inputs, _ in batches():
        if not is_image_batch(inputs):
            return None
        if on_images is not None:
            on_images(inputs, seen)
        out.append(patch_noise_floor(inputs, patch, smallest, stride).numpy())
        seen += len(out[-1])
    floor = np.concatenate(out) if out else np.zeros(0)
    if len(floor) != size:
        raise SanitizerError(f"the noise screen read {len(floor)} examples but the dataset has {size}")
    return floor


def image_dataset_noise_floor(dataset: Dataset, batch_size: int = 512, collate_fn: Callable | None = None,
                              **options) -> np.ndarray | None:
    """:func:`dataset_noise_floor` over a map-style dataset (items ``(x, y, ...)`` or dicts)."""
    from sanitizer.embeddings import iterate_batches

    return dataset_noise_floor(lambda: iterate_batches(dataset, batch_size, collate_fn=collate_fn), len(dataset),
                               **options)
