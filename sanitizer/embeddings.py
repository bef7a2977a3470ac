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

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sanitizer.errors import SanitizerError, check_labels, check_map_dataset, check_positive_int
from sanitizer.neighbors import flush_tiny
from sanitizer.sketch import CountSketch, KroneckerSketch

EMBEDDINGS = ("last_layer", "logits", "features", "params")  # the embedding names every API takes


def check_embedding_name(embedding: Any) -> str:
    """``embedding`` if it names an embedding (:data:`EMBEDDINGS`), else a :class:`SanitizerError`."""
    if embedding not in EMBEDDINGS:
        raise SanitizerError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
    return embedding


def model_device(model) -> torch.device:
    """The device of the model's first parameter (the CPU for a parameterless model or a plain callable)."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def find_last_linear(model: nn.Module, example: torch.Tensor, num_classes: int | None = None) -> nn.Linear:
    """The ``nn.Linear`` whose output is the model's output, found by running one forward pass.

    ``num_classes`` picks the logits out of a model that returns a tuple (see :func:`logits_of`).
    """
    calls: list[tuple[nn.Linear, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, _inp, out: calls.append((mod, out)))
             for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            out = _call(model, example)
    finally:
        for h in hooks:
            h.remove()
    out = logits_of(out, num_classes)
    for module, produced in reversed(calls):
        if produced is out or (produced.shape == out.shape and torch.equal(produced, out)):
            return module
    raise SanitizerError(
        "could not find a final nn.Linear that produces the model's logits"
        + (" (the model has no nn.Linear at all)" if not calls else
           " (the last nn.Linear's output is transformed before it is returned)")
        + ". Pass last_layer=<the classifier module>, or use embedding='params'."
    )


def logits_of(output, num_classes: int | None = None, produced: torch.Tensor | None = None) -> torch.Tensor:
    """The logits ``[B, C]`` in a model's output: the tensor itself, its ``.logits`` (or ``["logits"]``),
    or the one element of a tuple/list that can be the logits.

    A tuple such as ``(features, logits)`` is resolved by identity or shape, never by position: the
    element that is ``produced`` (the output of a known last layer), else the element of shape
    ``[B, num_classes]``, else (no ``num_classes``) the only 2-D floating tensor. When none or several
    fit, the error lists the shapes and the fixes.
    """
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if not isinstance(output, (tuple, list)):
        raise SanitizerError(f"cannot read logits from a model output of type {type(output).__name__}; "
                             "return a tensor, a tuple holding one, or an object with .logits")
    tensors = [(i, t) for i, t in enumerate(output) if isinstance(t, torch.Tensor)]
    if produced is not None:
        same = [t for _, t in tensors if t is produced]
        if same:
            return same[0]
    fits = [t for _, t in tensors if t.ndim == 2 and t.is_floating_point()
            and (num_classes is None or t.shape[1] == num_classes)]
    if len(fits) == 1:
        return fits[0]
    shapes = ", ".join(f"[{i}]: {tuple(t.shape)}" for i, t in tensors) or "no tensors"
    wanted = f"[batch, {num_classes}]" if num_classes is not None else "2-D floating"
    found = (f"none of its elements is a {wanted} tensor" if not fits
             else f"{len(fits)} of its elements are {wanted} tensors")
    raise SanitizerError(
        f"cannot tell which element of the model's output holds the logits: it returns a "
        f"{type(output).__name__} ({shapes}) and {found}. Wrap the model so it returns the logits alone "
        "(e.g. an nn.Module whose forward returns model(x)[1]), or pass last_layer=<the classifier nn.Linear> "
        "(its output is taken)"
        + (", or num_classes= (the element with that many columns is taken)" if num_classes is None else "")
        + "."
    )


_logits_of = logits_of  # the name other modules import


def _call(model: nn.Module, x: Any):
    """Run the model on a batch: a tensor positionally, a dict of tensors as keyword arguments.

    A type error of the model on a tensor batch whose dtype is not the model's (uint8 images, float64
    inputs to a float32 model) becomes a SanitizerError that says which to convert.
    """
    if isinstance(x, Mapping):
        return model(**x)
    try:
        return model(x)
    except RuntimeError as exc:
        params = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
        if (params is None or not isinstance(x, torch.Tensor) or x.dtype == params.dtype
                or "type" not in str(exc).lower()):
            raise
        fix = "scale them to floats (e.g. images.float() / 255)" if not x.is_floating_point() else \
            f"convert them (x.to({params.dtype})) or the model (model.to({x.dtype}))"
        raise SanitizerError(f"the model's parameters are {params.dtype} but the dataset yields {x.dtype} inputs; "
                             f"{fix} ({' '.join(str(exc).split())})") from exc


class ImageLayout:
    """Runs a CPU image batch in channels-last memory layout: oneDNN's convolutions are ~1.7x faster on it
    (a CIFAR-10 CompactCNN's eval pass, one thread: 4.5 s against 7.6 s per 3,000 images), the weights are left
    as they are and the outputs agree to ~1e-6. A forward that reshapes with ``.view()`` cannot take that
    layout; the first such failure falls back to the ordinary layout for the rest of the pass (in train mode that
    first, failed attempt may already have moved BatchNorm running statistics once)."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.on = enabled and device.type == "cpu"

    def __call__(self, model: nn.Module, x: Any):
        if not (self.on and isinstance(x, torch.Tensor) and x.ndim == 4 and x.is_floating_point()):
            return _call(model, x)
        try:
            return _call(model, x.contiguous(memory_format=torch.channels_last))
        except RuntimeError:
            self.on = False
            return _call(model, x)


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
        return {k: v for k, v in batch.items() if k not in ("labels", "label")}, _label_tensor(batch[key])
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise SanitizerError("the dataset must yield (input, label) or (input, label, ...) tuples, "
                             "or dicts with a 'labels' entry")
    return batch[0], _label_tensor(batch[1])


def _label_tensor(labels: Any) -> torch.Tensor:
    try:
        return torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as exc:
        shown = repr(labels[:3] if isinstance(labels, (list, tuple)) else labels)[:80]
        raise SanitizerError(f"labels must be integer class indices, got {shown}; map class names to indices "
                             "in the dataset") from exc


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


class EvalMode:
    """Eval mode for a model, or for every ``nn.Module`` in a list of models (other callables are ignored),
    with dropout left on when ``dropout=True``; each module's own previous mode is restored afterwards."""

    def __init__(self, models: nn.Module | Sequence, dropout: bool = False) -> None:
        models = models if isinstance(models, (list, tuple)) else [models]
        self.models = [m for m in models if isinstance(m, nn.Module)]
        self.dropout = dropout

    def __enter__(self) -> EvalMode:
        self.modes = [(mod, mod.training) for m in self.models for mod in m.modules()]
        for m in self.models:
            m.eval()
            if self.dropout:
                for mod in m.modules():
                    if isinstance(mod, nn.modules.dropout._DropoutNd):
                        mod.train()
        return self

    def __exit__(self, *exc) -> None:
        for mod, mode in self.modes:
            mod.training = mode


_EvalMode = EvalMode  # the name other modules import


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    current = model_device(model)
    if device is None:
        return current
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SanitizerError(f"device={device!r} is not a torch device; pass e.g. 'cpu' or 'cuda'") from exc
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
    embedding: str = "last_layer",
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
    kind: str | None = None,
) -> torch.Tensor:
    """Per-example gradient embeddings ``[N, D]`` (on the CPU) of ``dataset`` under ``model``.

    Pass an un-augmented view of the training data. ``indices`` restricts the pass to a subset
    (rows follow its order). The model runs in eval mode; its modes are restored afterwards.

    Example:
        >>> emb = gradient_embeddings(model, train_set_without_augmentation)  # doctest: +SKIP
    """
    if kind is not None:  # the old name of ``embedding``
        warnings.warn("gradient_embeddings(kind=...) is now embedding=...", DeprecationWarning, stacklevel=2)
        embedding = kind
    embedding = check_embedding_name(embedding)
    n = check_map_dataset(dataset)
    batch_size, max_dim = check_positive_int(batch_size, "batch_size"), check_positive_int(max_dim, "max_dim")
    seed = check_positive_int(seed, "seed", minimum=-(2**63))
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SanitizerError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}")
    if last_layer is not None and not isinstance(last_layer, nn.Module):
        raise SanitizerError(f"last_layer must be the model's classifier module (the nn.Linear that outputs the "
                             f"logits, e.g. last_layer=model.fc), got {type(last_layer).__name__}")
    if indices is not None:
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise SanitizerError("indices must be a 1-D sequence of integer dataset positions")
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            bad = int(indices[(indices < 0) | (indices >= n)][0])
            raise SanitizerError(f"index {bad} is outside the dataset of {n} examples (negative indices are not "
                                 "allowed: pass positions in [0, len(dataset)))")
    dev = _resolve_device(model, device)
    if embedding == "params":
        if collate_fn is not None:
            raise SanitizerError("embedding='params' supports tensor inputs only (no collate_fn)")
        return _param_embeddings(model, dataset, batch_size, dev, max_dim, seed, indices, params, num_classes,
                                 dtype, num_workers)
    rows = n if indices is None else len(indices)
    out: torch.Tensor | None = None
    sketch: KroneckerSketch | None = None
    captured: dict[str, torch.Tensor] = {}
    hook = None
    hint = num_classes if num_classes is not None else getattr(last_layer, "out_features", None)
    run = ImageLayout(dev)
    with _EvalMode(model):
        done = 0
        try:
            for x, y in iterate_batches(dataset, batch_size, indices, num_workers, collate_fn):
                x = _to_device(x, dev)
                y = _batch_labels(y, dev, num_classes)
                if last_layer is None and embedding != "logits":
                    last_layer = find_last_linear(model, _head(x, 2), hint)
                    hint = num_classes if num_classes is not None else last_layer.out_features
                if hook is None and last_layer is not None:
                    hook = last_layer.register_forward_hook(
                        lambda _m, inp, out: captured.update(h=inp[0], z=out))
                captured.clear()
                output = run(model, x)  # fills captured through the hook (a retried batch overwrites it)
                if hook is not None and "z" not in captured:
                    raise SanitizerError(
                        f"last_layer={type(last_layer).__name__}(...) was not called in the model's forward pass, so "
                        "its input and output cannot be read; pass the module that produces the logits (e.g. "
                        "last_layer=model.fc), or leave last_layer unset to find it")
                z = logits_of(output, hint, captured.get("z"))
                _check_last_layer_output(captured.get("z"), z)
                emb, sketch = embed_outputs(z, y, captured.get("h"), embedding, num_classes, max_dim, seed,
                                             dtype, sketch)
                if out is None:
                    out = torch.empty(rows, emb.shape[1], dtype=dtype)
                out[done:done + len(emb)] = emb.to("cpu", dtype)
                done += len(emb)
        finally:
            if hook is not None:
                hook.remove()
    if out is None:
        raise SanitizerError("the dataset is empty: nothing to embed")
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out).all(1)).nonzero()[0])
        raise SanitizerError(f"non-finite gradient embedding at row {bad}: the model produced NaN/inf logits; "
                             "check the learning rate and the inputs")
    return out


def _check_last_layer_output(produced: Any, z: torch.Tensor) -> None:
    """The last layer's output must have one column per logit: a hidden layer passed as ``last_layer=``
    would give the gradient of no parameter at all."""
    if (isinstance(produced, torch.Tensor) and produced.ndim >= 1 and z.ndim == 2
            and produced.shape[-1] != z.shape[1]):
        raise SanitizerError(
            f"last_layer= outputs {produced.shape[-1]} values per example but the model returns {z.shape[1]} logits: "
            "it is not the classifier layer. Pass the module whose output is the logits (e.g. last_layer=model.fc)")


def _batch_labels(y: torch.Tensor, device: torch.device, num_classes: int | None) -> torch.Tensor:
    """A batch's labels as int64 on ``device``; 1.7 or NaN is refused, not truncated by ``.long()``."""
    if y.ndim != 1:
        raise SanitizerError(f"labels must be one class index per example, but a batch of labels has shape "
                             f"{tuple(y.shape)}; flatten them in the dataset (e.g. labels.view(-1))")
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return y.to(device).long()
    return torch.from_numpy(check_labels(y, num_classes)).to(device)


def _embed_batch(z: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, embedding: str,
                 num_classes: int | None, dtype: torch.dtype):
    """Validate a batch and return its embedding (for ``last_layer``: the pair (e, h))."""
    if z.ndim != 2 or z.shape[0] != len(y):
        raise SanitizerError(
            f"the model's logits must have shape [batch, classes], got {tuple(z.shape)} for a batch of {len(y)} "
            "examples; return one row of class scores per example (a binary classifier needs 2 logits, not 1)")
    c = z.shape[1]
    if num_classes is not None and num_classes != c:
        raise SanitizerError(f"the model outputs {c} logits but num_classes={num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        bad = int(y.max()) if int(y.max()) >= c else int(y.min())
        raise SanitizerError(f"label {bad} is out of range for a model with {c} outputs; check the labels")
    if not torch.isfinite(z).all():
        raise SanitizerError("the model produced NaN/inf logits; the training run has diverged "
                             "(lower the learning rate or check the inputs)")
    if embedding == "features":
        return h
    work = torch.float64 if torch.float64 in (z.dtype, dtype) else torch.float32
    e = torch.softmax(z.to(work), 1) - F.one_hot(y, c).to(work)
    # a confident prediction's other-class probabilities reach 1e-20 and below; their products in any later
    # matmul (kNN, SVD) are subnormal floats, 50-90x slower on x86 CPUs, and no distance can see them
    e = flush_tiny(e)
    return e if embedding == "logits" else (e, h.to(work))


def last_linear_of(model: nn.Module, dataset: Dataset, num_classes: int | None = None,
                   collate_fn: Callable | None = None) -> nn.Linear:
    """The last linear layer of ``model`` (:func:`find_last_linear`), found on the first examples of ``dataset``."""
    x, _ = next(iterate_batches(dataset, 2, np.arange(min(2, len(dataset))), collate_fn=collate_fn))
    dev = model_device(model)
    with _EvalMode(model), torch.no_grad():
        return find_last_linear(model, _to_device(x, dev), num_classes)


def embed_outputs(z: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, embedding: str, num_classes: int | None,
                  max_dim: int, seed: int, dtype: torch.dtype = torch.float32,
                  sketch: KroneckerSketch | None = None) -> tuple[torch.Tensor, KroneckerSketch | None]:
    """The ``embedding`` embedding of a batch from the last linear layer's output ``z`` and input ``h``
    (what a forward pass, or a harvested training step, produced), and the sketch used (pass it back
    in for the next batch so that every row is projected the same way)."""
    emb = _embed_batch(z, y, h, embedding, num_classes, dtype)
    if embedding != "last_layer":
        return emb, sketch
    e, h = emb
    h1 = torch.cat([h, torch.ones(len(y), 1, device=h.device, dtype=h.dtype)], 1)
    if z.shape[1] * h1.shape[1] <= max_dim:
        return (e[:, :, None] * h1[:, None, :]).reshape(len(y), -1), sketch
    if sketch is None:
        sketch = KroneckerSketch(z.shape[1], h1.shape[1], max_dim, seed, h.device, e.dtype)
    return sketch(e, h1), sketch


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
        z = logits_of(functional_call(model, ({**frozen, **p}, buffers), (x[None],)), num_classes)
        return F.cross_entropy(z, y[None])

    per_example = vmap(grad(loss_of), in_dims=(None, 0, 0))
    chunks = []
    with _EvalMode(model), torch.enable_grad():
        for x, y in iterate_batches(dataset, step, indices, num_workers):
            if isinstance(x, Mapping):
                raise SanitizerError("embedding='params' supports tensor inputs only; use 'last_layer' for dict inputs")
            x, y = x.to(dev), _batch_labels(y, dev, num_classes)
            if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
                raise SanitizerError(f"label {int(y.max())} is out of range for {num_classes} classes")
            g = per_example(trained, x, y)
            flat = torch.cat([g[k].reshape(len(y), -1) for k in chosen], 1).to(dtype)
            chunks.append((sketch(flat) if sketch is not None else flat).detach().cpu())
    out = torch.cat(chunks)
    if not torch.isfinite(out).all():
        raise SanitizerError("non-finite per-example gradients: the loss is NaN/inf for some examples")
    return out
