import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from sanitizer import find_last_linear, gradient_embeddings
from sanitizer.data import ImageTensorDataset
from sanitizer.embeddings import EvalMode, logits_of, model_device
from sanitizer.errors import SanitizerError
from sanitizer.models import CompactCNN
from sanitizer.sketch import CountSketch, KroneckerSketch


def small_mlp(d_in=12, hidden=7, classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def autograd_last_layer(model, x, y):
    last = model[-1]
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([last.weight.grad, last.bias.grad[:, None]], 1).reshape(-1).clone())
    return torch.stack(rows)


def test_last_layer_equals_per_example_autograd_float64():
    model = small_mlp().double()
    x = torch.randn(20, 12, dtype=torch.float64)
    y = torch.randint(0, 4, (20,))
    emb = gradient_embeddings(model, TensorDataset(x, y), embedding="last_layer", batch_size=6, dtype=torch.float64)
    torch.testing.assert_close(emb, autograd_last_layer(model, x, y), rtol=1e-10, atol=1e-12)


def test_logits_embedding_is_softmax_minus_onehot():
    model = small_mlp()
    x, y = torch.randn(9, 12), torch.randint(0, 4, (9,))
    emb = gradient_embeddings(model, TensorDataset(x, y), embedding="logits")
    expected = torch.softmax(model(x), 1) - F.one_hot(y, 4)
    torch.testing.assert_close(emb, expected.detach(), rtol=1e-5, atol=1e-6)


def test_params_kind_matches_autograd_when_not_sketched():
    model = small_mlp().double()
    x, y = torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 4, (5,))
    names = ["3.weight", "3.bias"]
    emb = gradient_embeddings(model, TensorDataset(x, y), embedding="params", params=names, max_dim=10_000,
                              dtype=torch.float64)
    expected = []
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected.append(torch.cat([model[3].weight.grad.reshape(-1), model[3].bias.grad]))
    torch.testing.assert_close(emb, torch.stack(expected), rtol=1e-8, atol=1e-10)


def test_sketched_last_layer_preserves_distances():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 300), nn.ReLU(), nn.Linear(300, 10))
    x, y = torch.randn(80, 32), torch.randint(0, 10, (80,))
    ds = TensorDataset(x, y)
    exact = gradient_embeddings(model, ds, max_dim=10**6)
    sketched = gradient_embeddings(model, ds, max_dim=2048, seed=3)
    assert exact.shape[1] == 10 * 301 and sketched.shape[1] <= 2048
    d_exact = torch.pdist(exact.double())
    d_sketch = torch.pdist(sketched.double())
    rel = (d_sketch / d_exact - 1).abs()
    # Stated tolerance: median relative distance error < 5%, 99th percentile < 15% at 2048 dims.
    assert rel.median() < 0.05
    assert torch.quantile(rel, 0.99) < 0.15
    # Seeded: the same seed gives the same sketch, another seed a different one.
    torch.testing.assert_close(sketched, gradient_embeddings(model, ds, max_dim=2048, seed=3))
    assert not torch.allclose(sketched, gradient_embeddings(model, ds, max_dim=2048, seed=4))


def test_kronecker_sketch_is_the_projection_of_the_outer_product():
    sk = KroneckerSketch(num_classes=50, feature_dim=40, out_dim=256, seed=0, dtype=torch.float64)
    e, h = torch.randn(3, 50, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    assert sk.class_proj is not None  # 50 classes: both factors projected
    full = torch.kron(sk.class_proj, sk.feature_proj)
    outer = (e[:, :, None] * h[:, None, :]).reshape(3, -1)
    torch.testing.assert_close(sk(e, h), outer @ full.T)


def test_count_sketch_norm_error_shrinks_with_dimension():
    x = torch.randn(200, 5000, dtype=torch.float64)
    errors = []
    for m in (64, 1024):
        s = CountSketch(5000, m, seed=0)(x)
        errors.append(((s.norm(dim=1) / x.norm(dim=1)) - 1).abs().mean().item())
    assert errors[1] < errors[0] / 2
    assert errors[1] < 0.05


def test_eval_mode_during_embedding_and_modes_restored():
    model = CompactCNN(1, 3, width=4)
    model.train()
    model.features[0][1].eval()  # a submodule in its own mode must stay so
    seen = []
    model.classifier.register_forward_pre_hook(lambda m, i: seen.append(model.training))
    ds = ImageTensorDataset(torch.rand(10, 1, 8, 8), torch.arange(10) % 3)
    gradient_embeddings(model, ds)
    assert seen and not any(seen)
    assert model.training and not model.features[0][1].training


def test_dataset_with_extra_fields_and_indices_subset():
    model = small_mlp()
    x, y = torch.randn(10, 12), torch.randint(0, 4, (10,))
    extra = TensorDataset(x, y, torch.arange(10))
    full = gradient_embeddings(model, extra, embedding="logits")
    sub = gradient_embeddings(model, extra, embedding="logits", indices=[7, 2])
    torch.testing.assert_close(sub, full[[7, 2]])


def test_find_last_linear_and_error_without_one():
    model = small_mlp()
    assert find_last_linear(model, torch.randn(2, 12)) is model[-1]
    conv_only = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ds = TensorDataset(torch.randn(4, 1, 5, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(SanitizerError, match="nn.Linear"):
        gradient_embeddings(conv_only, ds)
    # logits still work: they do not need the last layer
    assert gradient_embeddings(conv_only, ds, embedding="logits").shape == (4, 3)


def test_bad_inputs_give_clear_errors():
    model = small_mlp()

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(12), 0

    with pytest.raises(SanitizerError, match="IterableDataset"):
        gradient_embeddings(model, Stream())
    with pytest.raises(SanitizerError, match="out of range"):
        gradient_embeddings(model, TensorDataset(torch.randn(3, 12), torch.tensor([0, 1, 9])))
    with pytest.raises(SanitizerError, match="unknown embedding"):
        gradient_embeddings(model, TensorDataset(torch.randn(3, 12), torch.zeros(3, dtype=torch.long)), embedding="x")
    with pytest.raises(SanitizerError, match="NaN"):
        gradient_embeddings(model, TensorDataset(torch.full((3, 12), float("nan")), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(SanitizerError, match="device"):
        gradient_embeddings(model, TensorDataset(torch.randn(3, 12), torch.zeros(3, dtype=torch.long)),
                            device="cuda")


def test_embeddings_are_finite_numpy_compatible():
    model = CompactCNN(1, 10, width=4)
    ds = ImageTensorDataset(torch.rand(16, 1, 8, 8), torch.arange(16) % 10)
    emb = gradient_embeddings(model, ds, max_dim=64)
    assert emb.shape[0] == 16 and emb.shape[1] <= 64
    assert np.isfinite(emb.numpy()).all()


class TwoHeads(nn.Module):
    """Returns ``(features, logits)`` (or ``(logits, features)`` with ``logits_first``)."""

    def __init__(self, hidden=7, classes=4, logits_first=False):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.logits_first = nn.Linear(12, hidden), nn.Linear(hidden, classes), logits_first

    def forward(self, x):
        h = torch.tanh(self.body(x))
        z = self.head(h)
        return (z, h) if self.logits_first else (h, z)

    def plain(self):
        return nn.Sequential(self.body, nn.Tanh(), self.head)


@pytest.mark.parametrize("logits_first", [False, True])
@pytest.mark.parametrize("kind", ["last_layer", "logits", "features"])
def test_a_tuple_output_is_read_by_shape_not_position(logits_first, kind):
    model = TwoHeads(logits_first=logits_first)
    ds = TensorDataset(torch.randn(10, 12), torch.arange(10) % 4)
    expected = gradient_embeddings(model.plain(), ds, embedding=kind)
    torch.testing.assert_close(gradient_embeddings(model, ds, embedding=kind, num_classes=4), expected)
    torch.testing.assert_close(gradient_embeddings(model, ds, embedding=kind, last_layer=model.head), expected)
    with pytest.raises(SanitizerError, match=r"\(\d+, 7\).*\(\d+, 4\)|\(\d+, 4\).*\(\d+, 7\)") as info:
        gradient_embeddings(model, ds, embedding=kind)  # no num_classes: two 2-D tensors, no guess
    assert "last_layer=" in str(info.value) and "num_classes=" in str(info.value)


def test_an_ambiguous_tuple_is_refused_unless_the_last_layer_is_named():
    model = TwoHeads(hidden=4, classes=4)  # features and logits both [B, 4]
    ds = TensorDataset(torch.randn(6, 12), torch.arange(6) % 4)
    with pytest.raises(SanitizerError, match=r"2 of its elements are \[batch, 4\] tensors.*last_layer="):
        gradient_embeddings(model, ds, num_classes=4)
    with pytest.raises(SanitizerError, match="none of its elements is a \\[batch, 5\\] tensor"):
        find_last_linear(model, torch.randn(2, 12), num_classes=5)
    torch.testing.assert_close(gradient_embeddings(model, ds, num_classes=4, last_layer=model.head),
                               gradient_embeddings(model.plain(), ds))


def test_logits_of_reads_tensors_attributes_and_mappings():
    z = torch.randn(3, 4)
    assert logits_of(z) is z and logits_of({"logits": z, "loss": z.sum()}) is z
    assert logits_of((z.sum(), z)) is z  # a scalar loss beside the logits is no ambiguity
    with pytest.raises(SanitizerError, match="type int"):
        logits_of(3)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0.0, 1.7, 2.0]), "label 1.7 at index 1 is not an integer"),
    (torch.tensor([0.0, float("nan"), 2.0]), "label nan"),
])
def test_float_labels_in_a_dataset_are_refused_not_truncated(labels, message):
    model = small_mlp()
    with pytest.raises(SanitizerError, match=message):
        gradient_embeddings(model, TensorDataset(torch.randn(3, 12), labels))
    whole = gradient_embeddings(model, TensorDataset(torch.randn(3, 12), torch.tensor([0.0, 1.0, 2.0])))
    assert whole.shape[0] == 3  # integer-valued floats are class indices


def test_string_labels_in_a_dataset_are_refused():
    class Named(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(12), "cat"

    with pytest.raises(SanitizerError, match="integer class indices, got \\('cat'"):
        gradient_embeddings(small_mlp(), Named())


def test_model_device_and_eval_mode_serve_lists_and_callables():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    assert model_device(model) == torch.device("cpu") and model_device(lambda x: x) == torch.device("cpu")
    model.train()
    with EvalMode([model, len], dropout=True):
        assert not model.training and model[1].training
    with EvalMode(model):
        assert not model[1].training
    assert model.training and model[1].training


def test_one_word_for_the_embedding_across_the_api():
    """``embedding=`` names the embedding in gradient_embeddings, Sanitizer and Policy alike; the old
    ``kind=`` still works with a DeprecationWarning, and a policy subclass using the old attribute name
    is refused instead of being silently ignored."""
    from sanitizer import Sanitizer
    from sanitizer.policies.base import Policy

    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(9, 12), torch.arange(9) % 3)
    new = gradient_embeddings(model, data, embedding="logits")
    with pytest.warns(DeprecationWarning, match="embedding="):
        old = gradient_embeddings(model, data, kind="logits")
    assert torch.equal(new, old) and new.shape == (9, 3)
    with pytest.raises(SanitizerError, match="unknown embedding 'grads'"):
        Sanitizer(model, data, embedding="grads", epochs=4)
    with pytest.raises(SanitizerError, match="embedding_kind is now called embedding"):
        type("OldStylePolicy", (Policy,), {"embedding_kind": "features"})


class _ViewNet(nn.Module):
    """A conv net whose forward reshapes with .view(), which a channels-last batch cannot take."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


class _Contiguous(nn.Module):
    """The reference: the same network on an ordinary-layout batch."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.contiguous())


@pytest.mark.parametrize("make", [lambda: CompactCNN(3, 5, 4), _ViewNet], ids=["compact_cnn", "view_reshape"])
def test_cpu_image_passes_in_channels_last_equal_the_ordinary_layout(make):
    torch.manual_seed(1)
    data = TensorDataset(torch.rand(40, 3, 6, 6), torch.randint(0, 5, (40,)))
    net = make()
    fast = gradient_embeddings(net, data, embedding="last_layer", batch_size=16)
    reference = gradient_embeddings(_Contiguous(net), data, embedding="last_layer", batch_size=16)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    assert next(net.parameters()).is_contiguous()  # the model's weights are left as they were


@pytest.mark.parametrize("make", [lambda: CompactCNN(3, 5, 4), _ViewNet], ids=["compact_cnn", "view_reshape"])
def test_training_in_channels_last_follows_the_ordinary_layout(make):
    from sanitizer.train import TrainConfig, predict_proba, train_classifier

    torch.manual_seed(2)
    data = ImageTensorDataset(torch.rand(64, 3, 6, 6), torch.randint(0, 5, (64,)), None, 5)
    models = []
    for channels_last in (True, False):
        torch.manual_seed(3)
        net = make()
        train_classifier(net, data, TrainConfig(epochs=1, lr=0.01, batch_size=16, augment=False, seed=0,
                                                channels_last=channels_last))
        models.append(net)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # four steps apart only by rounding
    reference = predict_proba(_Contiguous(models[0]), data.images)
    torch.testing.assert_close(predict_proba(models[0], data.images), reference, rtol=1e-4, atol=1e-5)
