"""Summaries of a poisoning-benchmark JSONL file: a Markdown table and PNG plots.

Example::

    python -m benchmarks.report benchmarks/results/transfer_bp.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from sanitizer.stats import wilson_interval as wilson


def load_rows(path: str | Path) -> tuple[dict | None, list[dict]]:
    header, rows = None, []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "run" and header is None:
            header = row
        elif row.get("kind") == "victim":
            rows.append(row)
    return header, rows


def summarize(rows: list[dict]) -> list[dict]:
    """One summary per defense, over the trials where the undefended victim also finished."""
    by_defense: dict[str, list[dict]] = defaultdict(list)
    order: list[str] = []
    for row in rows:
        if row["defense"] not in by_defense:
            order.append(row["defense"])
        by_defense[row["defense"]].append(row)
    none_by_trial = {r["trial"]: r for r in by_defense.get("none", [])}
    clean_by_trial = {r["trial"]: r for r in by_defense.get("clean", [])}
    out = []
    for name in order:
        group = by_defense[name]
        n = len(group)
        hits = sum(r["target_hit"] for r in group)
        lo, hi = wilson(hits, n)
        acc = np.array([r["clean_accuracy"] for r in group]) * 100
        paired = [r for r in group if r["trial"] in none_by_trial]
        t_def = sum(r["seconds"] for r in paired)
        t_none = sum(none_by_trial[r["trial"]]["seconds"] for r in paired)
        acc_delta = np.array([r["clean_accuracy"] - none_by_trial[r["trial"]]["clean_accuracy"] for r in paired]) * 100
        recall = [r["recall"] for r in group if r.get("recall") is not None]
        precision = [r["precision"] for r in group if r.get("precision") is not None]
        # hits the poison-free model of the same trial does not make too (a target it already misclassifies
        # into the adversarial class is no success of the attack); None without clean rows
        referenced = [r for r in group if r["trial"] in clean_by_trial]
        beyond = (sum(bool(r["target_hit"]) and not clean_by_trial[r["trial"]]["target_hit"] for r in referenced)
                  if referenced else None)
        out.append({
            "defense": name, "trials": n, "hits": hits, "asr": hits / n if n else float("nan"),
            "hits_beyond_clean": beyond, "trials_with_clean": len(referenced),
            "asr_lo": lo, "asr_hi": hi,
            "adv_prob_mean": float(np.mean([r["target_adv_prob"] for r in group])),
            "acc_mean": float(acc.mean()), "acc_std": float(acc.std(ddof=1)) if n > 1 else 0.0,
            "acc_delta": float(acc_delta.mean()) if len(acc_delta) else float("nan"),
            "recall": float(np.mean(recall)) if recall else float("nan"),
            "precision": float(np.mean(precision)) if precision else float("nan"),
            "dropped": float(np.mean([r["dropped"] for r in group])),
            "clean_dropped": float(np.mean([r["clean_dropped"] for r in group])),
            "time_ratio": t_def / t_none if t_none > 0 else float("nan"),
            # Robust to a loaded machine: time inside sanitization rounds over the rest of the same run.
            "round_overhead": float(np.mean([r.get("seconds_sanitizer", 0.0) /
                                             max(r["seconds"] - r.get("seconds_sanitizer", 0.0), 1e-9)
                                             for r in group])),
            "seconds": float(np.mean([r["seconds"] for r in group])),
        })
    return out


def beyond_clean(s: dict) -> str:
    if s.get("hits_beyond_clean") is None:
        return "–"
    return f"{s['hits_beyond_clean']}/{s['trials_with_clean']}"


def markdown_table(summary: list[dict]) -> str:
    lines = [
        "| defense | trials | ASR | Wilson 95% | hits beyond the poison-free model | adv. prob. | "
        "clean acc. % (mean ± std) | Δ acc. vs none | recall | precision | dropped | clean dropped | time ratio | "
        "round overhead |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(v, spec=".2f"):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for s in summary:
        lines.append(
            f"| {s['defense']} | {s['trials']} | {s['hits']}/{s['trials']} = {100 * s['asr']:.1f}% | "
            f"[{100 * s['asr_lo']:.1f}, {100 * s['asr_hi']:.1f}] | {beyond_clean(s)} | {s['adv_prob_mean']:.3f} | "
            f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f} | {fmt(s['acc_delta'], '+.2f')} | {fmt(s['recall'])} | "
            f"{fmt(s['precision'])} | {s['dropped']:.1f} | {s['clean_dropped']:.1f} | {fmt(s['time_ratio'])} | "
            f"{100 * s['round_overhead']:+.1f}% |")
    return "\n".join(lines)


def diagnostics_table(rows: list[dict]) -> str | None:
    """Mean AUROC of the policy scores (poisons vs clean) per round, for runs made with --diagnostics."""
    per: dict[str, list[list[dict]]] = defaultdict(list)
    for row in rows:
        if row.get("diagnostics"):
            per[row["defense"]].append(row["diagnostics"])
    if not per:
        return None
    lines = ["| defense | trials | AUROC in adv. class, round 1 | AUROC all, round 1 | AUROC in class, last round |",
             "|---|---:|---:|---:|---:|"]

    def mean(values):
        values = [v for v in values if v is not None]
        return f"{np.mean(values):.3f}" if values else "–"

    for name, runs in per.items():
        lines.append(f"| {name} | {len(runs)} | {mean(r[0]['auroc_in_class'] for r in runs)} | "
                     f"{mean(r[0]['auroc_all'] for r in runs)} | {mean(r[-1]['auroc_in_class'] for r in runs)} |")
    return "\n".join(lines)


def plots(summary: list[dict], stem: Path) -> list[Path]:
    """ASR versus clean accuracy per defense, and time ratios; PNG files next to ``stem``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # Markers are numbered and named in a legend beside the axes: text labels collide when
    # defenses land on the same point (they often do, e.g. every defense that drops nothing).
    fig, ax = plt.subplots(figsize=(9, 4.8))
    markers = "osD^v<>phX*"
    for i, s in enumerate(summary):
        yerr = [[100 * (s["asr"] - s["asr_lo"])], [100 * (s["asr_hi"] - s["asr"])]]
        ax.errorbar(s["acc_mean"], 100 * s["asr"], yerr=yerr, xerr=s["acc_std"], fmt=markers[i % len(markers)],
                    capsize=3, label=f"{i + 1}. {s['defense']}", color=f"C{i % 10}")
        ax.annotate(str(i + 1), (s["acc_mean"], 100 * s["asr"]), textcoords="offset points", xytext=(5, 3),
                    fontsize=8, color=f"C{i % 10}")
    ax.set_xlabel("clean test accuracy (%)")
    ax.set_ylabel("attack success rate (%) with Wilson 95% CI")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "_asr_vs_acc.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [s["defense"] for s in summary]
    ax.bar(names, [s["time_ratio"] for s in summary], color="tab:blue")
    ax.axhline(1.10, color="tab:red", ls="--", lw=1, label="1.10× target")
    ax.set_ylabel("time / undefended (same run)")
    ax.tick_params(axis="x", rotation=35)
    ax.legend()
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "_time_ratio.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def report(path: str | Path, make_plots: bool = True) -> str:
    """The Markdown summary of a results file (and its plots, written beside it)."""
    path = Path(path)
    header, rows = load_rows(path)
    if not rows:
        return f"{path}: no finished victims yet"
    summary = summarize(rows)
    text = []
    if header:
        p = header.get("preset", {})
        text.append(f"preset `{p.get('name')}`, attack `{header.get('attack')}`, "
                    f"seeds from {header.get('seed_start')}, {header.get('threads')} thread(s), {header.get('date')}")
    text.append(markdown_table(summary))
    diag = diagnostics_table(rows)
    if diag:
        text.append(diag)
    if make_plots:
        stem = path.with_suffix("")
        text.append("plots: " + ", ".join(str(p) for p in plots(summary, stem)))
    return "\n\n".join(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarize a poisoning-benchmark JSONL file.")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    for f in args.files:
        print(report(f, make_plots=not args.no_plots))


if __name__ == "__main__":
    main()
