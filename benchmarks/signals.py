"""Record, at every epoch of a poisoned run, what any detection signal could be computed from.

The detection study (``benchmarks.detection_study``) scores every policy, embedding and round
offline from these arrays instead of re-training: the last-layer gradient embedding
(softmax − onehot) ⊗ [h; 1], EPIC's softmax − onehot and the penultimate features h are all exact
functions of the eval-mode logits and features saved here, so an offline score equals the score
an audit-mode sanitizer would compute at the same epoch.

Per epoch ``e`` (saved after epoch ``e`` ends, i.e. what a round at the start of epoch ``e + 1`` sees):

- ``logits`` [N, C] and ``features`` [N, d]: eval mode, un-augmented images, every training example;
- ``train_logits`` [N, C]: the logits the training step itself produced (train mode, augmented),
  harvested by dataset index (what harvest mode would see);
- ``train_features`` [N, d]: the last linear layer's input in those same steps (from epoch 1 on: the
  hook is placed at the first epoch's end), i.e. the harvested penultimate features;
- ``views/<name>_logits`` and ``views/<name>_features`` for the ``focus`` indices (the poisoned class
  and the target's class): the same model on purified copies of those images (JPEG, noise);
- ``target_logits`` [1, C]: the target image.

Arrays are float16 to keep a 10-epoch CIFAR-10 run near 100 MB; files are ``.npz`` without pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sanitizer.embeddings import find_last_linear, model_device
from sanitizer.purify import jpeg_compress, uniform_noise


class SignalRecorder:
    """Collects harvested training logits and, at each epoch end, eval-mode logits and features.

    Example::

        recorder = SignalRecorder(out_dir, train_set, is_poison, focus, target_image, meta)
        continue_training(..., on_batch=recorder.on_batch, on_epoch_end=recorder.on_epoch_end)
    """

    def __init__(self, out_dir: Path, images: torch.Tensor, labels: torch.Tensor, focus: np.ndarray,
                 target_input: torch.Tensor, meta: dict, jpeg_quality: int = 50, noise: float = 8 / 255,
                 batch_size: int = 500) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.images, self.labels = images, labels
        self.focus = np.asarray(focus, dtype=np.int64)
        self.target_input = target_input
        self.batch_size = batch_size
        focus_images = images[torch.from_numpy(self.focus)]
        # purified copies are fixed once (as a defense that purifies its data would)
        self.views = {"jpeg": jpeg_compress(focus_images, jpeg_quality),
                      "noise": uniform_noise(focus_images, noise, seed=0)}
        self.train_logits: np.ndarray | None = None
        self.train_features: np.ndarray | None = None
        self._step_features: torch.Tensor | None = None  # the last training step's last-layer input
        self._capturing = True  # off while the recorder runs its own eval passes
        self._hooked: set[int] = set()
        (self.out_dir / "meta.json").write_text(json.dumps({**meta, "jpeg_quality": jpeg_quality, "noise": noise,
                                                            "focus_size": len(self.focus)}, default=str))
        np.save(self.out_dir / "focus.npy", self.focus)

    def done_epochs(self) -> list[int]:
        return sorted(int(p.stem[5:]) for p in self.out_dir.glob("epoch*.npz"))

    def on_batch(self, epoch: int, indices: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self.train_logits is None:
            self.train_logits = np.full((len(self.labels), logits.shape[1]), np.nan, dtype=np.float16)
        self.train_logits[indices.numpy()] = logits.float().cpu().numpy().astype(np.float16)
        h, self._step_features = self._step_features, None
        if h is not None and len(h) == len(indices):
            if self.train_features is None:
                self.train_features = np.full((len(self.labels), h.shape[1]), np.nan, dtype=np.float16)
            self.train_features[indices.numpy()] = h.numpy().astype(np.float16)

    def _hook_training_steps(self, model: nn.Module) -> None:
        """Capture the last linear layer's input in the training steps from now on (once per layer)."""
        layer = find_last_linear(model, self.images[:2].to(model_device(model)))
        if id(layer) in self._hooked:
            return
        self._hooked.add(id(layer))

        def capture(_module, inp, _out):
            if self._capturing:
                self._step_features = inp[0].detach().flatten(1).float().cpu()
        layer.register_forward_hook(capture)

    @torch.no_grad()
    def _forward(self, model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        device = model_device(model)
        layer = find_last_linear(model, images[:2].to(device))
        captured: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach().cpu()))
        logits = []
        try:
            for start in range(0, len(images), self.batch_size):
                logits.append(model(images[start:start + self.batch_size].to(device)).float().cpu())
        finally:
            handle.remove()
        return (torch.cat(logits).numpy().astype(np.float16),
                torch.cat(captured).flatten(1).float().numpy().astype(np.float16))

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        was_training = model.training
        model.eval()
        self._capturing = False
        try:
            logits, features = self._forward(model, self.images)
            arrays = {"logits": logits, "features": features,
                      "target_logits": self._forward(model, self.target_input)[0]}
            if self.train_logits is not None:
                arrays["train_logits"] = self.train_logits
            if self.train_features is not None:
                arrays["train_features"] = self.train_features
            for name, view in self.views.items():
                arrays[f"{name}_logits"], arrays[f"{name}_features"] = self._forward(model, view)
        finally:
            model.train(was_training)
            self._capturing = True
        self._hook_training_steps(model)
        partial = self.out_dir / f"epoch{epoch}.partial.npz"
        np.savez(partial, **arrays)
        partial.replace(self.out_dir / f"epoch{epoch}.npz")
        self.train_logits = self.train_features = None


def load_epoch(run_dir: Path, epoch: int) -> dict[str, np.ndarray]:
    """The arrays of one recorded epoch as float32 (no pickle)."""
    with np.load(Path(run_dir) / f"epoch{epoch}.npz", allow_pickle=False) as f:
        return {k: f[k].astype(np.float32) for k in f.files}
