"""Secure dataset release (Fowl et al., 2021, "Preventing Unauthorized Use of Proprietary Data:
Poisoning for Secure Dataset Release"): perturb every released image within ``eps`` so that the
training gradient of the released data points the way that *un*-learns the clean data.

For every batch ``(x, y)`` of the clean data, the target gradient is that of the reverse cross-entropy
``−log(1 − p_y(x))`` on the clean batch (descending it lowers the correct-class probability); the
perturbation ``δ`` minimises ``1 − cos(∇θ CE(f(x + δ), y), ∇θ RCE(f(x), y))`` over all parameters of a
surrogate trained on clean data, by signed Adam with step decays at 3/8, 5/8 and 7/8 of the steps.
Success is a low clean test accuracy of a model trained on the released data.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from sanitizer.attacks._util import as_models, check_positive_int, eval_mode, module_device
from sanitizer.attacks.adversarial_poisons import release_indices
from sanitizer.attacks.base import (
    Attack,
    PoisonSet,
    ThreatModel,
    check_eps,
    project_linf,
    register_attack,
)
from sanitizer.augment import flip_crop
from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.progress import progress


def reverse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of ``−log(1 − p_y)``: small when the model puts little mass on the true class."""
    p_true = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    return -torch.log1p(-p_true.clamp(max=1 - 1e-6)).mean()


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor], create_graph: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return torch.cat([g.reshape(-1) for g in grads])


@register_attack("secure_release")
class SecureRelease(Attack):
    """Indiscriminate gradient-alignment poisoning of a whole dataset, batched.

    ``lr`` is the signed-Adam step in pixel units (default 0.4·eps, decayed ×0.1 three times).
    ``augment=True`` applies a fresh random flip + shift (up to ``shift`` pixels, differentiable) to the
    released batch at every step, so the alignment survives a victim that trains with augmentation.

    Example:
        >>> attack = SecureRelease(eps=8/255, steps=240)
        >>> released = attack.craft(train_set, surrogate=model_trained_on_clean_data)  # doctest: +SKIP
        >>> protected = released.apply(train_set)  # doctest: +SKIP
    """

    threat_model = ThreatModel("indiscriminate", clean_label=True, setting="from-scratch",
                               summary="gradient alignment with a reverse cross-entropy (Fowl et al. 2021)")
    loss_description = "Mean alignment loss (1 − cosine) over batches at every step of the last craft."

    def __init__(self, eps: float = 8 / 255, steps: int = 240, lr: float | None = None, batch_size: int = 128,
                 fraction: float = 1.0, augment: bool = False, shift: int = 4) -> None:
        self.eps = check_eps(eps)
        self.steps = check_positive_int(steps, "steps")
        self.lr = float(lr) if lr is not None else 0.4 * self.eps
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.fraction = float(fraction)
        self.augment, self.shift = bool(augment), int(shift)
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0 pixels, got {shift}")

    def craft(self, train_set: ImageTensorDataset, *, surrogate=None, test_set=None, target_index=None,
              adversarial_class=None, source_class=None, seed: int = 0, **kw) -> PoisonSet:
        nets = as_models(surrogate, self.name)
        device = module_device(nets[0])
        indices = release_indices(train_set, self.fraction, seed)
        # Batches are drawn in a seeded random order, as a victim's loader would mix classes.
        order = indices[np.random.default_rng(seed).permutation(len(indices))]
        out = torch.empty((len(indices), *train_set.images.shape[1:]))
        position = {int(i): k for k, i in enumerate(indices)}
        history = np.zeros(self.steps)
        self._generator = torch.Generator().manual_seed(seed)  # augmentation draws
        t0 = time.perf_counter()
        with eval_mode(nets):
            for start in progress(range(0, len(order), self.batch_size), desc=self.name):
                batch = torch.from_numpy(order[start:start + self.batch_size])
                x = train_set.images[batch].to(device)
                y = train_set.labels[batch].to(device)
                poisoned, losses = self._craft_batch(nets, x, y)
                out[[position[int(i)] for i in batch]] = poisoned.cpu()
                history += np.asarray(losses) * len(batch)
        self._history = list(history / len(indices))
        labels = train_set.labels[torch.from_numpy(indices)].numpy()
        return PoisonSet(self.name, indices, out.numpy(), labels,
                         params={**self.params(), "seed": seed, "seconds": time.perf_counter() - t0,
                                 "loss_initial": self._history[0], "loss_final": self._history[-1]})

    def _craft_batch(self, nets, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        params = [[p for p in n.parameters() if p.requires_grad] for n in nets]
        targets = [_flat_grad(reverse_cross_entropy(n(x), y), ps, False).detach() for n, ps in zip(nets, params)]
        delta = torch.zeros_like(x, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=self.lr)
        milestones = [int(round(m * self.steps)) for m in (0.375, 0.625, 0.875)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)
        losses = []
        for _ in range(self.steps):
            terms = []
            for n, ps, target in zip(nets, params, targets):
                released = x + delta
                if self.augment:
                    released = flip_crop(released, self.shift, self._generator)
                g = _flat_grad(F.cross_entropy(n(released), y), ps, True)
                terms.append(1 - F.cosine_similarity(g, target, dim=0))
            loss = torch.stack(terms).mean()
            (grad,) = torch.autograd.grad(loss, delta)
            delta.grad = grad.sign()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # stay inside the eps ball and keep x + delta in [0, 1]
                delta.copy_(delta.clamp(-self.eps, self.eps))
                delta.copy_((x + delta).clamp(0, 1) - x)
            losses.append(float(loss.detach()))
        return project_linf(x + delta.detach(), x, self.eps), losses
