"""Adaptive gradient matching: the attacker who knows the density defense.

Gradient matching (:mod:`sanitizer.attacks.gradient_matching`) plus two terms that model our
default defense: one keeps every poison's gradient embedding inside the dense part of its own class,
so that a filter that drops examples isolated in gradient-embedding space (the density rounds, EPIC)
has less to see; the other keeps each poison's patch noise floor at its base image's, so that the
input-noise screen (:mod:`sanitizer.noise_screen`) has less to see:

    loss = matching loss + λ · mean_i ‖e(x_i + δ_i) − a_i‖² / s²
           + λ_noise · mean_i relu(log floor(x_i + δ_i) − log floor(x_i))

``e`` is the defense's embedding computed on the un-augmented poison with the (first) surrogate:
``last_layer`` = (softmax(z) − onehot(y)) ⊗ [h; 1], ``logits`` = softmax(z) − onehot(y), or
``features`` = h, the penultimate features (the embedding of our configuration tuned for transfer).
``a_i`` is the mean of the ``k`` clean same-class embeddings nearest to the poison's current
embedding (``anchor="knn"``) or the clean class mean (``anchor="mean"``); ``s²`` is the median
squared distance of clean class members to their own anchors, so λ is scale free.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sanitizer.attacks._util import eval_mode
from sanitizer.attacks.base import ThreatModel, register_attack
from sanitizer.attacks.gradient_matching import GradientMatcher, GradientMatching, LossFn
from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.embeddings import find_last_linear, model_device
from sanitizer.noise_screen import noise_floor_of


def embedding_of(model: nn.Module, last: nn.Linear, images: torch.Tensor, labels: torch.Tensor,
                 kind: str) -> torch.Tensor:
    """The defense's embedding of a batch (gradient, logits or penultimate features), differentiable in ``images``."""
    captured = {}
    hook = last.register_forward_hook(lambda _m, inp, _o: captured.__setitem__("h", inp[0]))
    try:
        z = model(images)
    finally:
        hook.remove()
    h = captured["h"].flatten(1)
    if kind == "features":
        return h
    e = torch.softmax(z, 1) - F.one_hot(labels, z.shape[1]).to(z.dtype)
    if kind == "logits":
        return e
    h1 = torch.cat([h, torch.ones(len(h), 1, device=h.device, dtype=h.dtype)], 1)
    return (e[:, :, None] * h1[:, None, :]).flatten(1)


class DensityTerm:
    """Squared distance of poison embeddings to the dense part of their class, in units of the clean spread."""

    def __init__(self, model: nn.Module, clean_images: torch.Tensor, cls: int, kind: str, k: int, anchor: str,
                 batch_size: int = 512) -> None:
        self.model, self.kind, self.anchor = model, kind, anchor
        device = model_device(model)
        self.last = find_last_linear(model, clean_images[:2].to(device))
        with eval_mode([model]), torch.no_grad():
            chunks = [embedding_of(model, self.last, clean_images[i:i + batch_size].to(device),
                                   torch.full((len(clean_images[i:i + batch_size]),), cls, device=device), kind)
                      for i in range(0, len(clean_images), batch_size)]
        self.clean = torch.cat(chunks)
        self.k = max(1, min(int(k), len(self.clean) - 1))
        self.mean = self.clean.mean(0)
        # Scale: how far clean members sit from their own anchors (excluding themselves).
        own = self._anchors(self.clean, exclude_self=True)
        self.scale = float((self.clean - own).pow(2).sum(1).median()) + 1e-12

    def _anchors(self, emb: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        if self.anchor == "mean":
            return self.mean.expand_as(emb)
        d = torch.cdist(emb.detach(), self.clean)
        if exclude_self:
            d.fill_diagonal_(float("inf"))
        nearest = d.topk(self.k, dim=1, largest=False).indices
        return self.clean[nearest].mean(1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with eval_mode([self.model]):
            emb = embedding_of(self.model, self.last, images.to(self.clean.device), labels.to(self.clean.device),
                               self.kind)
        return (emb - self._anchors(emb)).pow(2).sum(1).mean() / self.scale


def noise_excess(images: torch.Tensor, base_log_floor: torch.Tensor) -> torch.Tensor:
    """mean_i relu(log floor(x_i) − log floor(base_i)): what the input-noise screen sees of a perturbation."""
    log_floor = noise_floor_of(images.cpu().double()).log()
    return F.relu(log_floor - base_log_floor).mean().float()


@register_attack("adaptive")
class AdaptiveGradientMatching(GradientMatching):
    """Gradient matching that also keeps each poison's gradient embedding in its class's dense region.

    Args (besides :class:`GradientMatching`'s):
        lam: weight λ of the density term.
        noise_lam: weight λ_noise of the noise-floor term (``lam=0, noise_lam=0`` is plain gradient matching).
        k: neighbours for the ``knn`` anchor; anchor: ``"knn"`` or ``"mean"``.
        embedding: ``"last_layer"`` (our default defense's embedding), ``"logits"`` (EPIC's) or
            ``"features"`` (the penultimate features: our configuration tuned for transfer learning).

    Example:
        >>> attack = make_attack("adaptive", lam=1.0, embedding="last_layer")  # doctest: +SKIP
        >>> poisons = attack.craft(train_set, surrogate=model, test_set=test_set, target_index=7)  # doctest: +SKIP
    """

    threat_model = ThreatModel("targeted", clean_label=True, setting="both",
                               summary="gradient matching that keeps poison gradient embeddings dense within "
                                       "their class (defense-aware)")

    def __init__(self, lam: float = 1.0, k: int = 10, anchor: str = "knn", embedding: str = "last_layer",
                 noise_lam: float = 1.0, **gm_params) -> None:
        super().__init__(**gm_params)
        if not lam >= 0:
            raise ValueError(f"lam must be ≥ 0, got {lam}")
        if not noise_lam >= 0:
            raise ValueError(f"noise_lam must be ≥ 0, got {noise_lam}")
        self.noise_lam = float(noise_lam)
        if anchor not in ("knn", "mean"):
            raise ValueError(f"anchor must be 'knn' or 'mean', got {anchor!r}")
        if embedding not in ("last_layer", "logits", "features"):
            raise ValueError(f"embedding must be 'last_layer', 'logits' or 'features', got {embedding!r}")
        self.lam, self.k, self.anchor, self.embedding = float(lam), int(k), anchor, embedding

    def _objective(self, matcher: GradientMatcher, train_set: ImageTensorDataset, indices: np.ndarray,
                   adv: int) -> LossFn:
        labels = train_set.labels.numpy()
        clean = np.setdiff1d(np.flatnonzero(labels == adv), indices)
        if len(clean) < 2:
            raise ValueError(f"class {adv} has {len(clean)} clean examples besides the poisons; the adaptive "
                             "term needs at least 2 (lower the budget)")
        density = DensityTerm(matcher.models[0], train_set.images[torch.from_numpy(clean)], adv, self.embedding,
                              self.k, self.anchor)
        self._density = density

        # The input-noise screen's score: each poison's log noise floor above its base image's
        base_floor = noise_floor_of(train_set.images[torch.from_numpy(indices)].double()).log()
        self._base_floor = base_floor

        def objective(x_aug, x_plain, y, sl):
            loss = matcher.loss(x_aug, y) + self.lam * density(x_plain, y).to(x_aug.device)
            if self.noise_lam:
                loss = loss + self.noise_lam * noise_excess(x_plain, base_floor[sl]).to(x_aug.device)
            return loss

        return objective

    def craft(self, train_set: ImageTensorDataset, **kwargs):
        """As :meth:`GradientMatching.craft`; ``params`` also get the density term of the bases and poisons."""
        poisons = super().craft(train_set, **kwargs)
        y = torch.from_numpy(poisons.labels)
        bases = train_set.images[torch.from_numpy(poisons.indices)]
        with torch.no_grad():
            poisons.params["density_term_bases"] = float(self._density(bases, y))
            poisons.params["density_term_poisons"] = float(self._density(torch.from_numpy(poisons.images), y))
            poisons.params["noise_excess_poisons"] = float(noise_excess(torch.from_numpy(poisons.images),
                                                                        self._base_floor))
        return poisons
