"""Exploratory (tuning seeds only): would a one-sided scale help the input-noise screen?

The screen's z divides by the class's MAD, which a tenth of poisons in a 250-image class widens. This
probe recomputes z with the scale taken from the values *below* the class median only (1.4826 × median of
med − v over v < med), which upper-tail poisons cannot widen, and compares recall and clean flags with the
library's decision on the saved transfer sets (bullseye polytope, feature collision, seeds 1000+) and
the from-scratch CIFAR-10 tuning sets.

    python -m benchmarks.screen_scale_probe
"""
import glob

import numpy as np
import torch

from benchmarks.presets import PRESETS, make_setting
from sanitizer.attacks import PoisonSet
from sanitizer.data import load_cifar10
from sanitizer.noise_screen import patch_noise_floor, screen_decision


def left_z(logf: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """z with the scale of the lower half of each class."""
    z = np.zeros(len(logf))
    for c in np.unique(labels):
        m = labels == c
        v = logf[m]
        med = np.median(v)
        left = med - v[v < med]
        z[m] = (v - med) / (1.4826 * np.median(left))
    return z

def report(name, base_floor, base_labels, sets):
    for f in sets:
        ps = PoisonSet.load(f)
        floor = base_floor.copy()
        labels = base_labels.copy()
        pf = patch_noise_floor(torch.from_numpy(ps.images)).numpy()
        floor[ps.indices] = pf
        labels[ps.indices] = ps.labels
        isp = np.zeros(len(floor), bool)
        isp[ps.indices] = True
        flagged, z, _ = screen_decision(floor, labels)
        zl = left_z(np.log(floor), labels)
        fl = zl > 3.5
        print(f"{name} {f.split('_s')[1][:5]}: default recall {flagged[isp].mean():.2f} clean "
              f"{flagged[~isp].mean():.2%} | left-scale z>3.5 recall {fl[isp].mean():.2f} clean {fl[~isp].mean():.2%}",
              flush=True)

def main() -> None:
    torch.set_num_threads(1)
    s = make_setting(PRESETS['cifar10-transfer'], '../shared/data/cifar10', 'benchmarks/out')
    bf = patch_noise_floor(s.craft_set.images).numpy()
    bl = s.craft_set.labels.numpy()
    for atk in ('bullseye_polytope', 'feature_collision'):
        report('transfer ' + atk[:4], bf, bl, sorted(glob.glob(f'benchmarks/out/poisons/cifar10-transfer_{atk}_s10*')))
    full = load_cifar10('../shared/data/cifar10')
    ff = patch_noise_floor(full.images).numpy()
    fl_ = full.labels.numpy()
    saved = sorted(glob.glob('benchmarks/frozen/poisons/cifar10-scratch-full_gradient_matching_s10*'))
    report('scratch-full', ff, fl_, saved)


if __name__ == "__main__":
    main()
