"""Training-dynamics bound of EPIC (Yang, Liu & Mirzasoleiman, ICML 2022, Theorem 3.1), measured per round.

The theorem: if the full-data loss L is µ-PL, its gradient norm is at most ∇max, and training uses
a subset S whose mean gradient differs from the full data's by at most ρ, then SGD on S converges
to a neighbourhood of the optimum whose loss exceeds the usual bound by a slack of

    (2ρ∇max − ρ²) / (2µ).

At each round :class:`BoundRecorder` measures, from the exact per-example gradients of the cross-
entropy with respect to the last linear layer, g_i = (softmax(z_i) − onehot(y_i)) ⊗ [h_i; 1]:

- ``rho``: ‖mean_{i∈V} g_i − mean_{i∈S} g_i‖, V = the whole training set as given, S = the examples
  kept after the round (cumulative drops included);
- ``rho_round``: the same between this round's candidates and the ones it kept;
- ``grad_max``: max_i ‖g_i‖ over V (bounds ‖∇L‖ and every subset's mean gradient at this point);
- ``grad_norm``: ‖∇L‖ = ‖mean_{i∈V} g_i‖ and ``loss``: L, the mean cross-entropy over V;
- ``mu_estimate``: ‖∇L‖² / (2 (L − L*)) with L* ≈ 0, the PL ratio at the current weights;
- ``slack``: (2ρ∇max − ρ²) / (2µ̂).

The norms use only the last layer's gradient and the model in eval mode; weight decay is left out
(its gradient is the same for V and S, so it does not change ρ).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sanitizer.embeddings import _EvalMode, _logits_of, _resolve_device, find_last_linear, iterate_batches
from sanitizer.noise_screen import gradient_rounds

THEOREM = "EPIC (Yang, Liu & Mirzasoleiman, ICML 2022), Theorem 3.1"
STATEMENT = ("If the full-data loss L is µ-PL and its gradient norm is at most ∇max, training on a subset whose "
             "mean gradient is within ρ of the full data's converges to a neighbourhood of the optimum whose "
             "loss bound grows by the slack (2ρ∇max − ρ²)/(2µ).")
ASSUMPTIONS_NOT_VERIFIED = [
    "The theorem is stated for (incremental) gradient descent with a decaying step size; the run may use "
    "mini-batch SGD with momentum (e.g. Nesterov) and step decays, which the theorem does not cover.",
    "The PL condition (½‖∇L‖² ≥ µ(L − L*)) is assumed, not verified; deep networks need not satisfy it.",
    "µ is estimated at the round's weights only, as ‖∇L‖²/(2L) with L* taken as 0; the PL constant is the "
    "infimum over the whole trajectory, so the estimate may be larger than µ and the slack smaller than "
    "the theorem's.",
    "ρ, ∇max and ‖∇L‖ use only the last layer's gradient; the gradients of the other layers are not measured.",
    "The quantities are measured at round epochs only; ρ and ∇max between rounds are not observed.",
    "Gradients are taken in eval mode (batch-norm running statistics) on un-augmented inputs, and the loss "
    "leaves out weight decay; training uses train mode, augmentation and weight decay.",
]


@torch.no_grad()
def last_layer_statistics(
    model: nn.Module,
    dataset: Dataset,
    kept: np.ndarray,
    candidates: np.ndarray | None = None,
    round_kept: np.ndarray | None = None,
    batch_size: int = 512,
    last_layer: nn.Linear | None = None,
) -> dict[str, Any]:
    """The bound's quantities at the model's current weights (see the module docstring).

    ``kept`` is a bool mask over ``dataset`` (S); ``candidates`` (indices) and ``round_kept`` (bool
    over candidates) describe this round alone, for ``rho_round``.

    Example:
        >>> stats = last_layer_statistics(model, train_set, sanitizer.keep)  # doctest: +SKIP
        >>> stats["rho"], stats["slack"]  # doctest: +SKIP
    """
    kept = np.asarray(kept, dtype=bool)
    n = len(kept)
    dev = _resolve_device(model, None)
    in_round = np.zeros(n, dtype=bool)
    round_keep = np.zeros(n, dtype=bool)
    if candidates is not None:
        in_round[candidates] = True
        round_keep[np.asarray(candidates)[np.asarray(round_kept, dtype=bool)]] = True
    sums = {"all": None, "kept": None, "round": None, "round_kept": None}
    counts = {"all": n, "kept": int(kept.sum()), "round": int(in_round.sum()), "round_kept": int(round_keep.sum())}
    masks = {"kept": torch.from_numpy(kept), "round": torch.from_numpy(in_round),
             "round_kept": torch.from_numpy(round_keep)}
    grad_max, loss_sum, start = 0.0, 0.0, 0
    captured: dict[str, torch.Tensor] = {}
    hook = None
    with _EvalMode(model):
        try:
            for x, y in iterate_batches(dataset, batch_size):
                x, y = x.to(dev), torch.as_tensor(y).to(dev).long()
                if last_layer is None:
                    last_layer = find_last_linear(model, x[:2])
                if hook is None:
                    hook = last_layer.register_forward_hook(lambda _m, inp, _o: captured.__setitem__("h", inp[0]))
                z = _logits_of(model(x)).double()
                h1 = torch.cat([captured["h"].double(), torch.ones(len(y), 1, device=dev, dtype=torch.float64)], 1)
                e = torch.softmax(z, 1) - F.one_hot(y, z.shape[1]).double()
                loss_sum += float(F.cross_entropy(z, y, reduction="sum"))
                # ‖e ⊗ h1‖ = ‖e‖·‖h1‖, so the per-example norm never needs the outer product.
                grad_max = max(grad_max, float((e.norm(dim=1) * h1.norm(dim=1)).max()))
                rows = slice(start, start + len(y))
                for name in sums:
                    sel = slice(None) if name == "all" else masks[name][rows].to(dev)
                    part = e[sel].T @ h1[sel]
                    sums[name] = part if sums[name] is None else sums[name] + part
                start += len(y)
        finally:
            if hook is not None:
                hook.remove()

    def mean(name: str) -> torch.Tensor:
        return sums[name] / max(counts[name], 1)

    grad_norm = float(mean("all").norm())
    rho = float((mean("all") - mean("kept")).norm())
    rho_round = float((mean("round") - mean("round_kept")).norm()) if counts["round"] else None
    loss = loss_sum / n
    return {"n": n, "n_kept": counts["kept"], "loss": loss, "grad_norm": grad_norm, "grad_max": grad_max,
            "rho": rho, "rho_round": rho_round, **slack_terms(rho, grad_max, grad_norm, loss)}


def slack_terms(rho: float, grad_max: float, grad_norm: float, loss: float, loss_star: float = 0.0) -> dict:
    """µ̂ = ‖∇L‖²/(2(L − L*)) and the slack (2ρ∇max − ρ²)/(2µ̂); None where undefined (µ̂ = 0)."""
    gap = loss - loss_star
    mu = grad_norm ** 2 / (2 * gap) if gap > 0 else None
    slack = (2 * rho * grad_max - rho ** 2) / (2 * mu) if mu else None
    return {"mu_estimate": mu, "slack": slack if slack is None or math.isfinite(slack) else None}


class BoundRecorder:
    """A round hook that records the bound's quantities in every round record (under
    ``extras["bound"]``) and keeps, in memory, each round's scores and a 2-D PCA projection of the
    embeddings for the report.

    Example:
        >>> recorder = BoundRecorder.attach(sanitizer)   # before training
        >>> train_classifier(model, train_set, config, sanitizer=sanitizer)  # doctest: +SKIP
        >>> sanitizer.certificate("cert.json", report_dir="report")  # doctest: +SKIP
    """

    def __init__(self, projection_points: int = 4000, seed: int = 0) -> None:
        self.projection_points = projection_points
        self.seed = seed
        self.rounds: list[dict[str, Any]] = []

    @classmethod
    def attach(cls, sanitizer, **options) -> BoundRecorder:
        """Install a recorder on ``sanitizer`` (or return the one already installed)."""
        for hook in sanitizer.round_hooks:
            if isinstance(hook, cls):
                return hook
        recorder = cls(**options)
        sanitizer.round_hooks.append(recorder)
        return recorder

    def __call__(self, sanitizer, epoch: int, candidates: np.ndarray, embeddings: torch.Tensor, selection) -> dict:
        stats = last_layer_statistics(sanitizer.model, sanitizer.embed_dataset, sanitizer.keep, candidates,
                                      selection.keep, sanitizer.batch_size, sanitizer.last_layer)
        self.rounds.append({"epoch": int(epoch), "candidates": np.asarray(candidates).copy(),
                            "scores": np.asarray(selection.scores, dtype=np.float64).copy(),
                            "kept": np.asarray(selection.keep, dtype=bool).copy(),
                            **self._project(embeddings)})
        return {"bound": stats}

    def _project(self, embeddings: torch.Tensor) -> dict[str, Any]:
        """PCA to 2-D of (a seeded sample of) this round's embeddings."""
        x = torch.as_tensor(embeddings).double()
        rng = np.random.default_rng(self.seed)
        rows = np.arange(len(x))
        if len(x) > self.projection_points:
            rows = np.sort(rng.choice(len(x), self.projection_points, replace=False))
        x = x[torch.from_numpy(rows)]
        x = x - x.mean(0, keepdim=True)
        if len(x) < 3:
            return {"projection_rows": rows, "projection": np.zeros((len(x), 2))}
        _u, s, v = torch.linalg.svd(x, full_matrices=False)
        coords = (x @ v[:2].T).numpy()
        explained = (s[:2] ** 2 / (s ** 2).sum()).numpy()
        return {"projection_rows": rows, "projection": coords, "explained": explained}


def bound_section(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The certificate's ``bound`` section: definitions, assumptions and a summary over rounds."""
    history = gradient_rounds(history)
    per_round = [r.get("extras", {}).get("bound") for r in history]
    if not history or any(p is None for p in per_round):
        return None
    rhos = [p["rho"] for p in per_round]
    mus = [p["mu_estimate"] for p in per_round if p["mu_estimate"]]
    gmax = max(p["grad_max"] for p in per_round)
    worst_slack = (2 * max(rhos) * gmax - max(rhos) ** 2) / (2 * min(mus)) if mus else None
    return {
        "theorem": THEOREM,
        "statement": STATEMENT,
        "definitions": {
            "rho": "‖mean gradient over the whole training set − mean gradient over the kept examples‖ "
                   "after the round (last layer, exact)",
            "rho_round": "the same between this round's candidates and the ones it kept",
            "grad_max": "largest per-example last-layer gradient norm over the whole training set",
            "mu_estimate": "‖∇L‖² / (2 (L − L*)) at the round's weights, with L* taken as 0",
            "slack": "(2 ρ ∇max − ρ²) / (2 µ̂)",
        },
        "per_round_location": "audit.rounds[i].extras.bound",
        "max_rho": max(rhos),
        "max_grad_max": gmax,
        "min_mu_estimate": min(mus) if mus else None,
        "max_slack": max((p["slack"] for p in per_round if p["slack"] is not None), default=None),
        "conservative_slack": worst_slack,
        "conservative_slack_note": "max ρ and max ∇max over rounds with the smallest µ̂ over rounds",
        "assumptions_not_verified": list(ASSUMPTIONS_NOT_VERIFIED),
    }
