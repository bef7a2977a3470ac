"""Offline detection study: how well does each signal, policy, embedding and round separate the poisons?

Reads the per-epoch arrays that ``benchmarks.poisoning --record-signals`` saved for undefended
poisoned runs (``CACHE/signals/<run>/epoch<e>.npz``) and scores, at every recorded epoch:

- every policy at its own decision (density as shipped and its variants, EPIC-0.1/0.2, spectral,
  deep k-NN, activation clustering) on the embedding it is configured with, exactly as an
  audit-mode sanitizer would at that round: recall, clean examples dropped in the poisons' class and
  in the whole set;
- raw per-example signals (no decision): loss, margin, gradient norm, kNN isolation and its inverse,
  LOF-style density ratios, principal deviation, purification sensitivity, harvested train-mode loss.

For every signal: the in-class AUROC (poisons against the clean examples of their class) and the
recall at which 2 % of that class's clean examples would be dropped (the issue's target operating
point). Rows go to a JSONL file, one per (run, epoch, signal); ``--summary`` prints the table of
means over runs; ``--table FILES`` the policies' per-round table over the sets in JSONL files it wrote.

Example::

    python -m benchmarks.detection_study --signals benchmarks/out/signals \\
        --runs 'cifar10-scratch-full_gradient_matching_eps16_s10*' --out benchmarks/results/detection_tuning.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.signals import load_epoch
from sanitizer.neighbors import class_isolation, knn, principal_deviation, robust_zscore
from sanitizer.policies import make_policy

# ------------------------------------------------------------------------------------------------
# Embeddings from the recorded arrays
# ------------------------------------------------------------------------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def residual(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """softmax − onehot: EPIC's embedding (the loss gradient w.r.t. the logits)."""
    r = softmax(logits)
    r[np.arange(len(r)), labels] -= 1
    return r


def last_layer(logits: np.ndarray, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(softmax − onehot) ⊗ [h; 1], the exact last-layer gradient (what ``embedding='last_layer'`` computes)."""
    e = residual(logits, labels)
    h1 = np.concatenate([features, np.ones((len(features), 1), np.float32)], 1)
    return (e[:, :, None] * h1[:, None, :]).reshape(len(e), -1).astype(np.float32)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), labels]


def margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    own = logits[np.arange(len(logits)), labels]
    other = logits.copy()
    other[np.arange(len(other)), labels] = -np.inf
    return own - other.max(1)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(positive scores above negative), ties counted half."""
    neg = np.sort(negative)
    below = np.searchsorted(neg, positive, "left")
    equal = np.searchsorted(neg, positive, "right") - below
    return float((below + 0.5 * equal).sum() / (len(positive) * len(negative)))


def recall_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.02) -> float:
    """Recall when the threshold drops exactly ``fpr`` of the negatives (the best any threshold does there)."""
    threshold = np.quantile(negative, 1 - fpr)
    return float((positive > threshold).mean())


def lof_ratio(x: np.ndarray, k: int) -> np.ndarray:
    """Local density ratio: an example's mean kNN distance over its neighbours' mean kNN distances
    (> 1: sparser than its neighbourhood, < 1: denser)."""
    dist, idx = knn(x, min(k, len(x) - 1))
    own = dist.mean(1)
    return own / (own[idx].mean(1) + 1e-12)


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------


def class_signals(a: dict[str, np.ndarray], labels: np.ndarray, members: np.ndarray,
                  focus: np.ndarray, prev: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Raw per-example scores (higher = more suspicious) for the examples ``members`` of one class."""
    y = labels[members]
    logits, feats = a["logits"][members], a["features"][members]
    out: dict[str, np.ndarray] = {}
    loss = cross_entropy(logits, y)
    out["loss_high"] = loss
    out["loss_low"] = -loss
    out["margin_high"] = margin(logits, y)
    res = residual(logits, y)
    gnorm = np.linalg.norm(res, axis=1) * np.sqrt((feats ** 2).sum(1) + 1)
    out["gradnorm_low"] = -gnorm
    out["gradnorm_high"] = gnorm
    if "train_logits" in a and np.isfinite(a["train_logits"][members]).all():
        tl = cross_entropy(a["train_logits"][members], y)
        out["train_loss_low"] = -tl
        out["train_loss_high"] = tl
    ll = last_layer(logits, feats, y)
    spaces = {"last_layer": ll, "logits": res, "features": feats,
              # directions only: small (easy) gradients no longer crowd the origin
              "last_layer_cosine": ll / (np.linalg.norm(ll, axis=1, keepdims=True) + 1e-12),
              "features_cosine": feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)}
    for name, x in spaces.items():
        for k in (10, 100):
            iso = np.log(class_isolation(x, k) + 1e-12)
            out[f"isolation_{name}_k{k}"] = iso
            out[f"denseness_{name}_k{k}"] = -iso
        lof = np.log(lof_ratio(x, 10) + 1e-12)
        out[f"lof_{name}"] = lof
        out[f"lof_inverse_{name}"] = -lof
        out[f"principal_{name}"] = principal_deviation(x)
    # purification sensitivity: how far a purified copy moves the example (poisons rely on δ)
    pos = np.searchsorted(focus, members)
    if len(focus) and np.all(focus[np.minimum(pos, len(focus) - 1)] == members):
        for view in ("jpeg", "noise"):
            if f"{view}_logits" not in a:
                continue
            vl, vf = a[f"{view}_logits"][pos], a[f"{view}_features"][pos]
            out[f"{view}_loss_rise"] = cross_entropy(vl, y) - loss
            out[f"{view}_feature_shift"] = np.linalg.norm(vf - feats, axis=1) / (np.linalg.norm(feats, axis=1) + 1e-6)
            out[f"{view}_lastlayer_shift"] = np.linalg.norm(last_layer(vl, vf, y) - spaces["last_layer"], axis=1)
            out[f"{view}_prob_drop"] = softmax(logits)[np.arange(len(y)), y] - softmax(vl)[np.arange(len(y)), y]
            for name in ("loss_rise", "feature_shift", "lastlayer_shift"):  # both directions
                out[f"{view}_{name}_low"] = -out[f"{view}_{name}"]
    if prev is not None:
        out["loss_fall_since_prev"] = cross_entropy(prev["logits"][members], y) - loss
    return out


POLICIES: dict[str, tuple[str, Callable[[], object]]] = {
    # name: (embedding, policy factory) -- the shipped default first
    "density(default)": ("last_layer", lambda: make_policy("density")),
    # two-sided as in its first round (dense side on); later rounds only use the isolated side
    "density:two_sided=true": ("last_layer", lambda: make_policy("density", two_sided=True, max_fraction=0.2)),
    "density:features,k=100,t=2": ("features", lambda: make_policy("density", k=100, threshold=2.0)),
    "density+spectral": ("last_layer", lambda: make_policy("density", spectral=True)),
    "epic-0.1": ("logits", lambda: make_policy("epic-0.1")),
    "epic-0.2": ("logits", lambda: make_policy("epic-0.2")),
    "spectral": ("features", lambda: make_policy("spectral", budget=0.01)),
    "activation_clustering": ("features", lambda: make_policy("activation_clustering")),
}


def policy_rows(a, labels, is_poison, adv, policies: dict) -> list[dict]:
    """Each policy's own decision on the poisons' class (and the class-wise drop rate elsewhere)."""
    members = np.flatnonzero(labels == adv)
    rows = []
    for name, (kind, factory) in policies.items():
        policy = factory()
        y = labels[members]
        if kind == "features":
            x = a["features"][members]
        elif kind == "logits":
            x = residual(a["logits"][members], y)
        else:
            x = last_layer(a["logits"][members], a["features"][members], y)
        sel = policy.select(x, y, num_classes=int(labels.max()) + 1, seed=0)
        poison = is_poison[members]
        dropped = ~sel.keep
        rows.append({"signal": f"policy:{name}", "embedding": kind,
                     "recall": float(dropped[poison].mean()),
                     "clean_dropped_in_class": int(dropped[~poison].sum()),
                     "clean_dropped_in_class_frac": float(dropped[~poison].mean()),
                     "auroc_in_class": auroc(sel.scores[poison], sel.scores[~poison])})
    # deep k-NN needs every class: plurality vote among the 2 × budget nearest features
    k = 2 * int(is_poison.sum())
    sel = make_policy("deep_knn", k=min(k, 1000)).select(a["features"], labels, seed=0)
    poison = is_poison[members]
    dropped = ~sel.keep[members]
    rows.append({"signal": "policy:deep_knn", "embedding": "features", "recall": float(dropped[poison].mean()),
                 "clean_dropped_in_class": int(dropped[~poison].sum()),
                 "clean_dropped_in_class_frac": float(dropped[~poison].mean()),
                 "clean_dropped_total": int((~sel.keep & ~is_poison).sum()),
                 "auroc_in_class": auroc(sel.scores[members][poison], sel.scores[members][~poison])})
    return rows


def study_run(run_dir: Path, epochs: list[int] | None = None, with_policies: bool = True) -> list[dict]:
    meta = json.loads((run_dir / "meta.json").read_text())
    labels = np.load(run_dir / "labels.npy", allow_pickle=False)
    is_poison = np.load(run_dir / "is_poison.npy", allow_pickle=False)
    focus = np.load(run_dir / "focus.npy", allow_pickle=False)
    adv = int(meta["adversarial_class"])
    members = np.flatnonzero(labels == adv)
    poison = is_poison[members]
    available = sorted(int(p.stem[5:]) for p in run_dir.glob("epoch*.npz") if "partial" not in p.name)
    rows, prev = [], None
    for epoch in available:
        a = load_epoch(run_dir, epoch)
        if epochs is None or epoch in epochs:
            # epoch<e>.npz is the model after epoch e: what a round at the start of epoch e + 1 sees
            base = {"run": run_dir.name, "seed": meta["seed"], "epoch": epoch, "round_epoch": epoch + 1,
                    "adversarial_class": adv,
                    "target_adv_prob": float(softmax(a["target_logits"])[0, adv])}
            for name, s in class_signals(a, labels, members, focus, prev).items():
                z = robust_zscore(s)
                rows.append({**base, "signal": name, "auroc_in_class": auroc(s[poison], s[~poison]),
                             "recall_at_2pct": recall_at_fpr(s[poison], s[~poison], 0.02),
                             "recall_z3": float((z[poison] > 3).mean()),
                             "clean_frac_z3": float((z[~poison] > 3).mean())})
            if with_policies:
                rows += [{**base, **r} for r in policy_rows(a, labels, is_poison, adv, POLICIES)]
        prev = a
    return rows


def summarize(rows: list[dict], top: int = 40) -> str:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["signal"], r["epoch"])].append(r)
    lines = ["| signal | epoch | runs | in-class AUROC | recall @ 2 % clean | recall (decision) | clean dropped |",
             "|---|---|---|---|---|---|---|"]
    stats = []
    for (signal, epoch), rs in groups.items():
        au = np.mean([r["auroc_in_class"] for r in rs if r.get("auroc_in_class") is not None] or [np.nan])
        r2 = np.mean([r["recall_at_2pct"] for r in rs if "recall_at_2pct" in r] or [np.nan])
        rd = np.mean([r.get("recall", r.get("recall_z3", np.nan)) for r in rs])
        cd = np.mean([r.get("clean_dropped_in_class_frac", r.get("clean_frac_z3", np.nan)) for r in rs])
        stats.append((signal, epoch, len(rs), au, r2, rd, cd))
    stats.sort(key=lambda s: -(s[4] if np.isfinite(s[4]) else s[5]))
    for signal, epoch, n, au, r2, rd, cd in stats[:top]:
        lines.append(f"| {signal} | {epoch} | {n} | {au:.3f} | {r2:.3f} | {rd:.3f} | {100 * cd:.2f} % |")
    return "\n".join(lines)


def policy_groups(rows: list[dict]) -> dict[tuple[str, int | str], list[dict]]:
    """The rows of each (policy, round epoch); rows of ``benchmarks.noise_screen_study --saved`` (the same sets)
    are the default's screen, round "start". Each row has recall, clean_dropped_in_class (and its fraction) and
    auroc_in_class."""
    groups: dict[tuple[str, int | str], list[dict]] = defaultdict(list)
    for r in rows:
        if "poisons_flagged" in r:  # a row of benchmarks.noise_screen_study --saved: the screen, before training
            groups[("noise screen (default)", "start")].append(
                {"recall": r["poisons_flagged"] / r["poisons"], "clean_dropped_in_class": r["clean_flagged_in_class"],
                 "clean_dropped_in_class_frac": r["clean_flagged_in_class"] / r["clean_in_class"],
                 "auroc_in_class": r["auroc_in_class"]})
        elif r["signal"].startswith("policy:"):
            groups[(r["signal"][len("policy:"):], r["round_epoch"])].append(r)
    return groups


def policy_table(rows: list[dict]) -> str:
    """Each policy's decision per round over the runs (sets) in ``rows``: mean and range of its recall, of the
    clean images of the poisons' class it drops, and of its in-class AUROC (the screen's rows included, see
    :func:`policy_groups`)."""
    lines = ["| policy | round (epoch) | sets | recall, mean [min–max] | clean dropped in class, mean [min–max] "
             "| in-class AUROC, mean [min–max] |", "|---|---|---|---|---|---|"]

    def spread(values: list[float], fmt: str) -> str:
        return f"{np.mean(values):{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"

    for (name, round_epoch), rs in policy_groups(rows).items():
        lines.append(f"| {name} | {round_epoch} | {len(rs)} | {spread([r['recall'] for r in rs], '.2f')} | "
                     f"{spread([r['clean_dropped_in_class'] for r in rs], '.0f')} | "
                     f"{spread([r['auroc_in_class'] for r in rs], '.2f')} |")
    return "\n".join(lines)


def policy_plot(rows: list[dict], path: Path, recall_target: float = 0.9, clean_budget: float = 0.02) -> Path:
    """Recall against clean images dropped (share of the poisons' class), one point per (policy, round): the
    mean over sets with its range as bars; the shaded corner is where a defense would have to be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = policy_groups(rows)
    names = list(dict.fromkeys(name for name, _ in groups))
    rounds = list(dict.fromkeys(r for _, r in groups))
    markers = dict(zip(rounds, "*osD^v<>"))
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.axvspan(0, 100 * clean_budget, ymin=recall_target / 1.05, ymax=1, color="tab:green", alpha=0.12,
               label=f"recall ≥ {recall_target}, ≤ {100 * clean_budget:.0f} % of the class dropped")
    for (name, round_epoch), rs in groups.items():
        x = 100 * np.array([r["clean_dropped_in_class_frac"] for r in rs])
        y = np.array([r["recall"] for r in rs])
        ax.errorbar(x.mean(), y.mean(), xerr=[[x.mean() - x.min()], [x.max() - x.mean()]],
                    yerr=[[y.mean() - y.min()], [y.max() - y.mean()]], fmt=markers[round_epoch],
                    color=f"C{names.index(name) % 10}", capsize=2, alpha=0.85, ms=9 if round_epoch == "start" else 6,
                    label=name)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("clean images of the poisons' class dropped (%; symlog), mean over sets with range")
    ax.set_ylabel("poison recall, mean over sets with range")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per policy (colour); markers are the rounds
    for round_epoch, marker in markers.items():
        unique[f"round: {round_epoch}"] = plt.Line2D([], [], color="grey", marker=marker, ls="")
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--signals", type=Path, default=Path("benchmarks/out/signals"))
    parser.add_argument("--runs", default="*", help="glob of run folders under --signals")
    parser.add_argument("--epochs", default=None, help="comma-separated epochs (default: every recorded one)")
    parser.add_argument("--out", type=Path, help="JSONL of per-(run, epoch, signal) rows")
    parser.add_argument("--no-policies", action="store_true", help="only the raw signals (faster)")
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--table", type=Path, nargs="+",
                        help="print the policies' per-round table from JSONL files this study wrote (and the "
                        "screen's rows of benchmarks.noise_screen_study --saved on the same sets), and stop")
    parser.add_argument("--plot", type=Path, help="with --table: also a PNG of recall against clean images dropped")
    args = parser.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for path in args.table for line in path.open()]
        print(policy_table(rows))
        if args.plot:
            print(f"\nplot: {policy_plot(rows, args.plot)}")
        return
    epochs = [int(e) for e in args.epochs.split(",")] if args.epochs else None
    rows = []
    for run_dir in sorted(args.signals.glob(args.runs)):
        if not (run_dir / "meta.json").exists():
            continue
        rows += study_run(run_dir, epochs, not args.no_policies)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if args.summary or not args.out:
        print(summarize(rows, args.top))


if __name__ == "__main__":
    main()
