"""The pre-registered transfer comparison over several extractors (benchmarks/RESULTS.md, "Pre-registered:
CIFAR-10 transfer with the library default over three extractors"), from the victims' JSONL rows.

Per attack, pooled over extractors and setups: attack success with a Wilson 95 % interval, the hits that the
poison-free head of the same setup (the ``clean`` row, when run) does not make too, clean accuracy
against undefended, poisons and clean images dropped; per extractor: success of each defense (the spread
between extractors). Primary, one per attack, Holm over the attacks at alpha 0.05: the library default's
success is lower than undefended's, by an exact one-sided McNemar test on the paired setups. The default
against the baselines is printed with the same test, exploratory.

    python -m benchmarks.transfer_extractors_analysis benchmarks/results/transfer_reported3x_*.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from benchmarks.reported_analysis import holm
from sanitizer.stats import format_rate

DEFAULT = "density:k=10:threshold=3:embedding=last_layer"


def read(paths: list[Path]) -> dict[str, dict[tuple[int, int], dict[str, dict]]]:
    """{attack: {(extractor seed, trial seed): {defense: row}}}."""
    out: dict[str, dict] = defaultdict(lambda: defaultdict(dict))
    for path in paths:
        extractor = None
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("kind") == "run":
                extractor = row["preset"].get("extractor_seed", 0)
            elif row.get("kind") == "victim":
                out[row["attack"]][(extractor, row["seed"])].setdefault(row["defense"], row)
    return out


def mcnemar_less(setups: dict, a: str, b: str) -> tuple[int, int, float | None]:
    """(setups hit under a only, under b only, exact one-sided p that a is hit less often than b)."""
    pairs = [(rows[a]["target_hit"], rows[b]["target_hit"]) for rows in setups.values() if a in rows and b in rows]
    only_a = sum(bool(x) and not y for x, y in pairs)
    only_b = sum(bool(y) and not x for x, y in pairs)
    if only_a + only_b == 0:
        return only_a, only_b, None
    return only_a, only_b, float(stats.binomtest(only_a, only_a + only_b, 0.5, alternative="less").pvalue)


def table(attack: str, setups: dict) -> str:
    defenses = sorted({d for rows in setups.values() for d in rows}, key=lambda d: (d != "none", d != DEFAULT, d))
    extractors = sorted({e for e, _ in setups})
    head = "| defense | setups | attack success | " + " | ".join(f"extractor {e}" for e in extractors) + \
           " | hits the poison-free head does not make | accuracy − none (points) | poisons dropped | " \
           "clean dropped / setup |"
    lines = [f"**{attack}**", "", head, "|---" * (7 + len(extractors)) + "|"]
    for d in defenses:
        rows = [r[d] for r in setups.values() if d in r]
        per_e = []
        for e in extractors:
            hits = [r[d]["target_hit"] for (ex, _), r in setups.items() if ex == e and d in r]
            per_e.append(f"{sum(hits)}/{len(hits)}")
        gaps = [r[d]["clean_accuracy"] - r["none"]["clean_accuracy"] for r in setups.values() if d in r and "none" in r]
        poisons = sum(r.get("poisons_dropped", 0) for r in rows), sum(r["budget"] for r in rows)
        name = f"{d} (library default)" if d == DEFAULT else d
        referenced = [r for r in setups.values() if d in r and "clean" in r]
        own = sum(bool(r[d]["target_hit"]) and not r["clean"]["target_hit"] for r in referenced)
        beyond = f"{own}/{len(referenced)}" if referenced else "–"
        lines.append(f"| {name} | {len(rows)} | {format_rate(sum(bool(r['target_hit']) for r in rows), len(rows))} | "
                     + " | ".join(per_e) + f" | {beyond} | {100 * np.mean(gaps):+.2f} | {format_rate(*poisons)} | "
                     f"{np.mean([r.get('clean_dropped', 0) for r in rows]):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    data = read(args.paths)
    primary = []
    for attack, setups in sorted(data.items()):
        print(table(attack, setups), "\n")
        primary.append((attack, *mcnemar_less(setups, DEFAULT, "none")))
        for other in sorted({d for rows in setups.values() for d in rows} - {DEFAULT, "none"}):
            a, b, p = mcnemar_less(setups, DEFAULT, other)
            print(f"- exploratory: default hit alone {a}, {other} hit alone {b}: one-sided exact p = "
                  f"{'–' if p is None else f'{p:.3g}'}")
        print()
    rejected = holm([p for *_, p in primary])
    print("Primary (the default's success < undefended, exact one-sided McNemar, Holm over the attacks)\n")
    print("| attack | default hit alone | none hit alone | p | Holm: supported |\n|---|---|---|---|---|")
    for (attack, a, b, p), r in zip(primary, rejected):
        print(f"| {attack} | {a} | {b} | {'–' if p is None else f'{p:.3g}'} | "
              f"{'not tested' if r is None else ('yes' if r else 'no')} |")


if __name__ == "__main__":
    main()
