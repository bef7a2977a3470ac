"""Exploratory (issue 15): a local statistic for patch triggers on colour images, beside the noise floor.

BadNets' checkerboard is the same in the three channels, so it leaves the chroma direction of patch
space alone and the input-noise screen (smallest eigenvalue of the image's 3x3xC patch covariance)
does not see it on CIFAR-10. This probe scores, per image, the largest Mahalanobis distance of any
3x3xC patch under the image's own patch covariance, and applies the screen's decision (robust z within
class, 3.5, the class-level cut) to both statistics. CIFAR-10 subset, 500 images per class.

    python -m benchmarks.badnets_local_probe --seeds 1000,1001
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.poisoning import auroc
from sanitizer.attacks import make_attack
from sanitizer.data import ImageTensorDataset, load_cifar10, subset_by_class
from sanitizer.noise_screen import QUANTISATION_FLOOR, patch_noise_floor, screen_decision


def largest_patch_distance(images: torch.Tensor, patch: int = 3, ridge: float = 1e-3) -> torch.Tensor:
    """Per image: the largest Mahalanobis distance of one of its patches under its own patch covariance."""
    p = F.unfold(images, patch).transpose(1, 2)  # [N, positions, C·p·p]
    centred = p - p.mean(1, keepdim=True)
    cov = (centred.transpose(1, 2) @ centred / centred.shape[1]).double()
    scale = cov.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * ridge + QUANTISATION_FLOOR
    chol = torch.linalg.cholesky(cov + torch.eye(cov.shape[-1], dtype=torch.float64) * scale)
    whitened = torch.linalg.solve_triangular(chol, centred.double().transpose(1, 2), upper=False)
    return (whitened ** 2).sum(1).max(1).values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--seeds", default="1000,1001")
    parser.add_argument("--per-class", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    full = load_cifar10(args.data_root)
    idx = torch.from_numpy(subset_by_class(full, args.per_class, 0))
    train = ImageTensorDataset(full.images[idx], full.labels[idx], None, 10)
    for seed in (int(s) for s in args.seeds.split(",")):
        for share in (0.05, 0.01):  # of the target class
            budget = max(1, int(share * args.per_class))
            target = int(np.random.default_rng(seed).integers(10))
            poisons = make_attack("badnets", budget=budget).craft(train, seed=seed, adversarial_class=target)
            data = poisons.apply(train)
            is_poison = np.zeros(len(train), dtype=bool)
            is_poison[poisons.indices] = True
            for name, stat in (("noise floor", patch_noise_floor(data.images)),
                               ("largest patch distance", largest_patch_distance(data.images))):
                flagged, z, lowered = screen_decision(stat.numpy(), data.labels.numpy())
                print(f"seed {seed} badnets {budget} poisons, {name}: AUROC {auroc(z[is_poison], z[~is_poison]):.3f}, "
                      f"recall {flagged[is_poison].mean():.2f}, clean flagged {flagged[~is_poison].mean():.2%}, "
                      f"poison z median {np.median(z[is_poison]):.2f}, classes cut lower {lowered}")


if __name__ == "__main__":
    main()
