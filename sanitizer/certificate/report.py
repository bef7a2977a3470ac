"""The human-readable report of a certificate: one self-contained HTML file plus the PNGs beside it.

Figures: rounds over time, per-class histograms of the isolation scores with the threshold, a 2-D PCA
projection of the gradient embeddings (dropped examples and known poisons marked), a grid of the
dropped images per class, ρ and the slack per round, the robustness table and the certified accuracy.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sanitizer.noise_screen import gradient_rounds

_STYLE = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d2330;margin:0;background:#f5f6f8}
main{max-width:1100px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:26px;margin:8px 0 4px}
h2{font-size:20px;margin:32px 0 8px;border-bottom:2px solid #e3e6eb;padding-bottom:4px}
p,li{font-size:14px;line-height:1.5}.muted{color:#5b6475}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px}
th,td{border:1px solid #d9dde3;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-family:Menlo,Consolas,monospace;font-size:12px;background:#f0f2f5;padding:1px 4px;border-radius:3px;
word-break:break-all}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.note{background:#fff8e6;border-left:4px solid #f0b429;padding:8px 12px;font-size:13px}
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}
"""

# Marks the page with how many images decoded, so a headless browser can check the report renders.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
"""


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, name: str) -> tuple[str, bytes]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    data = buf.getvalue()
    (out_dir / name).write_bytes(data)
    return name, data


def _class_colors(n: int):
    cmap = _plt().get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


# -- figures ---------------------------------------------------------------------------------------
def label_side_summary(side: dict | None) -> str:
    """One cell: did the density policy's label side act in this round, and why (its gate ratio)."""
    if not isinstance(side, dict):
        return "–"
    if "skipped" in side:
        return f"skipped: {side['skipped']}"
    state = "open" if side.get("open") else "closed"
    ratio = f"gate ratio {side.get('gate_ratio', float('nan')):.2f}"
    if "sampled" in side:  # a large round that bounded the ratio on a sample and skipped the full search
        ratio += f" on {side['sampled']:,} sampled examples, at most {side['gate_ratio_upper']:.2f}"
    text = f"{state} ({ratio}, cut {side.get('gate', 1.0):g})"
    if side.get("open"):
        text += f": {side.get('flagged', 0)} flagged, {side.get('dropped_by_label_side_only', 0)} dropped by it alone"
    return text


def fig_rounds(cert: dict, out_dir: Path):
    plt = _plt()
    rounds = cert["audit"]["rounds"]
    classes = sorted(cert["audit"]["dataset"]["class_counts"], key=int)
    epochs = [r["epoch"] for r in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    bottom = np.zeros(len(rounds))
    colors = _class_colors(len(classes))
    for c, color in zip(classes, colors):
        counts = np.array([r["per_class"].get(c, {}).get("dropped_now", 0) for r in rounds])
        ax1.bar(range(len(rounds)), counts, bottom=bottom, color=color, label=f"class {c}")
        bottom += counts
    ax1.set_xticks(range(len(rounds)), [f"r{r['round']}\nep {e}" for r, e in zip(rounds, epochs)])
    ax1.set_ylabel("examples dropped in the round")
    ax1.set_title("Drops per round, by class")
    ax1.set_ylim(0, max(1.0, float(bottom.max())) * 1.45)  # room for the legend above the bars
    ax1.legend(fontsize=7, ncol=5, loc="upper center")
    size = cert["audit"]["dataset"]["size"]
    ax2.plot(epochs, [size - r["dropped_total"] for r in rounds], "o-", color="#1f5fa8")
    ax2.set_xticks(epochs)
    ax2.set_xlabel("epoch of the round")
    ax2.set_ylabel("examples kept after the round")
    ax2.set_title(f"Training set size (of {size})")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_dir, "rounds.png")


def fig_scores(view: dict, cert: dict, out_dir: Path, poison_set: set[int] | None = None, *,
               policy: str | None = None, name: str = "scores.png"):
    """Per-class score histograms; ``policy`` labels an audited policy (else the sanitizer's own)."""
    plt = _plt()
    labels, scores, dropped = view["labels"], view["scores"], view["dropped"]
    classes = np.unique(labels)
    cols = min(5, len(classes))
    rows = int(np.ceil(len(classes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.3 * rows + 0.6), squeeze=False)
    own = policy is None or policy == cert["audit"]["configuration"]["policy"]
    threshold = cert["audit"]["configuration"]["policy_options"].get("threshold") if own else None
    finite = scores[np.isfinite(scores)]
    # Very dense (strongly negative) outliers would squeeze the informative right tail: clip the left.
    low = float(np.percentile(finite, 1)) if len(finite) else 0.0
    high = float(finite.max()) if len(finite) else 1.0
    if threshold is not None:
        low, high = min(low, float(threshold)), max(high, float(threshold))
    bins = np.linspace(low, high, 30) if high > low else 10
    scores = np.clip(scores, low, high)
    for ax, c in zip(axes.flat, classes):
        in_c = labels == c
        ax.hist([scores[in_c & ~dropped], scores[in_c & dropped]], bins=bins, stacked=True,
                color=["#8aa6c8", "#d62728"], label=["kept", "dropped"])
        poisons = in_c & np.isin(view["index"], list(poison_set or ()))
        if poisons.any():
            ax.hist(scores[poisons], bins=bins, histtype="step", color="black", lw=1.2, label="known poison")
        if threshold is not None:
            ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
        ax.set_title(f"class {c}  ({int(in_c.sum())} ex., {int((in_c & dropped).sum())} "
                     f"{'flagged' if view.get('audit') else 'dropped'})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(classes):]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    verb = "would drop" if view.get("audit") else "dropped"
    handles = [Patch(color="#8aa6c8", label="kept"), Patch(color="#d62728", label=verb)]
    if poison_set and np.isin(view["index"], list(poison_set)).any():
        handles.append(Patch(facecolor="none", edgecolor="black", label="known poison"))
    if threshold is not None:
        handles.append(Line2D([], [], color="black", ls="--", lw=1, label=f"threshold {threshold:g}"))
    what = f"{policy} scores" if policy else "Scores"
    fig.suptitle(f"{what} in round {view['round']} (epoch {view['epoch']}); higher = more suspicious", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.955))
    return _save(fig, out_dir, name)


def fig_projection(view: dict, poison_set: set[int], out_dir: Path):
    plt = _plt()
    xy, idx, labels, dropped = view["projection"], view["projection_index"], view["projection_labels"], \
        view["projection_dropped"]
    fig, ax = plt.subplots(figsize=(9, 6.5))
    colors = _class_colors(int(labels.max()) + 1 if len(labels) else 1)
    for c in np.unique(labels):
        sel = (labels == c) & ~dropped
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.45, color=colors[c], label=f"class {c}")
    ax.scatter(xy[dropped, 0], xy[dropped, 1], s=40, marker="x", color="#d62728", lw=1.5, label="dropped")
    poisons = np.array([i in poison_set for i in idx], dtype=bool)
    if poisons.any():
        ax.scatter(xy[poisons, 0], xy[poisons, 1], s=70, facecolors="none", edgecolors="black", lw=1.2,
                   label="known poison")
    ev = view.get("explained")
    ax.set_xlabel("PC 1" + (f" ({ev[0]:.0%} of variance)" if ev is not None else ""))
    ax.set_ylabel("PC 2" + (f" ({ev[1]:.0%} of variance)" if ev is not None else ""))
    ax.set_title(f"Gradient embeddings, round {view['round']} (epoch {view['epoch']}), PCA to 2-D"
                 + (f", {len(idx)} sampled" if view.get("sampled") else ""))
    ax.legend(fontsize=7, ncol=2, markerscale=1.5, loc="best")
    ax.grid(alpha=0.2)
    fig.tight_layout()
    return _save(fig, out_dir, "projection.png")


def fig_dropped(cert: dict, images: torch.Tensor | None, labels: np.ndarray, poison_set: set[int], out_dir: Path,
                per_class: int = 12):
    """One montage (a row per class with drops), drawn as a single image so it stays fast."""
    plt = _plt()
    dropped = np.asarray(cert["audit"]["dropped"], dtype=np.int64)
    classes = [int(c) for c in np.unique(labels[dropped])] if len(dropped) else []
    if images is None or not classes:
        fig, ax = plt.subplots(figsize=(8, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "No examples were dropped." if not classes else "Images are not available.",
                ha="center", va="center", fontsize=12)
        return _save(fig, out_dir, "dropped.png")
    c_in, h, w = images.shape[1:]
    pad = max(2, h // 8)
    cell_h, cell_w = h + 2 * pad, w + 2 * pad
    canvas = np.ones((len(classes) * cell_h, per_class * cell_w, 3), dtype=np.float32)
    counts = []
    for row, c in enumerate(classes):
        members = dropped[labels[dropped] == c]
        counts.append(len(members))
        for col, i in enumerate(members[:per_class]):
            img = images[int(i)].detach().float().cpu().clamp(0, 1).numpy()
            img = np.repeat(img[:1], 3, 0) if c_in == 1 else img[:3]
            top, left = row * cell_h, col * cell_w
            if int(i) in poison_set:  # a red frame around known poisons
                m = pad // 2
                canvas[top + m:top + cell_h - m, left + m:left + cell_w - m] = (0.84, 0.15, 0.16)
            canvas[top + pad:top + pad + h, left + pad:left + pad + w] = np.transpose(img, (1, 2, 0))
    fig, ax = plt.subplots(figsize=(11, max(1.6, 11 * canvas.shape[0] / canvas.shape[1] + 0.6)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(r + 0.5) * cell_h for r in range(len(classes))],
                  [f"class {c} ({n})" for c, n in zip(classes, counts)], fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"Dropped examples by class (up to {per_class} each; number dropped in brackets; "
                 "red frame = known poison)", fontsize=10)
    return _save(fig, out_dir, "dropped.png")


def fig_bound(cert: dict, out_dir: Path):
    plt = _plt()
    rounds = gradient_rounds(cert["audit"]["rounds"])
    stats = [r.get("extras", {}).get("bound") for r in rounds]
    epochs = [r["epoch"] for r in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
    ax1.plot(epochs, [s["rho"] for s in stats], "o-", label="ρ (whole set vs kept)")
    ax1.plot(epochs, [s["rho_round"] or 0 for s in stats], "s--", label="ρ of this round's drops")
    ax1.set_xlabel("epoch of the round")
    ax1.set_title("Gradient change caused by the drops (last layer)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    slack = [s["slack"] if s["slack"] is not None else np.nan for s in stats]
    ax2.plot(epochs, slack, "o-", color="#b35c00")
    ax2.set_xlabel("epoch of the round")
    ax2.set_title("Slack (2ρ∇max − ρ²)/(2µ̂)")
    for ax in (ax1, ax2):
        ax.set_xticks(epochs)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_dir, "rho.png")


def fig_robustness(section: dict, out_dir: Path):
    plt = _plt()
    attacks = section["attacks"]
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.9 * len(attacks)))
    arms = (("undefended", "#d62728"), ("sanitized", "#1f77b4"), ("clean", "#7f7f7f"))
    for j, (arm, color) in enumerate(arms):
        for i, a in enumerate(attacks):
            r = _clean_success(a) if arm == "clean" else a[arm]["attack_success"]
            y = i + 0.27 * (j - 1)
            if r is None or r["rate"] is None:
                continue
            lo, hi = r["wilson95"]
            ax.barh(y, r["rate"], height=0.25, color=color, label=(arm + " model" if arm == "clean" else arm)
                    if i == 0 else None)
            ax.errorbar(r["rate"], y, xerr=[[r["rate"] - lo], [hi - r["rate"]]], color="black", capsize=3, lw=1)
    ax.set_yticks(range(len(attacks)), [a["attack"] for a in attacks])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("attack success (Wilson 95% interval)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, out_dir, "robustness.png")


def fig_certified(section: dict, out_dir: Path):
    plt = _plt()
    curve = section["certified_accuracy"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot([c["radius"] for c in curve], [c["accuracy"] for c in curve], "o-", drawstyle="steps-post",
            color="#137333")
    ax.set_xlim(-0.2, max(1, len(curve) - 1) + 0.2)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("radius (training examples inserted or removed)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Partition aggregation, k = {section['partitions']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_dir, "certified.png")


# -- the view of one round used by the histograms and the projection -------------------------------
def round_view(recorder, labels: np.ndarray, fallback_scores: np.ndarray | None,
               keep: np.ndarray | None = None) -> dict[str, Any] | None:
    """The recorded round with the most drops (or the sanitizer's last scores when nothing was recorded)."""
    if recorder is not None and recorder.rounds:
        i = int(np.argmax([(~r["kept"]).sum() for r in recorder.rounds]))
        r = recorder.rounds[i]
        cand = r["candidates"]
        rows = r["projection_rows"]
        return {"round": i, "epoch": r["epoch"], "index": cand, "labels": labels[cand], "scores": r["scores"],
                "dropped": ~r["kept"], "projection": r["projection"], "projection_index": cand[rows],
                "projection_labels": labels[cand[rows]], "projection_dropped": ~r["kept"][rows],
                "explained": r.get("explained"), "sampled": len(rows) < len(cand)}
    if fallback_scores is not None and np.isfinite(fallback_scores).any():
        cand = np.flatnonzero(np.isfinite(fallback_scores))
        return {"round": "last", "epoch": "?", "index": cand, "labels": labels[cand], "scores": fallback_scores[cand],
                "dropped": ~np.asarray(keep, dtype=bool)[cand] if keep is not None else np.zeros(len(cand), bool),
                "projection": None}
    return None


# -- HTML ------------------------------------------------------------------------------------------
# Everything a certificate holds is untrusted text: every value is escaped on its way into the page,
# and only markup this module writes itself (an ``Html`` string) goes in as it is.
class Html(str):
    """Markup written by this module (never text from a certificate): inserted without escaping."""


def _fmt(v, digits: int = 4) -> str:
    """A value from a certificate as escaped HTML text."""
    if isinstance(v, Html):
        return v
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _code(v) -> Html:
    return Html(f"<code>{_fmt(v)}</code>")


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(
        f"<td class='num'>{_fmt(c)}</td>" if isinstance(c, (int, float)) and not isinstance(c, bool)
        else f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _rate(r: dict | None) -> str:
    """``rate (successes/trials; lo–hi)`` as plain text (escaped by :func:`_table`)."""
    if r is None or r["rate"] is None:
        return "–"
    lo, hi = r["wilson95"]
    return f"{r['rate']:.1%} ({r['successes']}/{r['trials']}; {lo:.1%}–{hi:.1%})"


def robustness_verdict(attack: dict) -> str:
    """Whether the sanitizer stopped one measured attack, from the counts the certificate holds: ``stopped``
    (sanitized success below undefended, Wilson 95 % intervals apart), ``lower`` (below, intervals
    overlapping: more runs would tell), ``not stopped`` (sanitized success at or above undefended),
    ``no effect`` (the certificate has a clean arm, and neither the undefended nor the sanitized success is
    measurably above the clean model's: the attack did nothing this proxy can see) or ``not measured``."""
    und, san = attack["undefended"]["attack_success"], attack["sanitized"]["attack_success"]
    if und["rate"] is None or san["rate"] is None:
        return "not measured"
    clean = _clean_success(attack)
    if clean and clean["rate"] is not None and max(und["wilson95"][0], san["wilson95"][0]) <= clean["wilson95"][1]:
        return "no effect"
    if san["rate"] >= und["rate"]:
        return "not stopped"
    return "stopped" if san["wilson95"][1] < und["wilson95"][0] else "lower"


def _clean_success(attack: dict) -> dict | None:
    """The clean arm's attack-success rate, or None for certificates written before the clean arm."""
    return (attack.get("clean") or {}).get("attack_success")


def without_effect(robustness: dict | None) -> list[str]:
    """The measured attacks whose success, undefended and sanitized, was not above the clean model's."""
    return [a["attack"] for a in (robustness or {}).get("attacks", []) if robustness_verdict(a) == "no effect"]


def not_stopped(robustness: dict | None) -> list[str]:
    """The measured attacks the sanitizer did not stop (its success was not lower than undefended)."""
    return [a["attack"] for a in (robustness or {}).get("attacks", []) if robustness_verdict(a) == "not stopped"]


def _img(name: str, data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f"<img src='data:image/png;base64,{encoded}' alt='{html.escape(alt)}' data-file='{name}'>"


def audit_views(cert: dict, labels: np.ndarray, audit_scores: dict | None) -> dict[str, dict]:
    """Per audited policy, the last audited round's scores and would-be drops (for the histograms)."""
    rounds = [r for r in cert["audit"]["rounds"] if r.get("audit")]
    if not rounds or not audit_scores:
        return {}
    last = rounds[-1]
    views = {}
    for policy, info in last["audit"]["policies"].items():
        scores = audit_scores.get((last["epoch"], policy))
        if scores is None:
            continue
        index = np.flatnonzero(np.isfinite(scores))
        would = np.zeros(len(scores), dtype=bool)
        would[info["would_drop"]] = True
        views[policy] = {"labels": labels[index], "scores": scores[index], "dropped": would[index], "index": index,
                         "round": last["round"], "epoch": last["epoch"], "audit": True}
    return views


def audit_table(cert: dict, poison_set: set[int]) -> str:
    """What every audited policy would drop at every audited round (and how many known poisons)."""
    rows = []
    for r in cert["audit"]["rounds"]:
        for policy, info in (r.get("audit") or {}).get("policies", {}).items():
            would = info["would_drop"]
            caught = len(poison_set & set(would)) if poison_set else None
            rows.append([r["round"], r["epoch"], policy, info["embedding"], len(would),
                         "–" if caught is None else f"{caught} of {len(poison_set)}"])
    return _table(["round", "epoch", "policy", "embedding", "would drop", "known poisons among them"], rows)


def write_report(cert: dict, out_dir: str | Path, *, recorder=None, images: torch.Tensor | None = None,
                 labels: np.ndarray | None = None, poison_indices=None,
                 last_scores: np.ndarray | None = None, keep: np.ndarray | None = None,
                 audit_scores: dict | None = None) -> Path:
    """Write ``report.html`` and its PNGs into ``out_dir``; return the HTML path.

    Example:
        >>> write_report(cert, "report", recorder=recorder, images=train.images,
        ...              labels=train.labels.numpy())  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    audit = cert["audit"]
    labels = np.asarray(labels) if labels is not None else None
    poison_set = {int(i) for i in (poison_indices if poison_indices is not None else [])}
    figures: list[tuple[str, str, str, bytes]] = []  # section, alt, name, data

    def add(section: str, alt: str, made) -> None:
        figures.append((section, alt, *made))

    if audit["rounds"]:
        add("rounds", "drops per round and kept examples", fig_rounds(cert, out))
    view = round_view(recorder, labels, last_scores, keep) if labels is not None else None
    if view is not None and view["round"] == "last" and audit["rounds"]:
        view["round"], view["epoch"] = audit["rounds"][-1]["round"], audit["rounds"][-1]["epoch"]
    if view is not None:
        add("scores", "isolation score histograms", fig_scores(view, cert, out, poison_set))
        if view.get("projection") is not None:
            add("projection", "PCA projection of gradient embeddings", fig_projection(view, poison_set, out))
    audited = audit_views(cert, labels, audit_scores) if labels is not None else {}
    for i, (policy, v) in enumerate(audited.items()):
        add(f"audit:{policy}", f"audited scores of {policy}",
            fig_scores(v, cert, out, poison_set, policy=policy, name=f"audit_{i}.png"))
    if labels is not None:
        add("dropped", "dropped images per class", fig_dropped(cert, images, labels, poison_set, out))
    if cert["bound"] is not None:
        add("bound", "rho and slack per round", fig_bound(cert, out))
    if cert["robustness"] is not None and cert["robustness"]["attacks"]:
        add("robustness", "attack success undefended vs sanitized", fig_robustness(cert["robustness"], out))
    if cert["partition"] is not None:
        add("partition", "certified accuracy by radius", fig_certified(cert["partition"], out))
    imgs = {s: _img(name, data, alt) for s, alt, name, data in figures}

    ds, cfg = audit["dataset"], audit["configuration"]
    dropped = audit["dropped"]
    e = _fmt
    parts = [f"<h1>Certificate of a sanitized training run</h1>"
             f"<p class='muted'>Schema {e(cert['schema'])} v{e(cert['schema_version'])} · created "
             f"{e(cert['created'])}</p>"]
    summary = [
        ["Dataset", f"{ds['size']} examples of shape {tuple(ds['example_shape'])}, {len(ds['class_counts'])} classes"],
        ["Fingerprint", _code(ds["fingerprint"])],
        ["Policy", f"{cfg['policy']} ({', '.join(f'{k}={v}' for k, v in cfg['policy_options'].items())}), "
                   f"embedding {cfg['embedding']}"],
        ["Schedule", f"rounds from epoch {cfg['warmup']}, every {cfg['every']} epochs"
                     + (f", until epoch {cfg['stop_epoch']}" if cfg["stop_epoch"] is not None else "")
                     + ("" if cfg["cumulative"] else ", drops not cumulative")],
        ["Rounds", str(len(audit["rounds"]))],
        ["Dropped", f"{len(dropped)} examples ({len(dropped) / ds['size']:.2%})"],
    ]
    if poison_set:
        caught = len(poison_set & set(dropped))
        summary.append(["Known poisons", f"{caught} of {len(poison_set)} dropped; "
                                         f"{len(dropped) - caught} clean examples dropped"])
    summary.append(["Seal", _code(cert["seal"]["hash"])])
    sig = cert.get("signature")
    summary.append(["Signature", Html(f"ed25519, key {_code(sig.get('key_id'))}") if isinstance(sig, dict)
                    else "none: this certificate shows integrity only, not origin"])
    parts.append(_table(None, summary))
    parts.append("<p class='muted'>Check it with <code>sanitizer verify cert.json --public-key issuer.pub.pem</code> "
                 "(add <code>--data</code> to check the dataset fingerprint). This page is a rendering of the "
                 "file: only <code>verify</code> says whether the file is intact and who signed it.</p>")

    parts.append("<h2>Rounds</h2>" + imgs.get("rounds", "<p>No rounds ran.</p>"))
    rows = [[r["round"], r["epoch"], r["candidates"], len(r["dropped_now"]), r["dropped_total"],
             label_side_summary(r.get("label_side"))] for r in audit["rounds"]]
    parts.append(_table(["round", "epoch", "candidates", "dropped now", "dropped in total", "label side"], rows))
    if "scores" in imgs:
        parts.append("<h2>Scores</h2>" + imgs["scores"])
    if any(r.get("audit") for r in audit["rounds"]):
        mode = next(r["audit"]["mode"] for r in audit["rounds"] if r.get("audit"))
        parts.append("<h2>Audit: what each policy would drop</h2>"
                     + ("<p>This run was an <b>audit</b>: every round was scored, nothing was dropped.</p>"
                        if mode == "audit" else "<p>Other policies scored beside the one that dropped.</p>")
                     + audit_table(cert, poison_set)
                     + "".join(imgs[f"audit:{p}"] for p in audited))
    if "projection" in imgs:
        parts.append("<h2>Gradient embeddings</h2>" + imgs["projection"])
    if "dropped" in imgs:
        parts.append("<h2>Dropped examples</h2>" + imgs["dropped"])

    parts.append("<h2>Training-dynamics bound</h2>")
    bound = cert["bound"]
    if bound is None:
        parts.append("<p>No per-round gradient statistics were recorded (attach a "
                     "<code>BoundRecorder</code> before training).</p>")
    else:
        parts.append(f"<p>{e(bound['theorem'])}. {e(bound['statement'])}</p>" + imgs.get("bound", ""))
        rows = [[r["round"], r["epoch"], b["rho"], b["rho_round"], b["grad_max"], b["grad_norm"], b["loss"],
                 b["mu_estimate"], b["slack"]]
                for r in gradient_rounds(audit["rounds"]) for b in [r["extras"]["bound"]]]
        parts.append(_table(["round", "epoch", "ρ", "ρ (round)", "∇max", "‖∇L‖", "L", "µ̂", "slack"], rows))
        parts.append(f"<p>Conservative slack (largest ρ and ∇max with the smallest µ̂): "
                     f"<b>{e(bound.get('conservative_slack'))}</b>.</p>")
        parts.append("<div class='note'><b>Not verified by this run:</b><ul>"
                     + "".join(f"<li>{e(a)}</li>" for a in bound["assumptions_not_verified"])
                     + "</ul></div>")

    parts.append("<h2>Measured robustness</h2>")
    rob = cert["robustness"]
    if rob is None:
        parts.append("<p>Not measured (run <code>sanitizer certify --attacks ...</code>).</p>")
    else:
        px = rob["proxy"]
        epochs = px.get("train_config", {}).get("epochs") if isinstance(px.get("train_config"), dict) else None
        parts.append(f"<p class='note'>{e(rob['label'])}. Proxy: {e(px.get('train_size'))} of {e(px.get('of'))} "
                     f"training examples, {e(epochs)} epochs, {e(px.get('runs'))} run(s) per attack, "
                     f"{e(px.get('test_size'))} test images.</p>")
        rows = [[a["attack"], a["goal"], a["runs"], a["measure"], _rate(a["undefended"]["attack_success"]),
                 _rate(a["sanitized"]["attack_success"]), _rate(_clean_success(a)),
                 robustness_verdict(a),
                 _rate(a["undefended"]["clean_accuracy"]), _rate(a["sanitized"]["clean_accuracy"]),
                 _rate(a.get("poisons_dropped"))] for a in rob["attacks"]]
        parts.append(_table(["attack", "goal", "runs", "success means", "success undefended",
                             "success sanitized", "success clean model", "verdict", "clean acc. undefended",
                             "clean acc. sanitized", "poisons dropped"], rows))
        missed = not_stopped(rob)
        parts.append(f"<p class='note'><b>Not stopped by this sanitizer:</b> {e(', '.join(missed))}: its attack "
                     "success with the sanitizer was not lower than without.</p>" if missed else
                     "<p>Every measured attack with an effect had a lower success rate with the sanitizer than "
                     "without (verdict <i>stopped</i>: the 95 % intervals are apart; <i>lower</i>: they "
                     "overlap).</p>")
        quiet = without_effect(rob)
        if quiet:
            parts.append(f"<p class='note'><b>No measurable effect:</b> {e(', '.join(quiet))}: with and without "
                         "the sanitizer its success was within the clean model's interval, so this proxy cannot "
                         "tell whether the sanitizer stops it (more runs, or a stronger setting, would).</p>")
        parts.append("<p class='muted'>Rates: value (successes/trials; Wilson 95% interval).</p>"
                     + imgs.get("robustness", ""))

    part = cert["partition"]
    if part is not None:
        parts.append("<h2>Provable certificate: partition aggregation</h2>")
        clean = part.get("clean_accuracy")
        parts.append(f"<p>{e(part.get('guarantee', ''))} Partition rule: {e(part['hash'])}. "
                     f"Clean accuracy of the vote: {e(f'{clean:.1%}' if clean is not None else None)} on "
                     f"{e(part['test_size'])} test images.</p>" + imgs.get("partition", ""))
        shown = [c for c in part["certified_accuracy"] if c["radius"] <= 10]
        parts.append(_table(["radius", "certified accuracy"], [[c["radius"], c["accuracy"]] for c in shown]))
    versions = ", ".join(f"{k} {v}" for k, v in audit["versions"].items())
    parts.append(f"<h2>Environment</h2><p class='muted'>{e(versions)}. Seeds: {e(audit['seeds'])}.</p>")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Sanitizer certificate</title>"
            f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body><main>"
            + "\n".join(parts) + "</main></body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# -- the plain-text summary ``sanitizer certify`` prints ------------------------------------------
def _columns(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _short_rate(r: dict | None) -> str:
    if r is None or r["rate"] is None:
        return "–"
    lo, hi = r["wilson95"]
    return f"{r['rate']:.1%} [{lo:.1%}, {hi:.1%}] ({r['successes']}/{r['trials']})"


def text_summary(cert: dict[str, Any]) -> str:
    """A short plain-text table of a certificate's results, one block per section it has.

    Example:
        >>> print(text_summary(cert))  # doctest: +SKIP
        audit       200 examples, 2 rounds, 12 dropped (6.0%)
        ...
    """
    audit, lines = cert["audit"], []
    size, dropped = audit["dataset"]["size"], audit["dropped"]
    poisons = set(audit["dataset"].get("poison_indices") or [])
    screens = [r for r in audit["rounds"] if r.get("kind") == "screen"]
    line = f"audit       {size} examples, {len(gradient_rounds(audit['rounds']))} rounds, {len(dropped)} dropped " \
           f"({len(dropped) / size:.1%})"
    if screens:
        line += f"; {len(screens[0]['dropped_now'])} by the noise screen"
        stamped = ((screens[0].get("screen") or {}).get("shared_patterns") or {}).get("flagged")
        if stamped:
            line += f" ({stamped} of them share a stamped window in their class)"
    if poisons:
        line += f"; known poisons: {len(poisons & set(dropped))} of {len(poisons)} dropped"
    lines.append(line)
    bound = cert.get("bound")
    if bound:
        lines.append(f"bound       max ρ {_fmt(bound['max_rho'])}, max ∇max {_fmt(bound['max_grad_max'])}, "
                     f"conservative slack {_fmt(bound.get('conservative_slack'))} (assumptions not verified)")
    rob = cert.get("robustness")
    if rob and rob["attacks"]:
        runs = rob["proxy"].get("runs")
        lines.append(f"robustness  proxy run, {runs} run(s) per attack: attack success, rate [Wilson 95%] "
                     "(successes/trials)")
        rows = [["attack", "undefended", "sanitized", "clean model", "verdict", "poisons dropped"]]
        rows += [[str(a["attack"]), _short_rate(a["undefended"]["attack_success"]),
                  _short_rate(a["sanitized"]["attack_success"]),
                  _short_rate(_clean_success(a)), robustness_verdict(a),
                  _short_rate(a.get("poisons_dropped"))]
                 for a in rob["attacks"]]
        lines += _columns(rows)
        missed = not_stopped(rob)
        if missed:
            lines.append(f"            NOT STOPPED by this sanitizer: {', '.join(missed)} (success not lower than "
                         "undefended)")
        quiet = without_effect(rob)
        if quiet:
            lines.append(f"            NO MEASURABLE EFFECT: {', '.join(quiet)} (success within the clean model's "
                         "interval with and without the sanitizer)")
    part = cert.get("partition")
    if part:
        accs = [a for a in part.get("part_accuracies") or [] if a is not None]
        mean = f"{np.mean(accs):.1%}" if accs else "not recorded"
        radii = np.asarray(part["radii"])
        curve = {c["radius"]: c["accuracy"] for c in part["certified_accuracy"]}
        lines.append(f"partition   {part['partitions']} part models, mean part accuracy {mean}, vote accuracy "
                     f"{part.get('clean_accuracy', 0):.1%} on {part['test_size']} test images")
        if len(radii):
            lines.append(f"            certified radius: median {np.median(radii):g}, max {radii.max()}, "
                         f"≥ 1 for {(radii >= 1).mean():.1%} of test images; certified accuracy "
                         + ", ".join(f"{curve[r]:.1%} at r={r}" for r in sorted(curve)[:4]))
    return "\n".join(lines)


def find_browser() -> str | None:
    """A Chromium-family browser on PATH, or None."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_check(html_path: str | Path, screenshot: str | Path | None = None, width: int = 1200,
                  height: int = 3000, timeout: float = 120) -> dict[str, Any]:
    """Open the report in headless Chromium: count the images that decoded, optionally take a screenshot.

    Returns ``{"images_ok": int, "images": int, "screenshot": path or None}``.
    """
    import re
    import subprocess
    import tempfile

    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found; install it with `apt-get install -y chromium`")
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
        dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=timeout).stdout
        if screenshot is not None:
            subprocess.run(common + [f"--screenshot={Path(screenshot).resolve()}", f"--window-size={width},{height}",
                                     url], capture_output=True, timeout=timeout, check=True)
    found = re.search(r'data-images="(\d+)/(\d+)"', dom)
    if not found:
        raise RuntimeError("the browser did not run the report's load check (no data-images attribute)")
    return {"images_ok": int(found.group(1)), "images": int(found.group(2)),
            "screenshot": str(screenshot) if screenshot is not None else None}
