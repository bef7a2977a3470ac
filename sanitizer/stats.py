"""Small statistics helpers shared by the demo, the benchmarks and the certificate."""

from __future__ import annotations

import math


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score 95% interval for a proportion, or None when there are no trials (no estimate at all).

    Example:
        >>> lo, hi = wilson_interval(5, 10)
        >>> round(lo, 3), round(hi, 3)
        (0.237, 0.763)
    """
    if trials <= 0:
        return None
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes} must lie in [0, trials={trials}]")
    p = successes / trials
    denom = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def format_rate(successes: int, trials: int) -> str:
    """``"3/10 = 30% [11–60%]"``: a proportion with its trial count and Wilson 95% interval."""
    interval = wilson_interval(successes, trials)
    if interval is None:
        return f"{successes}/0 (no trials)"
    lo, hi = interval
    return f"{successes}/{trials} = {100 * successes / trials:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}%]"


def mix_seed(seed: int, step: int) -> int:
    """One integer seed per (seed, step) pair (a round, an epoch, a partition), the same everywhere."""
    return int(seed) * 1_000_003 + int(step)
