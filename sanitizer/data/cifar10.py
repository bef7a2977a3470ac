"""CIFAR-10 from the standard torchvision folder layout, without torchvision's md5 check.

The batches are Python pickles. We read them with a restricted unpickler that builds plain containers
and nothing else from the file: numpy arrays and dtypes become inert placeholders that check their
state (a plain numeric dtype, a bounded shape, exactly as many bytes as the shape needs) and only then
become arrays copied from those bytes. So a tampered file cannot run code, make numpy allocate an array
of any shape from uninitialised memory, or crash numpy's own unpickling; every batch is then checked to
be 10000 × 3072 uint8 pixels with 10000 labels in 0–9 before anything is converted.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from sanitizer.data.tensors import ImageTensorDataset
from sanitizer.errors import SanitizerError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILES = ["test_batch"]
BATCH_IMAGES = 10_000
IMAGE_BYTES = 3 * 32 * 32
# A real batch file is about 31 MB; anything far larger is not one (and is not read into memory).
_MAX_FILE_BYTES = 64 << 20
_MAX_ARRAY_ITEMS = 1 << 25
_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"}


class _NDArrayClass:
    """Stands for ``numpy.ndarray`` in the file: usable only as ``_reconstruct``'s first argument
    (calling ``numpy.ndarray(shape)`` would allocate an uninitialised array of any shape)."""


class _DtypeSpec:
    """A numpy dtype named in the file: a plain numeric one only, its byte order from the pickled state."""

    def __init__(self, spec, align=0, copy=1) -> None:
        if not isinstance(spec, str) or spec not in _DTYPES:
            raise pickle.UnpicklingError(f"refusing the numpy dtype {spec!r} (only plain numeric dtypes)")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None)):
            raise pickle.UnpicklingError("refusing a numpy dtype with fields, sub-arrays or an unknown byte order")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def _checked_array(shape, dtype, fortran, data) -> np.ndarray:
    """An array copied from ``data`` once shape, dtype and byte count agree (nothing allocated before)."""
    if not (isinstance(shape, tuple) and len(shape) <= 4
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise pickle.UnpicklingError(f"refusing a numpy array of shape {shape!r}")
    if not isinstance(dtype, _DtypeSpec):
        raise pickle.UnpicklingError("refusing a numpy array without a plain numeric dtype")
    items = math.prod(shape)
    if items > _MAX_ARRAY_ITEMS:
        raise pickle.UnpicklingError(f"refusing a numpy array of shape {shape} ({items} items)")
    if isinstance(data, str):  # Python 2 pickles read with encoding="latin1"
        data = data.encode("latin1")
    if isinstance(data, pickle.PickleBuffer):
        data = data.raw()
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != items * dtype.dtype.itemsize:
        got = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray, memoryview)) else type(data).__name__
        raise pickle.UnpicklingError(f"a numpy array of shape {shape} and dtype {dtype.dtype} needs "
                                     f"{items * dtype.dtype.itemsize} bytes of data, the file holds {got}")
    return np.frombuffer(bytes(data), dtype=dtype.dtype).reshape(shape, order="F" if fortran else "C")


class _ArraySpec:
    """A numpy array in the file (protocols 0-4); ``array`` is set once the pickled state has been checked."""

    array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, is_fortran, data)
        if not (isinstance(state, tuple) and len(state) == 4):
            raise pickle.UnpicklingError("malformed numpy array state")
        self.array = _checked_array(*state)


def _reconstruct(subtype, shape, _dtype=None) -> _ArraySpec:
    """``numpy.core.multiarray._reconstruct`` as numpy pickles it: an empty ndarray filled by its state."""
    if subtype is not _NDArrayClass or shape != (0,):
        raise pickle.UnpicklingError("refusing a numpy array reconstruction that is not numpy's own (ndarray, (0,))")
    return _ArraySpec()


def _frombuffer(buf, dtype, shape, order) -> np.ndarray:
    """``numpy.core.numeric._frombuffer`` (protocol 5 pickles), checked."""
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"refusing a numpy array of order {order!r}")
    return _checked_array(shape, dtype, order == "F", buf)


def _scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar`` (a pickled numpy number such as ``np.int64(3)``), checked."""
    return _checked_array((), dtype, False, data)[()]


def _encode(text, encoding="utf-8") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refusing _codecs.encode other than of a string to latin1")
    return text.encode("latin1")


_GLOBALS = {
    ("numpy", "ndarray"): _NDArrayClass,
    ("numpy", "dtype"): _DtypeSpec,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("_codecs", "encode"): _encode,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _GLOBALS:
            return _GLOBALS[module, name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")


def _arrays(value):
    """Replace the placeholders in a loaded dict/list by their arrays."""
    if isinstance(value, _ArraySpec):
        if value.array is None:
            raise pickle.UnpicklingError("a numpy array without its data")
        return value.array
    if isinstance(value, (_DtypeSpec, _NDArrayClass)) or value is _NDArrayClass:
        raise pickle.UnpicklingError("a stray numpy dtype or class outside an array")
    if isinstance(value, dict):
        return {k: _arrays(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_arrays(v) for v in value]
    return value


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images [10000, 3, 32, 32] uint8, labels [10000] int64)`` of one batch file, checked."""
    size = path.stat().st_size
    if size > _MAX_FILE_BYTES:
        raise SanitizerError(f"{path}: {size} bytes is far larger than a CIFAR-10 batch (about 31 MB); "
                             "is --data-root the right folder?")
    try:
        with open(path, "rb") as f:
            batch = _arrays(_SafeUnpickler(io.BytesIO(f.read()), encoding="latin1").load())
    except OSError:
        raise
    except Exception as exc:  # anything a damaged or hostile pickle raises while being read
        raise SanitizerError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); "
                             "download the python version of CIFAR-10 again") from None
    if not isinstance(batch, dict):
        raise SanitizerError(f"{path}: a CIFAR-10 batch is a dict, this file holds a {type(batch).__name__}")
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (BATCH_IMAGES, IMAGE_BYTES):
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise SanitizerError(f"{path}: 'data' must be a uint8 array of shape ({BATCH_IMAGES}, {IMAGE_BYTES}) "
                             f"(10000 images of 3×32×32 pixels in 0..255), got {what}")
    labels = batch.get("labels", batch.get("fine_labels"))
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.tolist()
    if not isinstance(labels, list) or len(labels) != BATCH_IMAGES:
        got = f"{len(labels)} labels" if isinstance(labels, list) else type(labels).__name__
        raise SanitizerError(f"{path}: 'labels' must be a list of {BATCH_IMAGES} class indices, got {got}")
    bad = next((i for i, v in enumerate(labels)
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))
                or not 0 <= v < len(CIFAR10_CLASSES)), None)
    if bad is not None:
        shown = labels[bad].item() if isinstance(labels[bad], np.generic) else labels[bad]
        raise SanitizerError(f"{path}: label {shown!r} at position {bad} is not a CIFAR-10 class (0..9)")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _find_batches_dir(root: Path) -> Path:
    for candidate in (root, root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").exists():
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 batches under {root}: expected data_batch_1..5 and test_batch in "
        f"{root}/cifar-10-batches-py (the torchvision layout). Pass --data-root pointing at that folder."
    )


def load_cifar10(root: str | Path, train: bool = True) -> ImageTensorDataset:
    """Load CIFAR-10 as an :class:`ImageTensorDataset` of floats in [0, 1].

    Every batch file is checked (10000 uint8 images of 3×32×32, labels 0–9); a bad one raises a
    :class:`~sanitizer.errors.SanitizerError` naming it, a missing one ``FileNotFoundError``.

    Example:
        >>> train = load_cifar10("../shared/data/cifar10", train=True)  # doctest: +SKIP
        >>> len(train)  # doctest: +SKIP
        50000
    """
    folder = _find_batches_dir(Path(root))
    parts = [_read_batch(folder / name) for name in (_TRAIN_FILES if train else _TEST_FILES)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageTensorDataset(torch.from_numpy(images).float().div_(255), torch.from_numpy(labels), None, 10)
