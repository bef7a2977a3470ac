"""Bad inputs that used to be silently wrong now get a clear error (a first batch of issue 13's list)."""

import os
import pickle
import re

import numpy as np
import pytest
import torch

from sanitizer import Sanitizer, gradient_embeddings, select
from sanitizer.cli import main
from sanitizer.data import ImageTensorDataset, cifar10, load_cifar10
from sanitizer.errors import SanitizerError, check_labels
from sanitizer.models import CompactCNN
from tests.hostile.cifar_batches import cifar_batch, cifar_folder


@pytest.fixture(scope="module")
def small():
    gen = torch.Generator().manual_seed(0)
    return CompactCNN(1, 2, 4), ImageTensorDataset(torch.rand(20, 1, 8, 8, generator=gen), torch.arange(20) % 2)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -1.0, 0.0, "high"])
def test_a_threshold_that_would_drop_nothing_is_refused(threshold):
    with pytest.raises(SanitizerError, match="threshold"):
        select(np.random.default_rng(0).normal(size=(30, 4)), np.zeros(30, int), threshold=threshold)


def test_embeddings_without_coordinates_or_complex_are_refused():
    y = np.zeros(10, int)
    with pytest.raises(SanitizerError, match="no coordinates"):
        select(np.zeros((10, 0)), y)
    with pytest.raises(SanitizerError, match="complex"):
        select(np.ones((10, 3)) * (1 + 2j), y)


@pytest.mark.parametrize("k", [0, 2.5, True])
def test_k_must_be_a_positive_integer(k):
    with pytest.raises(SanitizerError, match="k must be"):
        select(np.random.default_rng(0).normal(size=(30, 4)), np.zeros(30, int), k=k)


def test_negative_or_out_of_range_indices_are_refused(small):
    model, data = small
    with pytest.raises(SanitizerError, match="index -1"):
        gradient_embeddings(model, data, indices=[-1])
    with pytest.raises(SanitizerError, match="index 20"):
        gradient_embeddings(model, data, indices=[0, 20])
    with pytest.raises(SanitizerError, match="batch_size"):
        gradient_embeddings(model, data, batch_size=0)
    with pytest.raises(SanitizerError, match="max_dim"):
        gradient_embeddings(model, data, max_dim=0)


@pytest.mark.parametrize("kwargs", [{"every": 1.5}, {"warmup": -1}, {"every": 0}, {"epochs": 0},
                                    {"stop_epoch": 2.5}])
def test_fractional_or_negative_schedules_are_refused(small, kwargs):
    model, data = small
    with pytest.raises(SanitizerError):
        Sanitizer(model, data, **kwargs)


# ---------------------------------------------------------------- hostile CIFAR-10 batch files

class _Call:
    """Pickles as a call of ``fn(*args)`` (then ``state`` is set on the result, when given)."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(cifar10, "BATCH_IMAGES", 4)  # real batches hold 10000 images; 4 keep the files tiny


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_well_formed_cifar_folder_loads(tmp_path, small_batches, protocol):
    cifar_folder(tmp_path, protocol=protocol)
    train, test = load_cifar10(tmp_path), load_cifar10(tmp_path, train=False)
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 4
    assert train.labels[:8].tolist() == [0, 1, 2, 3, 1, 2, 3, 4]
    assert 0 <= float(train.images.min()) and float(train.images.max()) <= 1


@pytest.mark.parametrize("content, message", [
    (cifar_batch(data=np.zeros((4, 100), np.uint8)), r"uint8 array of shape \(4, 3072\)"),
    (cifar_batch(data=np.full((4, 3072), 300, np.int64)), "got int64 array"),       # no wrap-around of 300 to 44
    (cifar_batch(data=np.zeros((5, 3072), np.uint8)), "got uint8 array of shape"),  # 5 images, 4 labels
    (cifar_batch(labels=[0, 1, 2, 10]), "label 10 at position 3 is not a CIFAR-10 class"),
    (cifar_batch(labels=[0, -1, 2, 3]), "label -1 at position 1"),
    (cifar_batch(labels=[0, 1.5, 2, 3]), "label 1.5 at position 1"),
    (cifar_batch(labels=[0, 1, 2]), "got 3 labels"),
    (cifar_batch(labels="0123"), "got str"),
    ({"data": np.zeros((4, 3072), np.uint8)}, "got NoneType"),
    ([1, 2, 3], "holds a list"),
    # numpy.ndarray((8192, 3072)) called directly: an array of uninitialised memory (a 155-byte file gave 40,960 images)
    (cifar_batch(data=_Call(np.ndarray, ((8192, 3072),))), "not a readable CIFAR-10 batch"),
    # numpy's own reconstruction, asked for a huge empty array, or fed too few bytes, or an object array
    (cifar_batch(data=_Call(np._core.multiarray._reconstruct, (np.ndarray, (10**6, 10**6), b"b"))), "reconstruction"),
    (cifar_batch(data=_Call(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                       (1, (4, 3072), np.dtype(np.uint8), False, b"abc"))), "needs 12288 bytes"),
    (cifar_batch(data=_Call(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                       (1, (4,), np.dtype(object), False, [1, 2]))), "refusing the numpy dtype"),  # segfaults numpy
    (cifar_batch(data=_Call(os.system, ("echo pwned",))), "refusing to load (posix|nt).system"),
])
def test_hostile_cifar_batches_are_refused_naming_the_file(tmp_path, small_batches, content, message):
    cifar_folder(tmp_path, content)
    with pytest.raises(SanitizerError, match=message) as info:
        load_cifar10(tmp_path)
    assert "data_batch_1" in str(info.value)


def test_a_pickle_that_calls_os_system_is_refused_not_executed(tmp_path, small_batches):
    marker = tmp_path / "executed"
    cifar_folder(tmp_path, cifar_batch(data=_Call(os.system, (f"touch {marker}",))))
    with pytest.raises(SanitizerError, match="refusing"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_truncated_oversized_and_missing_cifar_files(tmp_path, small_batches, monkeypatch):
    whole = pickle.dumps(cifar_batch(), protocol=2)
    folder = cifar_folder(tmp_path, whole[:len(whole) // 2])
    with pytest.raises(SanitizerError, match="data_batch_1 is not a readable CIFAR-10 batch"):
        load_cifar10(tmp_path)
    (folder / "data_batch_1").write_bytes(whole)
    monkeypatch.setattr(cifar10, "_MAX_FILE_BYTES", 100)
    with pytest.raises(SanitizerError, match="far larger than a CIFAR-10 batch"):
        load_cifar10(tmp_path)
    monkeypatch.undo()
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar10(tmp_path, train=False)
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 batches"):
        load_cifar10(tmp_path / "elsewhere")


# ---------------------------------------------------------------- the command line: one line, exit 2

def _bad_cifar(tmp_path):
    cifar_folder(tmp_path)  # batches of 4 images: refused, a real one holds 10000
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["demo", "--out", "{file}", "--quick"], "File exists"),
    (["attack", "no_such_attack", "--out", "{tmp}/p.npz"], "unknown attack 'no_such_attack'"),
    (["attack", "label_flip", "--budget", "-3", "--out", "{tmp}/p.npz"], "budget must be at least 1"),
    (["certify", "--policy", "no_such_policy", "--out", "{tmp}/c.json"], "unknown policy 'no_such_policy'"),
    (["certify", "--data", "cifar10", "--data-root", "{cifar}", "--out", "{tmp}/c.json"], "data_batch_1: 'data'"),
    (["certify", "--data", "cifar10", "--data-root", "{tmp}/nowhere", "--out", "{tmp}/c.json"],
     "no CIFAR-10 batches"),
    (["verify", "{file}", "--public-key", "{tmp}/missing.pem"], "cannot read the public key"),
])
def test_cli_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    import sanitizer.attacks.command as attack_command
    import sanitizer.certificate.command as certificate_command
    import sanitizer.demo as demo

    def never(*args, **kwargs):
        raise AssertionError("work started despite bad input")

    for module, name in [(attack_command, "build_surrogate"), (attack_command, "craft_with_convention"),
                         (certificate_command, "BoundRecorder"), (demo, "digits_demo_settings")]:
        if hasattr(module, name):
            monkeypatch.setattr(module, name, never)
    (tmp_path / "afile").write_text("{}")
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    _bad_cifar(cifar)
    argv = [a.format(file=tmp_path / "afile", tmp=tmp_path, cifar=cifar) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(r"^sanitizer( \w+)?: error: ", err) and re.search(message, err), err


def test_cli_attack_data_errors_exit_with_one_line(tmp_path, capsys):
    # sanitizer/attacks/command.py reports bad data as SystemExit(message): main turns it into the same
    # one line and exit status 2 as every other command's bad input
    cifar = _bad_cifar(tmp_path)
    code = main(["attack", "label_flip", "--data", "cifar10", "--data-root", str(cifar),
                 "--out", str(tmp_path / "p.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("sanitizer: error: ")
    assert re.search(r"data_batch_1: 'data' must be a uint8 array of shape \(10000, 3072\)", err)


def test_cli_keeps_real_bugs_visible(monkeypatch, capsys):
    import sanitizer.demo as demo

    def bug(*args, **kwargs):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(demo, "run_demo", bug)
    with pytest.raises(KeyError):
        main(["demo"])
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: (_ for _ in ()).throw(OSError("no file involved")))
    with pytest.raises(OSError):
        main(["demo"])
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: (_ for _ in ()).throw(SanitizerError("two\nlines")))
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == "sanitizer: error: two lines\n"


# ---------------------------------------------------------------- labels and policy options

@pytest.mark.parametrize("labels, message", [
    (np.r_[np.zeros(29), 1.7], "label 1.7 at index 29 is not an integer"),
    (np.r_[np.zeros(29), np.nan], "label nan at index 29"),
    (np.array(["cat", "dog"] * 15), "got strings; map class names"),
    (np.zeros(30, complex), "got dtype complex128"),
    (np.array([0, "a"] * 15, dtype=object), "got strings"),
    (np.r_[np.zeros(29), 1e30], "would mean 1000000000000000019884624838657 classes"),  # not wrapped negative
    (np.r_[np.zeros(29, np.uint64), np.uint64(2**64 - 1)], "label 18446744073709551615 at index 29"),
    (np.r_[np.zeros(29, int), 10**9], "label 1000000000 .* pass num_classes= explicitly"),
    (np.r_[np.zeros(29, int), -3], "label -3 at index 29 is negative"),
    (np.zeros((30, 1), int), r"1-D class indices, got shape \(30, 1\)"),
])
@pytest.mark.parametrize("policy", ["density", "deep_knn", "none"])
def test_bad_labels_are_refused_before_any_work(labels, message, policy):
    with pytest.raises(SanitizerError, match=message):
        select(np.random.default_rng(0).normal(size=(30, 4)), labels, policy=policy)


def test_integer_valued_float_and_bool_labels_are_class_indices():
    x = np.random.default_rng(0).normal(size=(30, 4))
    ints = select(x, np.arange(30) % 2, policy="deep_knn", k=3)
    np.testing.assert_array_equal(select(x, (np.arange(30) % 2).astype(float), policy="deep_knn", k=3).keep, ints.keep)
    np.testing.assert_array_equal(select(x, np.arange(30) % 2 == 1, policy="deep_knn", k=3).keep, ints.keep)
    assert check_labels(torch.tensor([0.0, 2.0])).dtype == np.int64


def test_scalar_labels_and_bad_num_classes():
    with pytest.raises(SanitizerError, match="got the scalar 3"):
        check_labels(3)
    for num_classes, message in [(1.5, "num_classes must be an integer"), (0, "num_classes must be >= 1")]:
        with pytest.raises(SanitizerError, match=message):
            select(np.zeros((4, 2)), np.zeros(4, int), num_classes=num_classes)


def test_a_huge_label_with_explicit_num_classes_does_not_allocate_per_class_tables():
    # deep k-NN once sized an [N, max label + 1] count table: label 10**9 asked for 224 GiB
    y = np.r_[np.arange(27) % 2, [10**9] * 3]
    x = np.random.default_rng(0).normal(size=(30, 4))
    x[-3:] += 100  # the class-10**9 points sit together, far from the rest
    sel = select(x, y, policy="deep_knn", num_classes=10**9 + 1, k=2)
    assert sel.keep.shape == (30,) and sel.keep[-3:].all() and np.isfinite(sel.scores).all()


@pytest.mark.parametrize("policy, options, message", [
    ("deep_knn", {"k": 2.5}, "k must be an integer"),
    ("deep_knn", {"k": "5"}, "k must be an integer"),
    ("deep_knn", {"budget": 2.5}, "budget must be an integer"),
    ("deep_knn", {"backend": "gpu"}, "unknown kNN backend 'gpu'"),
    ("spectral", {"budget": 2.5}, "a count .* or a fraction"),
    ("spectral", {"budget": float("nan")}, "a count .* or a fraction"),
    ("spectral", {"budget": "a"}, "a count .* or a fraction"),
    ("spectral", {"multiplier": float("nan")}, "multiplier must be a finite number"),
    ("activation_clustering", {"dims": 2.5}, "dims must be an integer"),
    ("activation_clustering", {"threshold": float("nan")}, r"threshold .* must lie in \(0, 0.5\]"),
    ("activation_clustering", {"n_init": 0}, "n_init must be >= 1"),
    ("epic", {"fraction": float("nan")}, r"fraction .* must lie in \(0, 1\]"),
    ("epic", {"fraction": "a"}, "must be a number"),
    ("epic-2", {}, r"fraction .* must lie in \(0, 1\]"),
    ("random", {}, "exactly one of count="),
    ("random", {"count": 2.5}, "count must be an integer"),
    ("random", {"count": 100}, "cannot drop 100 of 30"),
    ("random", {"fraction": float("nan")}, r"fraction must lie in \[0, 1\]"),
])
def test_bad_policy_options_get_a_clear_error(policy, options, message):
    with pytest.raises(SanitizerError, match=message):
        select(np.random.default_rng(0).normal(size=(30, 4)), np.arange(30) % 2, policy=policy, **options)


@pytest.mark.parametrize("embeddings, message", [
    (np.array([["a"] * 4] * 30), "must be numbers, got dtype <U1"),
    (np.ones((30, 4), bool), "must be numbers, got dtype bool"),
    (np.full((30, 4), 1e300), "exceed float32's range"),
    (np.ones(30), r"shape \[N, D\]"),
    (np.ones((29, 4)), "29 embeddings but 30 labels"),
])
def test_bad_embeddings_get_a_clear_error(embeddings, message):
    with pytest.raises(SanitizerError, match=message):
        select(embeddings, np.arange(30) % 2)


@pytest.mark.parametrize("images, message", [
    (torch.rand(6, 1, 8, 8, dtype=torch.float64), "parameters are torch.float32 but the dataset yields torch.float64"),
    (torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8), r"torch.uint8 inputs; scale them .*/ 255"),
])
def test_inputs_of_another_dtype_than_the_model_get_a_clear_error(small, images, message):
    model, _ = small
    with pytest.raises(SanitizerError, match=message):
        gradient_embeddings(model, torch.utils.data.TensorDataset(images, torch.arange(6) % 2))


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": torch.int64}, "dtype must be a floating torch dtype"),
    ({"seed": "a"}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"device": "tpu"}, "device='tpu' is not a torch device"),
    ({"batch_size": "a"}, "batch_size must be an integer"),
    ({"embedding": "gradients"}, "unknown embedding .gradients."),
])
def test_bad_embedding_arguments_get_a_clear_error(small, kwargs, message):
    model, data = small
    with pytest.raises(SanitizerError, match=message):
        gradient_embeddings(model, data, **kwargs)


def test_activation_clustering_takes_any_integer_round_seed():
    # the Sanitizer's round seeds (seed * 1_000_003 + epoch) pass sklearn's 2**32 - 1 for seed >= 4295
    x, y = np.random.default_rng(0).normal(size=(30, 4)), np.arange(30) % 2
    big = select(x, y, policy="activation_clustering", seed=5000 * 1_000_003 + 7)
    assert big.keep.shape == (30,)
    with pytest.raises(SanitizerError, match="seed must be an integer"):
        select(x, y, policy="activation_clustering", seed="a")


def test_policy_names_non_integer_labels_and_demo_trials_get_clear_errors():
    from sanitizer.cli import main
    from sanitizer.data import ImageTensorDataset
    from sanitizer.policies import make_policy

    for bad, message in [("epic-abc", "epic-<fraction>"), (3, "a name such as 'density'"),
                         (None, "a name such as 'density'")]:
        with pytest.raises(SanitizerError, match=message):
            make_policy(bad)
    with pytest.raises(SanitizerError, match="whole class indices"):
        ImageTensorDataset(torch.zeros(2, 1, 2, 2), torch.tensor([1.7, 0.0]), None)
    assert ImageTensorDataset(torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 0.0]), None).labels.tolist() == [1, 0]
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--trials", "0"])
    assert exit_info.value.code == 2
