"""PoisonSet on any map-style dataset, its validation, and ``sanitizer attack`` on your own data (.npz, folders)."""

from __future__ import annotations

import contextlib
import inspect
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from sanitizer.attacks import PoisonSet
from sanitizer.attacks import command as attack_command
from sanitizer.attacks.base import _ATTACKS
from sanitizer.cli import main
from sanitizer.data import ImageTensorDataset, PoisonedDataset, PoisonedView, PoisonIndexError, load_digits_split
from sanitizer.errors import SanitizerError


def _poisons(indices=(1, 3), labels=(0, 1), shape=(1, 4, 4), **kw) -> PoisonSet:
    images = np.full((len(indices), *shape), 0.5, dtype=np.float32)
    return PoisonSet("test", np.asarray(indices), images, np.asarray(labels), **kw)


def _items_equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in zip(a, b))


def _write_folder(root, sizes_by_class: dict[str, list[tuple[int, int]]], seed=0):
    rng = np.random.default_rng(seed)
    for name, sizes in sizes_by_class.items():
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# ---------------------------------------------------------------- apply on any map-style dataset


def test_apply_on_tensor_dataset_replaces_only_the_poisoned_items():
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    base = TensorDataset(x, y)
    view = _poisons().apply(base)
    assert isinstance(view, PoisonedDataset) and len(view) == 6
    assert view.is_poison.tolist() == [False, True, False, True, False, False]
    for i in (0, 2, 4, 5, -1):
        assert _items_equal(view[i], base[i])
    image, label = view[1]
    assert torch.equal(image, torch.full((1, 4, 4), 0.5)) and label.dtype == y.dtype and int(label) == 0
    assert int(view[-3][1]) == 1 and torch.equal(view[-3][0], image)  # negative indices reach poisons too
    batch = next(iter(DataLoader(view, batch_size=6)))
    assert batch[1].tolist() == [0, 0, 0, 1, 0, 1] and torch.equal(batch[0][0], x[0])


def test_apply_on_a_torchvision_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    root = _write_folder(tmp_path / "imgs", {"cat": [(4, 4)] * 3, "dog": [(4, 4)] * 3})
    base = ImageFolder(str(root), transform=ToTensor())
    poisons = _poisons(indices=(0, 4), labels=(1, 0), shape=(3, 4, 4))
    view = poisons.apply(base)
    assert view[0][1] == 1 and isinstance(view[0][1], int) and torch.equal(view[0][0], torch.full((3, 4, 4), 0.5))
    assert view[4][1] == 0
    for i in (1, 2, 3, 5):
        assert _items_equal(view[i], base[i])
    with pytest.raises(SanitizerError, match="label 5 .* out of range for 2 classes"):
        _poisons(indices=(0,), labels=(5,), shape=(3, 4, 4)).apply(base)
    with pytest.raises(SanitizerError, match="ToTensor"):
        poisons.apply(ImageFolder(str(root)))  # PIL images, no ToTensor


class _Triples(Dataset):
    """Items (image, label, index, note): the extras stay with a poisoned item."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i, f"item{i}"


def test_apply_keeps_extra_item_fields_and_uses_the_transform():
    base = _Triples(torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1]))
    view = _poisons(indices=(2,), labels=(1,)).apply(base, transform=lambda im: im * 2)
    image, label, index, note = view[2]
    assert label == 1 and index == 2 and note == "item2" and torch.allclose(image, torch.ones(1, 4, 4))
    assert _items_equal(view[0][:3], base[0][:3])


def test_apply_warns_when_the_dataset_is_normalised():
    base = TensorDataset(torch.rand(4, 1, 4, 4) * 4 - 2, torch.tensor([0, 1, 0, 1]))
    with pytest.warns(UserWarning, match="not in \\[0, 1\\]"):
        _poisons().apply(base)


def test_apply_on_image_tensor_dataset_keeps_the_fast_path():
    base = ImageTensorDataset(torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 0, 1, 0, 1]))
    view = _poisons().apply(base)
    assert isinstance(view, PoisonedView)
    assert _items_equal(view[0], base[0]) and _items_equal(view[5], base[5])
    assert torch.equal(view[3][0], torch.full((1, 4, 4), 0.5)) and view[3][1] == 1 and view[3][2] == 3
    with pytest.raises(SanitizerError, match="with_transform"):
        _poisons().apply(base, transform=lambda im: im)


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1, 4, 4), 0


@pytest.mark.parametrize("make", [
    lambda: ImageTensorDataset(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 0])),
    lambda: TensorDataset(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 0])),
])
def test_apply_errors(make):
    base = make()
    with pytest.raises(PoisonIndexError, match="poison index 3 is outside a dataset of 3"):
        _poisons().apply(base)
    with pytest.raises(IndexError):  # still an IndexError for callers that catch that
        _poisons().apply(base)
    with pytest.raises(SanitizerError, match=r"shape \(3, 4, 4\).*\(1, 4, 4\)"):
        _poisons(indices=(0,), labels=(0,), shape=(3, 4, 4)).apply(base)
    with pytest.raises(SanitizerError, match="label 2 .* out of range for 2 classes"):
        _poisons(indices=(0,), labels=(2,)).apply(base)
    assert _poisons(indices=(0,), labels=(2,)).apply(base, num_classes=3)[0][1] == 2


def test_apply_refuses_iterable_and_unsized_datasets():
    with pytest.raises(SanitizerError, match="IterableDataset"):
        _poisons().apply(_Stream())
    with pytest.raises(SanitizerError, match="no __len__"):
        _poisons().apply(object())


# ---------------------------------------------------------------- PoisonSet validation (issue 13)


@pytest.mark.parametrize("kw, message", [
    ({"indices": np.array([1.0, 3.0])}, "poison indices must be integers"),
    ({"indices": np.array([1.5, 3.0])}, "poison indices must be integers"),
    ({"indices": np.array([True, False])}, "poison indices must be integers"),
    ({"indices": np.array([-1, 3])}, "poison indices must be >= 0"),
    ({"indices": np.array([3, 3])}, "duplicates"),
    ({"labels": np.array([0, -5])}, "poison labels must be >= 0"),
    ({"labels": np.array([0, 99]), "num_classes": 10}, "label 99 .* out of range for 10 classes"),
    ({"labels": np.array([0.0, 1.0])}, "poison labels must be integers"),
    ({"images": np.full((2, 1, 4, 4), np.nan)}, "NaN"),
    ({"images": np.full((2, 1, 4, 4), 255.0)}, "divide 8-bit pixels by 255"),
    ({"images": np.full((2, 1, 4, 4), -0.5)}, r"\[0, 1\]"),
    ({"images": np.zeros((2, 16))}, r"\[N, C, H, W\]"),
    ({"labels": np.array([0, 1, 1])}, "one of each per poison"),
    ({"target_images": np.full((1, 1, 4, 4), np.inf)}, "target images contain NaN or inf"),
    ({"target_labels": np.array([-1])}, "target labels must be >= 0"),
    ({"trigger": np.full((1, 2, 2), 2.0)}, "trigger must lie in"),
    ({"adversarial_class": 1.5}, "adversarial_class must be a class index"),
    ({"source_class": -3}, "source_class must be a class index"),
    ({"adversarial_class": 4, "num_classes": 3}, "adversarial_class=4 is out of range"),
])
def test_poison_set_validation(kw, message):
    fields = {"attack": "t", "indices": np.array([1, 3]), "images": np.full((2, 1, 4, 4), 0.5),
              "labels": np.array([0, 1]), **kw}
    with pytest.raises(SanitizerError, match=message):
        PoisonSet(**fields)


def test_poison_set_clips_rounding_noise_and_accepts_integer_tensors():
    images = np.full((2, 1, 4, 4), 1 + 5e-5, dtype=np.float32)
    poisons = PoisonSet("t", torch.tensor([1, 3]), images, torch.tensor([0, 1]), adversarial_class=np.int64(1))
    assert poisons.images.max() == 1.0 and poisons.indices.dtype == np.int64 and poisons.adversarial_class == 1


def test_poison_set_round_trip_and_load_errors(tmp_path):
    poisons = _poisons(num_classes=2, target_images=np.zeros((1, 1, 4, 4)), target_labels=[1])
    poisons.save(tmp_path / "p.npz")
    same = PoisonSet.load(tmp_path / "p.npz")
    assert same.num_classes == 2 and same.indices.tolist() == [1, 3] and same.target_labels.tolist() == [1]

    arrays = dict(np.load(tmp_path / "p.npz"))
    np.savez(tmp_path / "bad.npz", **{**arrays, "labels": np.array([0, 7])})
    with pytest.raises(SanitizerError, match=r"bad\.npz: poison labels: label 7 .* out of range for 2 classes"):
        PoisonSet.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "nan.npz", **{**arrays, "images": np.full((2, 1, 4, 4), np.nan, dtype=np.float32)})
    with pytest.raises(SanitizerError, match=r"nan\.npz: poison images contain NaN"):
        PoisonSet.load(tmp_path / "nan.npz")
    np.savez(tmp_path / "floats.npz", **{**arrays, "indices": np.array([1.0, 3.0])})
    with pytest.raises(SanitizerError, match="poison indices must be integers"):
        PoisonSet.load(tmp_path / "floats.npz")
    np.savez(tmp_path / "partial.npz", indices=np.array([1]))
    with pytest.raises(SanitizerError, match="is not a PoisonSet: it lacks format_version"):
        PoisonSet.load(tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SanitizerError, match="cannot read it"):
        PoisonSet.load(tmp_path / "junk.npz")
    with pytest.raises(SanitizerError, match="no such file"):
        PoisonSet.load(tmp_path / "missing.npz")


# ---------------------------------------------------------------- the CLI on your own data


def _npz(path, n=40, classes=4, shape=(1, 8, 8), seed=0, **arrays):
    rng = np.random.default_rng(seed)
    data = {"images": rng.random((n, *shape), dtype=np.float32), "labels": np.arange(n) % classes}
    data.update(arrays)
    np.savez(path, **data)
    return path


def _attack(*argv) -> int:
    return main(["attack", *map(str, argv)])


def test_cli_label_flip_on_an_npz_with_a_holdout(tmp_path):
    data = _npz(tmp_path / "d.npz")
    out = tmp_path / "p.npz"
    assert _attack("label_flip", "--data", data, "--out", out, "--budget", "5", "--holdout", "0.25") == 0
    poisons, images = PoisonSet.load(out), np.load(data)["images"]
    assert len(poisons) == 5 and poisons.num_classes == 4
    assert poisons.params["holdout"] == 0.25 and poisons.params["data"] == str(data)
    # indices refer to --data's own order (not the crafting split): the label flip keeps the images
    np.testing.assert_array_equal(poisons.images, images[poisons.indices])
    full = ImageTensorDataset(torch.from_numpy(images), torch.from_numpy(np.arange(40) % 4))
    assert poisons.apply(full).labels[torch.from_numpy(poisons.indices)].tolist() == poisons.labels.tolist()


def test_cli_badnets_on_a_uint8_channels_last_npz_with_test_arrays(tmp_path):
    rng = np.random.default_rng(1)
    data = _npz(tmp_path / "d.npz", shape=(8, 8, 3), images=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
                test_images=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), test_labels=np.arange(10) % 4)
    out = tmp_path / "p.npz"
    assert _attack("badnets", "--data", data, "--out", out, "--budget", "4", "--adversarial-class", "2",
                   "--param", "patch_size=2") == 0
    poisons = PoisonSet.load(out)
    assert len(poisons) == 4 and poisons.images.shape[1:] == (3, 8, 8) and set(poisons.labels) == {2}
    assert "holdout" not in poisons.params


def test_cli_gradient_matching_runs_on_tiny_npz(tmp_path):
    data = _npz(tmp_path / "d.npz", n=32, classes=2, test_images=np.full((4, 1, 8, 8), 0.5, np.float32),
                test_labels=np.array([0, 1, 0, 1]))
    out = tmp_path / "p.npz"
    assert _attack("gradient_matching", "--data", data, "--out", out, "--width", "4", "--surrogate-epochs", "1",
                   "--budget", "2", "--target-index", "1", "--adversarial-class", "0", "--param", "steps=1",
                   "--param", "restarts=1", "--device", "cpu") == 0
    poisons = PoisonSet.load(out)
    assert len(poisons) == 2 and poisons.target_indices.tolist() == [1] and poisons.adversarial_class == 0


def test_cli_on_image_folders(tmp_path):
    train = _write_folder(tmp_path / "train", {"a": [(6, 6)] * 5, "b": [(6, 6)] * 5, "c": [(6, 6)] * 5})
    test = _write_folder(tmp_path / "test", {"b": [(6, 6)] * 2, "c": [(6, 6)] * 2}, seed=1)
    out = tmp_path / "p.npz"
    assert _attack("badnets", "--data", train, "--test-data", test, "--out", out, "--budget", "3",
                   "--adversarial-class", "0", "--param", "patch_size=2") == 0
    poisons = PoisonSet.load(out)
    assert poisons.params["class_names"] == ["a", "b", "c"] and poisons.params["test_data"] == str(test)
    assert set(poisons.labels) == {0} and poisons.num_classes == 3
    assert _attack("label_flip", "--data", train, "--out", out, "--budget", "2", "--split-seed", "3") == 0
    assert PoisonSet.load(out).params["split_seed"] == 3


def _refuse(monkeypatch, message, *argv):
    """The CLI exits with ``message`` before any surrogate is built or poison crafted."""
    def never(*args, **kwargs):
        raise AssertionError("crafting started despite bad input")

    monkeypatch.setattr(attack_command, "craft_with_convention", never)
    monkeypatch.setattr(attack_command, "build_surrogate", never)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = _attack(*argv)
        except SystemExit as exc:  # argparse's own refusals (a value of the wrong type) exit here
            code = exc.code
    text = err.getvalue().strip().splitlines()[-1]
    assert code == 2, (code, text)
    assert re.search(message, text), text


@pytest.mark.parametrize("arrays, message", [
    ({"images": None}, "lacks the array.* images"),
    ({"images": np.zeros((40, 8, 8), np.float32)}, r"shape \[N, C, H, W\]"),
    ({"images": np.zeros((40, 1, 8, 8), np.int64)}, "dtype int64"),
    ({"images": np.zeros((40, 8, 8, 3), np.float32)}, "channels-last"),
    ({"images": np.full((40, 1, 8, 8), np.nan, np.float32)}, "NaN"),
    ({"images": np.full((40, 1, 8, 8), 200.0, np.float32)}, "divide 8-bit pixels by 255"),
    ({"images": np.zeros((40, 8, 8, 7), np.uint8)}, "uint8 images must have shape"),
    ({"labels": np.arange(40) - 1}, "labels must be >= 0"),
    ({"labels": np.arange(40) * 0.5}, "labels must be integers"),
    ({"labels": np.arange(39) % 4}, "39 .*labels for 40 images"),
    ({"labels": np.arange(40) % 4, "num_classes": np.array(3)}, "label 3 .* out of range for 3 classes"),
    ({"labels": np.zeros(40, np.int64)}, "single class"),
    ({"test_images": np.zeros((4, 1, 8, 8), np.float32)}, "test_images and test_labels together"),
    ({"test_images": np.zeros((4, 1, 8, 8), np.float32), "test_labels": np.array([0, 1, 2, 9])},
     "test_labels: label 9 .* out of range for 4 classes"),
    ({"test_images": np.zeros((4, 1, 6, 6), np.float32), "test_labels": np.zeros(4, np.int64)}, "one shape"),
])
def test_cli_refuses_bad_npz_before_crafting(tmp_path, monkeypatch, arrays, message):
    data = tmp_path / "d.npz"
    base = {"images": np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32), "labels": np.arange(40) % 4}
    np.savez(data, **{k: v for k, v in {**base, **arrays}.items() if v is not None})
    _refuse(monkeypatch, message, "label_flip", "--data", data, "--out", tmp_path / "p.npz")


def test_cli_refuses_bad_paths_and_options_before_crafting(tmp_path, monkeypatch):
    data, out = _npz(tmp_path / "d.npz"), tmp_path / "p.npz"
    _refuse(monkeypatch, "no such file or folder", "label_flip", "--data", tmp_path / "nope.npz", "--out", out)
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    _refuse(monkeypatch, "cannot read it as an .npz", "label_flip", "--data", tmp_path / "junk.npz", "--out", out)
    (tmp_path / "d.csv").write_text("1,2")
    _refuse(monkeypatch, "must be an .npz", "label_flip", "--data", tmp_path / "d.csv", "--out", out)
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    _refuse(monkeypatch, "single .npy array", "label_flip", "--data", tmp_path / "plain.npz", "--out", out)
    _refuse(monkeypatch, "does not exist", "label_flip", "--data", data, "--out", tmp_path / "no" / "p.npz")
    _refuse(monkeypatch, "is a folder", "label_flip", "--data", data, "--out", tmp_path)
    _refuse(monkeypatch, "--surrogate-weights .*no such file", "gradient_matching", "--data", data, "--out", out,
            "--surrogate-weights", tmp_path / "w.pt")
    _refuse(monkeypatch, "--test-data goes with --data PATH", "label_flip", "--data", "digits", "--out", out,
            "--test-data", data)
    _refuse(monkeypatch, "--holdout must lie in", "label_flip", "--data", data, "--out", out, "--holdout", "1.5")
    _refuse(monkeypatch, "leaves 0 test", "label_flip", "--data", data, "--out", out, "--holdout", "0.001")
    _refuse(monkeypatch, "--adversarial-class 7 is not a class", "gradient_matching", "--data", data, "--out", out,
            "--adversarial-class", "7")
    _refuse(monkeypatch, "--target-index 99 is outside the 8 test images", "gradient_matching", "--data", data,
            "--out", out, "--target-index", "99")
    with_test = _npz(tmp_path / "t.npz", test_images=np.zeros((4, 1, 8, 8), np.float32), test_labels=np.zeros(4, int))
    _refuse(monkeypatch, "holds test_images already", "label_flip", "--data", with_test, "--out", out,
            "--test-data", data)


def test_cli_refuses_bad_image_folders_before_crafting(tmp_path, monkeypatch):
    out = tmp_path / "p.npz"
    mixed = _write_folder(tmp_path / "mixed", {"a": [(6, 6), (6, 6)], "b": [(6, 6), (5, 7)]})
    _refuse(monkeypatch, r"\(3, 5, 7\) .*resize the images", "label_flip", "--data", mixed, "--out", out)
    broken = _write_folder(tmp_path / "broken", {"a": [(6, 6)] * 2, "b": [(6, 6)] * 2})
    (broken / "b" / "1.png").write_bytes(b"not a png")
    _refuse(monkeypatch, r"1\.png: cannot read the image", "label_flip", "--data", broken, "--out", out)
    (tmp_path / "empty").mkdir()
    _refuse(monkeypatch, "is not an image folder", "label_flip", "--data", tmp_path / "empty", "--out", out)
    good = _write_folder(tmp_path / "good", {"a": [(6, 6)] * 3, "b": [(6, 6)] * 3})
    other = _write_folder(tmp_path / "other", {"a": [(6, 6)], "z": [(6, 6)]})
    _refuse(monkeypatch, "class folder.* z that the training data lacks", "label_flip", "--data", good,
            "--test-data", other, "--out", out)
    small = _write_folder(tmp_path / "small", {"a": [(4, 4)], "b": [(4, 4)]})
    _refuse(monkeypatch, "need one shape", "label_flip", "--data", good, "--test-data", small, "--out", out)


# ---------------------------------------------------------------- default budgets in --help and --list


def _constructor_budget(cls):
    """The attack's default budget straight from its (or, through **kwargs, its parent's) constructor."""
    for klass in cls.__mro__:
        parameters = inspect.signature(vars(klass)["__init__"]).parameters if "__init__" in vars(klass) else {}
        for name in ("budget", "fraction"):
            if name in parameters:
                return name, parameters[name].default
    raise AssertionError(f"{cls.__name__} has no budget")


def test_help_and_list_show_each_attacks_default_budget(capsys):
    with pytest.raises(SystemExit) as info:
        main(["attack", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert _attack("--list") == 0
    listing = capsys.readouterr().out
    for name, cls in _ATTACKS.items():
        kind, value = _constructor_budget(cls)
        help_line = next(line for line in help_text.splitlines() if line.strip().startswith(name + " "))
        list_line = next(line for line in listing.splitlines() if line.startswith(name + " "))
        expected = f"fraction={value:g}" if kind == "fraction" else f"{value:g}"
        assert expected in help_line and expected in list_line, (name, help_line, list_line)
    # the budgets differ per attack, and fractions are shown as counts on the bundled data
    assert "label_flip" in help_text and re.search(r"label_flip +0\.1 = 10% .*135 on digits", help_text)
    assert re.search(r"gradient_matching +0\.01 = 1% .*13 on digits", help_text)
    assert re.search(r"bullseye_polytope +5 poisons", help_text)


def test_budget_counts_use_the_real_digits_size():
    assert attack_command.TRAIN_SIZES["digits"] == len(load_digits_split()[0])
