"""Per-example gradient embeddings of a classifier, computed in batches without autograd.

Kinds:

- ``logits``: softmax(z) − onehot(y), C dims (EPIC's embedding: the gradient w.r.t. the logits).
- ``last_layer`` (default): the exact gradient of the cross-entropy w.r.t. the last linear layer,
  (softmax(z) − onehot(y)) ⊗ [h; 1]; row i is [∂L/∂W_i, ∂L/∂b_i]. Sketched to ``max_dim``
  with a :class:`~sanitizer.sketch.KroneckerSketch` when C·(d+1) is larger.
- ``features``: the penultimate features h (for feature-space baselines such as deep k-NN).
- ``params``: gradients of chosen parameters via ``torch.func`` (vmap over grad), count-sketched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sanitizer.errors import SanitizerError, check_map_dataset
from sanitizer.sketch import CountSketch, KroneckerSketch

KINDS = ("last_layer", "logits", "features", "params")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def find_last_linear(model: nn.Module, example: torch.Tensor) -> nn.Linear:
    """The ``nn.Linear`` whose output is the model's output, found by running one forward pass."""
    calls: list[tuple[nn.Linear, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, _inp, out: calls.append((mod, out)))
             for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            out = _call(model, example)
    finally:
        for h in hooks:
            h.remove()
    out = _logits_of(out)
    for module, produced in reversed(calls):
        if produced is out or (produced.shape == out.shape and torch.equal(produced, out)):
            return module
    raise SanitizerError(
        "could not find a final nn.Linear that produces the model's logits"
        + (" (the model has no nn.Linear at all)" if not calls else
           " (the last nn.Linear's output is transformed before it is returned)")
        + ". Pass last_layer=<the classifier module>, or use kind='params'."
    )


def _logits_of(output) -> torch.Tensor:
    """Accept models that return a tensor, a tuple whose first item is the logits, or an object with .logits."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SanitizerError(f"cannot read logits from a model output of type {type(output).__name__}")


def _call(model: nn.Module, x: Any):
    """Run the model on a batch: a tensor positionally, a dict of tensors as keyword arguments."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Mapping):
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return x.to(device, non_blocking=True)


def _head(x: Any, n: int) -> Any:
    return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in x.items()} if isinstance(x, Mapping) else x[:n]


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """(inputs, labels) from a ``(x, y, ...)`` batch or a dict batch with a "labels"/"label" entry."""
    if isinstance(batch, Mapping):
        key = "labels" if "labels" in batch else "label" if "label" in batch else None
        if key is None:
            raise SanitizerError(f"a dict batch needs a 'labels' (or 'label') entry; got keys {sorted(batch)}")
        return {k: v for k, v in batch.items() if k not in ("labels", "label")}, torch.as_tensor(batch[key])
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise SanitizerError("the dataset must yield (input, label) or (input, label, ...) tuples, "
                             "or dicts with a 'labels' entry")
    return batch[0], torch.as_tensor(batch[1])


def iterate_batches(dataset: Dataset, batch_size: int, indices: Sequence[int] | None = None,
                    num_workers: int = 0, collate_fn: Callable | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    """Yield ``(inputs, labels)`` batches in order; datasets may yield ``(x, y)``, ``(x, y, ...)`` or
    dicts with a ``labels`` entry (Hugging Face style; the other entries become keyword inputs)."""
    images = getattr(dataset, "images", None)
    if images is not None and getattr(dataset, "transform", None) is None and hasattr(dataset, "labels"):
        idx = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            yield images[chunk], dataset.labels[chunk]
        return
    source = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn)
    for batch in loader:
        yield _split_batch(batch)


class _EvalMode:
    """Put every module in eval mode and restore each module's own previous mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for m, mode in self.modes:
            m.training = mode


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    current = model_device(model)
    if device is None:
        return current
    device = torch.device(device)
    if device.type != current.type or (device.index is not None and current.index is not None
                                       and device.index != current.index):
        raise SanitizerError(
            f"the model is on {current} but device={device} was asked; move the model with "
            f"model.to('{device}') or pass device='{current}'"
        )
    return current


@torch.no_grad()
def gradient_embeddings(
    model: nn.Module,
    dataset: Dataset,
    kind: str = "last_layer",
    batch_size: int = 512,
    device: str | torch.device | None = None,
    last_layer: nn.Linear | None = None,
    max_dim: int = 2048,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    params: Sequence[str] | None = None,
    num_classes: int | None = None,
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
) -> torch.Tensor:
    """Per-example gradient embeddings ``[N, D]`` (on the CPU) of ``dataset`` under ``model``.

    Pass an un-augmented view of the training data. ``indices`` restricts the pass to a subset
    (rows follow its order). The model runs in eval mode; its modes are restored afterwards.

    Example:
        >>> emb = gradient_embeddings(model, train_set_without_augmentation)  # doctest: +SKIP
    """
    if kind not in KINDS:
        raise SanitizerError(f"unknown embedding kind {kind!r}; choose one of {KINDS}")
    n = check_map_dataset(dataset)
    if int(batch_size) != batch_size or batch_size < 1:
        raise SanitizerError(f"batch_size must be a positive integer, got {batch_size!r}")
    if int(max_dim) != max_dim or max_dim < 1:
        raise SanitizerError(f"max_dim must be a positive integer, got {max_dim!r}")
    if indices is not None:
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise SanitizerError("indices must be a 1-D sequence of integer dataset positions")
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            bad = int(indices[(indices < 0) | (indices >= n)][0])
            raise SanitizerError(f"index {bad} is outside the dataset of {n} examples (negative indices are not "
                                 "allowed: pass positions in [0, len(dataset)))")
    dev = _resolve_device(model, device)
    if kind == "params":
        if collate_fn is not None:
            raise SanitizerError("kind='params' supports tensor inputs only (no collate_fn)")
        return _param_embeddings(model, dataset, batch_size, dev, max_dim, seed, indices, params, num_classes,
                                 dtype, num_workers)
    rows = n if indices is None else len(indices)
    out: torch.Tensor | None = None
    sketch: KroneckerSketch | None = None
    captured: dict[str, torch.Tensor] = {}
    hook = None
    with _EvalMode(model):
        done = 0
        for x, y in iterate_batches(dataset, batch_size, indices, num_workers, collate_fn):
            x = _to_device(x, dev)
            y = y.to(dev).long()
            if last_layer is None and kind != "logits":
                last_layer = find_last_linear(model, _head(x, 2))
            if hook is None and kind != "logits":
                hook = last_layer.register_forward_hook(lambda _m, inp, _o: captured.__setitem__("h", inp[0]))
            try:
                z = _logits_of(_call(model, x))
            except Exception:
                if hook is not None:
                    hook.remove()
                raise
            emb = _embed_batch(z, y, captured.get("h"), kind, num_classes, dtype)
            if kind == "last_layer":
                h1 = torch.cat([emb[1], torch.ones(len(y), 1, device=dev, dtype=emb[1].dtype)], 1)
                if z.shape[1] * h1.shape[1] <= max_dim:
                    emb = (emb[0][:, :, None] * h1[:, None, :]).reshape(len(y), -1)
                else:
                    if sketch is None:
                        sketch = KroneckerSketch(z.shape[1], h1.shape[1], max_dim, seed, dev, emb[0].dtype)
                    emb = sketch(emb[0], h1)
            if out is None:
                out = torch.empty(rows, emb.shape[1], dtype=dtype)
            out[done:done + len(emb)] = emb.to("cpu", dtype)
            done += len(emb)
        if hook is not None:
            hook.remove()
    if out is None:
        raise SanitizerError("the dataset is empty: nothing to embed")
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out).all(1)).nonzero()[0])
        raise SanitizerError(f"non-finite gradient embedding at row {bad}: the model produced NaN/inf logits; "
                             "check the learning rate and the inputs")
    return out


def _embed_batch(z: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, kind: str,
                 num_classes: int | None, dtype: torch.dtype):
    """Validate a batch and return its embedding (for ``last_layer``: the pair (e, h))."""
    c = z.shape[1]
    if num_classes is not None and num_classes != c:
        raise SanitizerError(f"the model outputs {c} logits but num_classes={num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        bad = int(y.max()) if int(y.max()) >= c else int(y.min())
        raise SanitizerError(f"label {bad} is out of range for a model with {c} outputs; check the labels")
    if not torch.isfinite(z).all():
        raise SanitizerError("the model produced NaN/inf logits; the training run has diverged "
                             "(lower the learning rate or check the inputs)")
    if kind == "features":
        return h
    work = torch.float64 if torch.float64 in (z.dtype, dtype) else torch.float32
    e = torch.softmax(z.to(work), 1) - F.one_hot(y, c).to(work)
    return e if kind == "logits" else (e, h.to(work))


def _param_embeddings(model, dataset, batch_size, dev, max_dim, seed, indices, params, num_classes, dtype,
                      num_workers) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    named = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    chosen = list(params) if params is not None else list(named)
    missing = [p for p in chosen if p not in named]
    if missing:
        raise SanitizerError(f"unknown parameter names {missing[:3]}; see model.named_parameters()")
    trained = {k: named[k] for k in chosen}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in trained}
    buffers = dict(model.named_buffers())
    total = sum(v.numel() for v in trained.values())
    sketch = CountSketch(total, max_dim, seed, dev) if total > max_dim else None
    # Keep per-example gradients of a batch under ~2^26 floats.
    step = max(1, min(batch_size, (1 << 26) // max(total, 1)))

    def loss_of(p, x, y):
        z = _logits_of(functional_call(model, ({**frozen, **p}, buffers), (x[None],)))
        return F.cross_entropy(z, y[None])

    per_example = vmap(grad(loss_of), in_dims=(None, 0, 0))
    chunks = []
    with _EvalMode(model), torch.enable_grad():
        for x, y in iterate_batches(dataset, step, indices, num_workers):
            if isinstance(x, Mapping):
                raise SanitizerError("kind='params' supports tensor inputs only; use 'last_layer' for dict inputs")
            x, y = x.to(dev), y.to(dev).long()
            if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
                raise SanitizerError(f"label {int(y.max())} is out of range for {num_classes} classes")
            g = per_example(trained, x, y)
            flat = torch.cat([g[k].reshape(len(y), -1) for k in chosen], 1).to(dtype)
            chunks.append((sketch(flat) if sketch is not None else flat).detach().cpu())
    out = torch.cat(chunks)
    if not torch.isfinite(out).all():
        raise SanitizerError("non-finite per-example gradients: the loss is NaN/inf for some examples")
    return out
