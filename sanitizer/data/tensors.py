"""An in-memory image dataset with optional augmentation, the common currency of this package, and the
checks and loaders that turn arrays and image files into one (``.npz`` arrays, an image folder)."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sanitizer.errors import SanitizerError

# How far outside [0, 1] a pixel may stray (float rounding) before it is refused; such pixels are clipped.
PIXEL_TOLERANCE = 1e-4


class ImageTensorDataset(Dataset):
    """Images in [0, 1] as a float tensor ``[N, C, H, W]`` plus integer labels.

    Yields ``(image, label, index)`` so that training code and the sanitizer can always tell which
    original example a batch element is.

    Example:
        >>> ds = ImageTensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10) % 2)
        >>> x, y, i = ds[3]
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.float()
        raw = torch.as_tensor(labels)
        if raw.is_floating_point() and not torch.equal(raw, raw.round()):
            raise SanitizerError("labels must be whole class indices; got non-integer values such as "
                                 f"{raw[raw != raw.round()][0].item()} (round or map them to 0..C-1 first)")
        self.labels = raw.long()
        self.transform = transform
        self.num_classes = int(num_classes if num_classes is not None else int(self.labels.max()) + 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index]), index

    def without_transform(self) -> ImageTensorDataset:
        """The same examples with no augmentation (what the sanitizer should embed)."""
        return ImageTensorDataset(self.images, self.labels, None, self.num_classes)

    def with_transform(self, transform: Callable | None) -> ImageTensorDataset:
        return ImageTensorDataset(self.images, self.labels, transform, self.num_classes)


def subset_by_class(
    dataset: ImageTensorDataset, per_class: int, seed: int = 0, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Indices of a class-balanced random subset with ``per_class`` examples of every class."""
    rng = np.random.default_rng(seed)
    labels = dataset.labels.numpy()
    excluded = np.zeros(len(labels), dtype=bool)
    if exclude is not None:
        excluded[exclude] = True
    chosen = []
    for c in range(dataset.num_classes):
        pool = np.flatnonzero((labels == c) & ~excluded)
        if len(pool) < per_class:
            raise ValueError(f"class {c} has only {len(pool)} examples, {per_class} requested")
        chosen.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def integer_array(values, what: str) -> np.ndarray:
    """``values`` as a flat int64 array of non-negative integers; floats (even 3.0), bools and negatives are
    refused, since a float index or label is nearly always a bug upstream (an empty array passes)."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    arr = arr.reshape(-1)
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise SanitizerError(f"{what} must be integers, got dtype {arr.dtype} (first value {arr[0]!r}); "
                             "cast them with .astype(int) only if they really are whole numbers")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        bad = int(np.flatnonzero(arr < 0)[0])
        raise SanitizerError(f"{what} must be >= 0, got {int(arr[bad])} at position {bad}")
    return arr


def check_label_array(values, what: str, n: int | None = None, num_classes: int | None = None) -> np.ndarray:
    """Class labels as int64: integers in ``[0, num_classes)`` (when known), ``n`` of them (when given)."""
    labels = integer_array(values, what)
    if n is not None and len(labels) != n:
        raise SanitizerError(f"{what}: {len(labels)} labels for {n} images; give one label per image")
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        bad = int(np.flatnonzero(labels >= num_classes)[0])
        raise SanitizerError(f"{what}: label {int(labels[bad])} at position {bad} is out of range for "
                             f"{num_classes} classes (labels are 0..{num_classes - 1})")
    return labels


def check_pixels(images, what: str = "images", ndim: int | None = 4) -> np.ndarray:
    """``images`` as float32 numpy, checked to be finite and in [0, 1] (within :data:`PIXEL_TOLERANCE`,
    then clipped); ``ndim`` is the number of axes required (4: ``[N, C, H, W]``)."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise SanitizerError(f"{what} must be real numbers in [0, 1], got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if ndim is not None and arr.size and arr.ndim != ndim:
        layout = {4: "[N, C, H, W]", 3: "[C, H, W]"}.get(ndim, f"{ndim} axes")
        raise SanitizerError(f"{what} must have shape {layout}, got {arr.shape}")
    if arr.size == 0:
        return arr
    finite = np.isfinite(arr)
    if not finite.all():
        first = np.unravel_index(int(np.flatnonzero(~finite.reshape(-1))[0]), arr.shape)
        raise SanitizerError(f"{what} contain NaN or inf (first at {tuple(int(i) for i in first)}); "
                             "pixels must be finite values in [0, 1]")
    low, high = float(arr.min()), float(arr.max())
    if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
        hint = "; divide 8-bit pixels by 255" if high > 1.5 else " (undo any normalisation first)"
        raise SanitizerError(f"{what} must lie in [0, 1], got values from {low:g} to {high:g}{hint}")
    if low < 0 or high > 1:
        arr = np.clip(arr, 0, 1)
    return arr


def images_from_array(array: np.ndarray, what: str = "images") -> torch.Tensor:
    """Image arrays as a float tensor ``[N, C, H, W]`` in [0, 1]: floats ``[N, C, H, W]`` in [0, 1], or
    8-bit ``uint8`` ``[N, H, W, C]`` (how image libraries store them) with 1, 3 or 4 channels."""
    arr = np.asarray(array)
    if arr.dtype == np.uint8:
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
            raise SanitizerError(f"{what}: uint8 images must have shape [N, H, W, C] with 1, 3 or 4 channels, "
                                 f"got {arr.shape}")
        arr = arr.transpose(0, 3, 1, 2).astype(np.float32) / 255
    elif not np.issubdtype(arr.dtype, np.floating):
        raise SanitizerError(f"{what} must be floats in [0, 1] shaped [N, C, H, W] or uint8 shaped [N, H, W, C], "
                             f"got dtype {arr.dtype}")
    elif arr.ndim == 4 and arr.shape[1] > 4 and arr.shape[-1] in (1, 3, 4):
        raise SanitizerError(f"{what} of shape {arr.shape} look channels-last; float images must be "
                             "[N, C, H, W] (use images.transpose(0, 3, 1, 2))")
    if arr.ndim == 4 and len(arr) == 0:
        raise SanitizerError(f"{what} hold no images")
    return torch.from_numpy(np.ascontiguousarray(check_pixels(arr, what)))


def read_npz(path: str | Path, what: str = "arrays") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read with ``allow_pickle=False``; clear errors for a missing or
    unreadable file."""
    path = Path(path)
    if not path.exists():
        raise SanitizerError(f"{path}: no such file")
    if not path.is_file():
        raise SanitizerError(f"{path} is not a file (expected an .npz of {what})")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise SanitizerError(f"{path}: cannot read it as an .npz of {what} ({exc})") from None


def load_npz(path: str | Path) -> tuple[ImageTensorDataset, ImageTensorDataset | None]:
    """A training set (and a test set, or None) from an ``.npz`` file.

    Arrays: ``images`` (floats in [0, 1] ``[N, C, H, W]`` or uint8 ``[N, H, W, C]``) and ``labels``
    (integers); optionally ``test_images`` / ``test_labels`` and ``num_classes`` (else the largest
    training label + 1). Everything is checked: shapes, dtypes, NaN pixels, labels in range.

    Example:
        >>> np.savez(path, images=x, labels=y)  # doctest: +SKIP
        >>> train, test = load_npz(path)  # doctest: +SKIP
    """
    arrays = read_npz(path, "images and labels")
    missing = [k for k in ("images", "labels") if k not in arrays]
    if missing:
        raise SanitizerError(f"{path} lacks the array(s) {', '.join(missing)}; it holds "
                             f"{', '.join(sorted(arrays)) or 'nothing'} (expected images and labels)")
    if ("test_images" in arrays) != ("test_labels" in arrays):
        raise SanitizerError(f"{path}: give test_images and test_labels together, or neither")
    num_classes = None
    if "num_classes" in arrays:
        values = integer_array(arrays["num_classes"], f"{path}: num_classes")
        if values.size != 1 or values[0] < 1:
            raise SanitizerError(f"{path}: num_classes must be one integer >= 1, got {arrays['num_classes']!r}")
        num_classes = int(values[0])
    images = images_from_array(arrays["images"], f"{path}: images")
    labels = check_label_array(arrays["labels"], f"{path}: labels", len(images), num_classes)
    num_classes = num_classes or int(labels.max()) + 1
    train = ImageTensorDataset(images, torch.from_numpy(labels), None, num_classes)
    if "test_images" not in arrays:
        return train, None
    test_images = images_from_array(arrays["test_images"], f"{path}: test_images")
    if test_images.shape[1:] != images.shape[1:]:
        raise SanitizerError(f"{path}: test_images are {tuple(test_images.shape[1:])}, images "
                             f"{tuple(images.shape[1:])}; both need one shape")
    test_labels = check_label_array(arrays["test_labels"], f"{path}: test_labels", len(test_images), num_classes)
    return train, ImageTensorDataset(test_images, torch.from_numpy(test_labels), None, num_classes)


def load_image_folder(root: str | Path, classes: list[str] | None = None) -> tuple[ImageTensorDataset, list[str]]:
    """Images in the ``torchvision.datasets.ImageFolder`` layout (``root/<class>/<image>``), read with
    ``ToTensor`` into an :class:`ImageTensorDataset`, and the class names (sorted folder names).

    All images need one size. ``classes``: the class names of a training folder, for a test folder whose
    labels must follow the same numbering (it may lack some classes, not add new ones).
    """
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    root = Path(root)
    if not root.is_dir():
        raise SanitizerError(f"{root}: no such folder")
    try:
        folder = ImageFolder(str(root), transform=ToTensor())
    except (OSError, RuntimeError) as exc:
        raise SanitizerError(f"{root} is not an image folder ({exc}); expected {root}/<class>/<image files>") from None
    images = []
    for i, (file, _) in enumerate(folder.samples):
        try:
            image = folder[i][0]
        except (OSError, ValueError) as exc:
            raise SanitizerError(f"{file}: cannot read the image ({exc})") from None
        if images and image.shape != images[0].shape:
            raise SanitizerError(f"{file} is {tuple(image.shape)} (C, H, W) but {folder.samples[0][0]} is "
                                 f"{tuple(images[0].shape)}; resize the images to one size first")
        images.append(image)
    targets = np.asarray(folder.targets, dtype=np.int64)
    if classes is not None:
        unknown = sorted(set(folder.classes) - set(classes))
        if unknown:
            raise SanitizerError(f"{root} has class folder(s) {', '.join(unknown)} that the training data lacks "
                                 f"(its classes: {', '.join(classes)})")
        targets = np.array([classes.index(name) for name in folder.classes], dtype=np.int64)[targets]
    names = list(classes if classes is not None else folder.classes)
    return ImageTensorDataset(torch.stack(images), torch.from_numpy(targets), None, len(names)), names


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): a random ``fraction`` of ``range(n)`` held out, drawn from ``seed``."""
    if not 0 < fraction < 1:
        raise SanitizerError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    n_test = int(round(fraction * n))
    if not 0 < n_test < n:
        raise SanitizerError(f"holding out {fraction:g} of {n} images leaves {n_test} test and {n - n_test} "
                             "training images; both need at least one (give test data or more images)")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])
