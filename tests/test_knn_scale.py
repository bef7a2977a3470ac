"""Exact blockwise kNN, the factored kNN of last-layer gradients, and the approximate path for large classes."""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import pytest
import torch

from sanitizer import neighbors
from sanitizer.neighbors import (
    GROUP,
    _smallest_k,
    class_isolation,
    class_isolation_factored,
    exact_knn_blocked,
    knn,
    knn_factored,
    pca_projection,
)


def faiss_exact(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: faiss's flat index, self dropped."""
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    d2, idx = index.search(x, k + 1)
    keep = idx != np.arange(len(x))[:, None]
    missing = keep.all(1)  # rows whose self was not returned (ties): drop the farthest instead
    keep[missing, -1] = False
    return np.sqrt(np.maximum(d2[keep].reshape(len(x), k), 0)), idx[keep].reshape(len(x), k)


def assert_same_neighbours(dist, idx, ref_dist, ref_idx, x, rtol=1e-4, atol=1e-4):
    """Distances agree to float tolerance and the neighbour sets agree up to ties: every index we
    return is really at the distance we report, and that distance is within tolerance of the reference."""
    np.testing.assert_allclose(dist, ref_dist, rtol=rtol, atol=atol)
    true = np.linalg.norm(x[idx] - x[:, None], axis=2)
    np.testing.assert_allclose(true, dist, rtol=rtol, atol=atol)
    assert not (idx == np.arange(len(x))[:, None]).any()
    differ = (idx != ref_idx).mean()
    assert differ < 0.01, f"{differ:.2%} of neighbours differ beyond ties"


def last_layer_factors(n=700, classes=10, hidden=32, seed=0):
    """e = softmax(z) − onehot(y) and h1 = [h; 1], as gradient_embeddings computes them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(n, hidden, generator=g) + 0.5)
    z = h @ torch.randn(hidden, classes, generator=g) * 0.3
    y = torch.zeros(n, dtype=torch.long)  # one class, as the policy searches within a class
    e = torch.softmax(z, 1) - torch.nn.functional.one_hot(y, classes).float()
    h1 = torch.cat([h, torch.ones(n, 1)], 1)
    return e.numpy(), h1.numpy()


def test_smallest_k_two_stage_is_exact_with_ties():
    torch.manual_seed(0)
    g = torch.randint(0, 50, (64, 40 * GROUP)).float()  # many ties
    g[:, -7:] = float("inf")
    val, idx = _smallest_k(g, 10)
    ref_val, _ = torch.topk(g, 10, dim=1, largest=False)
    torch.testing.assert_close(val, ref_val)
    torch.testing.assert_close(torch.gather(g, 1, idx), val)
    assert all(len(set(r.tolist())) == 10 for r in idx)


@pytest.mark.parametrize("n,dim", [(300, 7), (2000, 64), (130, 256)])
def test_exact_blocked_matches_faiss(n, dim):
    x = np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32)
    d2, idx = exact_knn_blocked(torch.from_numpy(x), 9, block=97)  # blocks that do not divide n
    assert_same_neighbours(np.sqrt(d2.numpy()), idx.numpy(), *faiss_exact(x, 9), x)
    dist, idx2 = knn(x, 9)  # auto on the CPU: the same kernel below ivf_threshold
    assert_same_neighbours(dist, idx2, *faiss_exact(x, 9), x)


def test_factored_matches_faiss_on_the_explicit_outer_product():
    e, h = last_layer_factors()
    explicit = (e[:, :, None] * h[:, None, :]).reshape(len(e), -1)
    ref_dist, ref_idx = faiss_exact(explicit, 10)
    for block in (None, 128, 999):
        dist, idx = knn_factored(e, h, 10, block=block)
        assert_same_neighbours(dist, idx, ref_dist, ref_idx, explicit)
    # torch inputs and float64 inputs give the same answer
    dist_t, idx_t = knn_factored(torch.from_numpy(e).double(), torch.from_numpy(h), 10)
    np.testing.assert_allclose(dist_t, ref_dist, rtol=1e-4, atol=1e-4)


def test_factored_isolation_equals_explicit_isolation_with_duplicates():
    e, h = last_layer_factors(n=400, seed=1)
    e[:5], h[:5] = e[5], h[5]  # six copies of one example count once
    explicit = (e[:, :, None] * h[:, None, :]).reshape(len(e), -1)
    with pytest.warns(UserWarning, match="duplicate"):
        ours = class_isolation_factored(e, h, 7)
    with pytest.warns(UserWarning, match="duplicate"):
        ref = class_isolation(explicit, 7, backend="faiss")
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    assert len(set(ours[:6])) == 1


def test_factored_checks_its_inputs():
    e, h = last_layer_factors(n=20)
    with pytest.raises(ValueError, match="same n"):
        knn_factored(e, h[:10], 3)
    with pytest.raises(ValueError, match="k must be"):
        knn_factored(e, h, 20)


def low_rank(n, dim=128, rank=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, rank)) @ rng.normal(size=(rank, dim)) + 0.01 * rng.normal(size=(n, dim))).astype(
        np.float32)


def test_pca_projection_keeps_the_variance_or_declines():
    mean, basis = pca_projection(low_rank(3000))
    assert basis.shape == (128, 16) and np.allclose(basis.T @ basis, np.eye(16), atol=1e-5)
    isotropic = np.random.default_rng(0).normal(size=(3000, 128)).astype(np.float32)
    assert pca_projection(isotropic) is None


@pytest.mark.parametrize("data", ["low_rank", "isotropic"])
def test_hnsw_path_above_the_threshold_has_high_recall(data):
    x = low_rank(4000) if data == "low_rank" else np.random.default_rng(1).normal(size=(4000, 16)).astype(np.float32)
    exact, exact_idx = knn(x, 10, backend="torch")
    approx, idx = knn(x, 10, backend="faiss", ivf_threshold=1000)
    # Approximate distances are true distances of real neighbours, never below the exact k-NN.
    true = np.linalg.norm(x[idx] - x[:, None], axis=2)
    np.testing.assert_allclose(approx, true, rtol=1e-4, atol=1e-4)
    assert (approx >= exact - 1e-4).all()
    assert not (idx == np.arange(len(x))[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact_idx)])
    assert recall >= 0.95
    # the old inverted-file index stays available
    ivf, _ = knn(x, 10, backend="faiss", ivf_threshold=1000, approximate="ivf", nprobe=32)
    assert (ivf >= exact - 1e-4).all()


def test_the_density_policy_takes_the_factored_path_on_explicit_last_layer_rows_only():
    """gradient_embeddings' explicit last-layer rows are outer products: the policy recognises them and
    computes the same scores with the factored kNN; sketched rows or features are left to the explicit path."""
    from sanitizer import make_policy
    from sanitizer.embeddings import gradient_embeddings
    from sanitizer.neighbors import outer_product_factors

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 6, generator=gen), torch.arange(300) % 3
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = torch.utils.data.TensorDataset(x, y)
    explicit = gradient_embeddings(model, data).numpy()
    factors = outer_product_factors(explicit, 3)
    assert factors is not None
    np.testing.assert_allclose((factors[0][:, :, None] * factors[1][:, None, :]).reshape(300, -1), explicit,
                               rtol=1e-5, atol=1e-6)
    sketched = gradient_embeddings(model, data, max_dim=16).numpy()  # 3 × 9 > 16: Kronecker-sketched
    assert outer_product_factors(sketched, 3) is None
    assert outer_product_factors(gradient_embeddings(model, data, embedding="features").numpy(), 3) is None
    assert outer_product_factors(explicit + 1e-2 * np.random.default_rng(0).normal(size=explicit.shape), 3) is None

    factored = make_policy("density").select(explicit, y.numpy(), num_classes=3)
    reference = make_policy("density", backend="faiss").select(explicit, y.numpy(), num_classes=3)
    np.testing.assert_allclose(factored.scores, reference.scores, rtol=1e-3, atol=1e-3)
    assert np.array_equal(factored.keep, reference.keep)


def test_classes_above_the_exact_limit_leave_the_quadratic_factored_path(monkeypatch):
    """The factored kNN is exact and O(n²) per class: a 100k-point class would take minutes. Above
    EXACT_LIMIT the policy searches the explicit rows (approximately) instead; below it, factored."""
    import sanitizer.policies.density as density_module
    from sanitizer import make_policy

    e, h = last_layer_factors(n=400, classes=4)
    explicit = (e[:, :, None] * h[:, None, :]).reshape(len(e), -1)
    y = np.arange(400) % 2  # two classes of 200
    calls = []
    real = density_module.class_isolation_factored
    monkeypatch.setattr(density_module, "class_isolation_factored",
                        lambda *args: calls.append(len(args[0])) or real(*args))
    below = make_policy("density").select(explicit, y, num_classes=4)
    assert calls == [200, 200]
    monkeypatch.setattr(density_module, "EXACT_LIMIT", 199)
    above = make_policy("density").select(explicit, y, num_classes=4)
    assert calls == [200, 200], "a class above the limit went through the factored kNN"
    np.testing.assert_allclose(above.scores, below.scores, rtol=1e-3, atol=1e-3)  # 200 points: still exact


def test_graph_answers_below_the_recall_floor_fall_back_to_exact_search(monkeypatch):
    """An HNSW graph on 64 isotropic dimensions misses true neighbours; its answer is used only when its
    sampled recall reaches the floor, else the rows are searched exactly."""
    x = np.random.default_rng(2).normal(size=(1500, 64)).astype(np.float32)
    exact, exact_idx = knn(x, 10, backend="torch")
    found, idx = knn(x, 10, backend="faiss", ivf_threshold=1000)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact_idx)]) >= 0.93  # floor 0.95, sampled
    monkeypatch.setattr(neighbors, "RECALL_FLOOR", 1.01)  # no graph answer is good enough: exact
    found, idx = knn(x, 10, backend="faiss", ivf_threshold=1000)
    np.testing.assert_allclose(found, exact, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(neighbors, "EXACT_WARN_ROWS", 1000)  # on a large set the quadratic fallback is announced
    with pytest.warns(UserWarning, match="searching them exactly"):
        knn(x, 10, backend="faiss", ivf_threshold=1000)


def test_a_graph_search_below_the_floor_is_widened_before_the_exact_fallback(monkeypatch):
    """The exact fallback is quadratic (tens of minutes on a million rows): efSearch doubles up to 8x first."""
    x = low_rank(3000)
    recalls = iter([0.90, 0.93, 0.97])  # the third search (4x efSearch) reaches the floor
    checked, exact = [], []
    monkeypatch.setattr(neighbors, "sampled_recall", lambda *a, **kw: checked.append(1) or next(recalls))
    monkeypatch.setattr(neighbors, "exact_knn_blocked", lambda *a, **kw: exact.append(1))
    d, idx = knn(x, 10, backend="faiss", ivf_threshold=1000)
    assert len(checked) == 3 and exact == [] and idx.shape == (3000, 10)
    assert neighbors.HNSW_EF_FACTORS == (1, 2, 4, 8)


def test_rows_of_more_raw_dimensions_than_a_graph_takes_are_searched_exactly(monkeypatch):
    x = np.random.default_rng(3).normal(size=(1200, 160)).astype(np.float32)  # isotropic: no PCA summary
    built = []
    monkeypatch.setattr(neighbors.faiss, "IndexHNSWFlat", lambda *a: built.append(a) or None)
    found, _ = knn(x, 5, backend="faiss", ivf_threshold=1000)
    exact, _ = knn(x, 5, backend="torch")
    assert built == []
    np.testing.assert_allclose(found, exact, rtol=1e-4, atol=1e-4)


def class_features(n=6000, classes=10, dim=24, seed=5):
    """Penultimate-feature-like rows: one compact blob per class, as a trained network makes them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 4
    return (centres[np.arange(n) % classes] + rng.normal(size=(n, dim))).astype(np.float32)


def test_cluster_lists_find_the_neighbours_of_class_features_and_fall_back_when_they_cannot(monkeypatch):
    x = class_features()
    exact, exact_idx = knn(x, 10, backend="torch")
    found = neighbors._knn_clusters(x, 11, seed=0)
    assert found is not None  # compact classes: the lists' answer passes its own recall check
    d, idx = neighbors._drop_self(*found, 10)
    true = np.linalg.norm(x[idx] - x[:, None], axis=2)
    np.testing.assert_allclose(d, true, rtol=1e-4, atol=1e-4)  # real distances of real neighbours
    assert (d >= exact - 1e-4).all()
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact_idx)]) >= 0.95
    # through knn: the lists' answer is what comes back, its upper tail searched again exactly (repair_tail)
    via_knn = knn(x, 10, backend="faiss", ivf_threshold=1000, approximate="clusters")
    repaired = np.abs(via_knn[0] - d).max(1) > 1e-5
    np.testing.assert_allclose(via_knn[0][~repaired], d[~repaired], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(via_knn[0][repaired], exact[repaired], rtol=1e-4, atol=1e-4)
    # isotropic rows in 64 dimensions: the lists would have to cover too many pairs, so they decline
    iso = np.random.default_rng(6).normal(size=(3000, 64)).astype(np.float32)
    assert neighbors._knn_clusters(iso, 11, seed=0) is None
    # one mass of identical rows beside the classes (zero gradients of confidently fit examples): no k-means
    # can split it, so one list holds most rows and the search would cover most pairs: declined
    mass = np.concatenate([x, np.zeros((20000, 24), np.float32)])
    assert neighbors._knn_clusters(mass, 11, seed=0) is None
    # above CLUSTER_MAX_ROWS (lists cost ~n²/8 pairs, a graph ~n log n) the graph answers directly
    tried = []
    monkeypatch.setattr(neighbors, "CLUSTER_MAX_ROWS", len(x) - 1)
    with monkeypatch.context() as patch:
        patch.setattr(neighbors, "_knn_clusters", lambda *a: tried.append(a) or None)
        knn(x, 10, backend="faiss", ivf_threshold=1000, approximate="clusters")
    assert tried == []
    # a declined or failed answer goes on to the graph, then to exact search
    monkeypatch.setattr(neighbors, "RECALL_FLOOR", 1.01)
    found, _ = knn(iso, 10, backend="faiss", ivf_threshold=1000, approximate="clusters")
    np.testing.assert_allclose(found, knn(iso, 10, backend="torch")[0], rtol=1e-4, atol=1e-4)


def test_sampled_recall_matches_the_recall_of_every_row():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    true = np.argsort(d2, 1)[:, :6]  # self included, as a search of x against itself returns it
    assert neighbors.sampled_recall(x, true, sample=600) == 1.0
    spoiled = true.copy()
    wrong = rng.random(spoiled.shape) < 0.3
    wrong[:, 0] = False
    spoiled[wrong] = np.argsort(d2, 1)[:, -1:].repeat(6, 1)[wrong]  # the farthest row instead
    full = 1 - wrong.mean()
    assert neighbors.sampled_recall(x, spoiled, sample=600) == pytest.approx(full, abs=1e-6)
    assert neighbors.sampled_recall(x, spoiled, sample=200) == pytest.approx(full, abs=0.06)


def test_sampled_recall_sees_wrong_neighbours_among_rows_of_small_norm():
    """Confident examples' gradient rows are tiny beside the others: a wrong neighbour among them is still a
    miss, although its distance is far below the largest row's rounding."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=(300, 8)), 1e-4 * rng.normal(size=(300, 8))]).astype(np.float32)
    d2 = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    order = np.argsort(d2, 1)
    true = order[:, :6]
    assert neighbors.sampled_recall(x, true, sample=600) == 1.0
    spoiled = true.copy()
    spoiled[300:, 1:] = order[300:, 200:205]  # far among the small rows, yet 1e-8 apart
    assert neighbors.sampled_recall(x, spoiled, sample=600) == pytest.approx(1 - 300 * 5 / 3600, abs=1e-6)


@pytest.mark.parametrize("collide", [False, True])
def test_deduplicate_groups_equal_rows_even_when_hashes_collide(monkeypatch, collide):
    rng = np.random.default_rng(6)
    base = rng.normal(size=(50, 7)).astype(np.float32)
    x = base[rng.integers(0, 50, 300)]  # many copies, 7 floats = 28 bytes (not a multiple of 8)
    if collide:  # every row the same hash: the byte comparison must notice and sort the rows instead
        monkeypatch.setattr(neighbors, "_row_hashes", lambda rows: np.zeros(len(rows), np.uint64))
    unique, inverse = neighbors.deduplicate(x)
    np.testing.assert_array_equal(unique[inverse], x)
    assert len(unique) == len(np.unique(x, axis=0))


def test_flush_tiny_zeroes_only_what_no_distance_can_see():
    x = torch.tensor([[1.0, 1e-20, -3e-16], [2.0, -1e-39, 0.5]])
    out = neighbors.flush_tiny(x)
    assert out[0, 1] == 0 and out[1, 1] == 0 and out[0, 2] == 0  # below 2 · 2^-50
    assert out[0, 0] == 1 and out[1, 0] == 2 and out[1, 2] == 0.5
    assert x[0, 1] == 1e-20  # the input is left alone
    plain = torch.tensor([[1.0, 0.0], [0.25, 3.0]])
    assert neighbors.flush_tiny(plain) is plain


def test_knn_of_rows_with_subnormal_products_keeps_its_distances(monkeypatch):
    """Softmax errors of confident predictions (1e-20 and below) make subnormal products in the distance
    matmul, which x86 CPUs compute 50–90× slower; the searches flush them and keep the same distances."""
    flushed = []
    real = neighbors.flush_tiny
    monkeypatch.setattr(neighbors, "flush_tiny", lambda t: flushed.append(real(t) is not t) or real(t))
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 32))
    x[:, 16:] *= 1e-22  # a block of tiny entries, as softmax − onehot of confident predictions has
    found, idx = knn(x.astype(np.float32), 6)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(found, np.sort(d, 1)[:, :6], rtol=1e-4, atol=1e-5)
    e = rng.normal(size=(300, 10)) * np.where(rng.random((300, 10)) < 0.5, 1e-21, 1.0)
    h = rng.random((300, 9))
    dist_f, _ = knn_factored(e, h, 5)
    rows = (e[:, :, None] * h[:, None, :]).reshape(300, -1)
    d = np.sqrt(((rows[:, None] - rows[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(dist_f, np.sort(d, 1)[:, :5], rtol=1e-4, atol=1e-5)
    assert any(flushed[:1]) and flushed.count(True) >= 2  # knn's rows and the factored search's e


def test_knn_takes_read_only_arrays_without_a_warning():
    x = np.random.default_rng(6).random((60, 8)).astype(np.float32)
    x.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist, idx = knn(x, 3)
    assert dist.shape == (60, 3) and not (idx == np.arange(60)[:, None]).any()


def test_softmax_errors_of_confident_predictions_are_flushed_at_the_source():
    from sanitizer.embeddings import _embed_batch

    z = torch.tensor([[60.0, 0.0, -40.0], [0.0, 1.0, 0.5]])  # row 0: other-class probabilities ~1e-26, 1e-44
    e, _ = _embed_batch(z, torch.tensor([0, 1]), torch.ones(2, 4), "last_layer", 3, torch.float32)
    expected = torch.softmax(z, 1) - torch.nn.functional.one_hot(torch.tensor([0, 1]), 3)
    assert torch.count_nonzero(e[0]) == 0  # 1 − p rounds to 0 in float32, and the rest is flushed
    torch.testing.assert_close(e[1], expected[1])


@pytest.mark.parametrize("options", [dict(backend="torch"), dict(backend="faiss"),
                                     dict(backend="faiss", ivf_threshold=1000, approximate="clusters"),
                                     dict(backend="faiss", ivf_threshold=1000, approximate="hnsw")])
def test_the_neighbours_of_some_queries_are_those_rows_of_the_full_search(options):
    x = class_features()
    queries = np.sort(np.random.default_rng(0).choice(len(x), 500, replace=False))
    full_d, full_idx = knn(x, 10, **options)
    d, idx = knn(x, 10, queries=queries, **options)
    assert d.shape == idx.shape == (500, 10)
    assert not (idx == queries[:, None]).any()  # never one's own neighbour
    np.testing.assert_allclose(d, full_d[queries], rtol=1e-4, atol=1e-4)
    assert np.mean(idx == full_idx[queries]) >= 0.99  # (ties may swap)


def test_rows_whose_factors_would_overflow_take_the_explicit_path():
    """Found by hypothesis: a bias gradient of 3.9e-38 makes h = 1 / 3.9e-38, whose squared norm overflows
    float32, and the factored isolation came out inf and NaN."""
    from sanitizer import select
    from sanitizer.neighbors import outer_product_factors

    x = np.array([[0, 0, 0, 1], [0, 0, 1, 3.87991323e-38], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1]], np.float32)
    assert outer_product_factors(x, 2) is None
    assert outer_product_factors(np.array([[0, 0, 2, 1], [0, 0, 1, 0.5]], np.float32), 2) is not None
    sel = select(x, np.array([1, 1, 1, 0, 1]), policy="density", num_classes=2)
    assert np.isfinite(sel.scores).all()


def test_reranking_by_faiss_equals_the_torch_gather_and_keeps_missing_candidates_last(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 40)).astype(np.float32)
    candidates = rng.integers(0, 500, size=(500, 12))
    candidates[:5, -3:] = -1  # a graph can return fewer candidates than asked
    d2, idx = neighbors.rerank(x, candidates, 8)
    true = ((x[idx] - x[:, None]) ** 2).sum(2)
    np.testing.assert_allclose(d2, true, rtol=1e-4, atol=1e-4)  # exact squared distances of what it returns
    assert (np.diff(d2, axis=1) >= 0).all() and (idx >= 0).all()
    only_self = np.full((500, 12), -1)
    only_self[:, 0] = np.arange(500)
    lone_d2, lone_idx = neighbors.rerank(x, only_self, 2)
    assert (lone_idx[:, 1] == -1).all() and np.isinf(lone_d2[:, 1]).all() and (lone_d2[:, 0] < 1e-3).all()
    monkeypatch.setattr(neighbors, "faiss", None)  # the torch path, as without faiss
    d2_torch, idx_torch = neighbors.rerank(x, candidates, 8)
    np.testing.assert_allclose(d2, d2_torch, rtol=1e-4, atol=1e-4)
    assert np.mean(idx == idx_torch) > 0.99  # (ties may swap)


def test_the_tail_of_an_approximate_answer_is_searched_again_exactly(monkeypatch):
    """repair_tail: rows handed far-off neighbours (a stranded row of a graph) or missing ones land in the upper
    tail of mean neighbour distance and are searched again exactly; the other rows keep their answer."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    d2, idx = (t.numpy() for t in neighbors.exact_knn_blocked(torch.from_numpy(x), 11))
    # exact_knn_blocked leaves self out: put it first, as a search of x against itself returns it
    d2 = np.concatenate([np.zeros((3000, 1), np.float32), d2], 1)
    idx = np.concatenate([np.arange(3000)[:, None], idx], 1)
    spoiled_d2, spoiled_idx = d2.copy(), idx.copy()
    stranded = np.array([5, 700, 2999])
    far = np.argsort(((x - x[5]) ** 2).sum(1))[-11:]  # the rows farthest from row 5
    spoiled_idx[stranded, 1:] = far
    spoiled_d2[stranded, 1:] = ((x[stranded, None] - x[far][None]) ** 2).sum(-1)
    spoiled_idx[1234, 3] = -1  # a missing neighbour
    spoiled_d2[1234, 3] = np.inf
    fixed_d2, fixed_idx = neighbors.repair_tail(x, spoiled_d2, spoiled_idx)
    for row in [*stranded, 1234]:
        assert set(fixed_idx[row]) == set(idx[row])
        np.testing.assert_allclose(np.sort(fixed_d2[row]), np.sort(d2[row]), rtol=1e-4, atol=1e-4)
    untouched = np.setdiff1d(np.arange(3000), [*stranded, 1234])
    tail = neighbors.robust_zscore(np.log(np.sqrt(d2).mean(1) + 1e-12)) > neighbors.TAIL_Z
    assert np.array_equal(fixed_idx[untouched[~tail[untouched]]], spoiled_idx[untouched[~tail[untouched]]])
    # a budget of two rows' worth of entries: the missing row first, then the farthest out
    monkeypatch.setattr(neighbors, "TAIL_MAX_ENTRIES", 2 * len(x))
    capped_d2, capped_idx = neighbors.repair_tail(x, spoiled_d2, spoiled_idx)
    repaired = np.flatnonzero((capped_idx != spoiled_idx).any(1))
    assert sorted(repaired) == [5, 1234]  # row 5's neighbours are the farthest of all (they were chosen so)
    monkeypatch.undo()
    # with queries: the answer's rows are those of `rows` (the tail is judged among them)
    q = np.r_[700, np.arange(0, 3000, 2)]
    part_d2, part_idx = neighbors.repair_tail(x, spoiled_d2[q], spoiled_idx[q], q)
    assert set(part_idx[0]) == set(idx[700])


def test_a_graph_that_strands_a_row_is_repaired_in_knn():
    """The case that showed it: HNSW over these 6,000 class-feature rows hands one row neighbours ~24 units away
    where its true ones are ~3.5 (the sampled recall check still passes). Every row of the upper tail now gets
    its exact neighbours, so an isolation score cannot flag a row because of the graph."""
    x = class_features()
    exact, _ = knn(x, 10, backend="torch")
    found, _ = knn(x, 10, backend="faiss", ivf_threshold=1000, approximate="hnsw")
    tail = neighbors.robust_zscore(np.log(found.mean(1))) > neighbors.TAIL_Z
    assert tail.any()
    np.testing.assert_allclose(found[tail], exact[tail], rtol=1e-4, atol=1e-4)  # the tail: exact
    assert np.abs(found - exact).max() < 1.0  # (the stranded row was 20 units off before the repair)
    assert (found >= exact - 1e-4).all()  # approximate distances are never below the exact ones
    # scores at a cut of 3: the tail's distances are exact, the bulk's centre and spread move by rounding, so a
    # decision can differ only for a row that sits on the cut
    z_found = neighbors.robust_zscore(np.log(found.mean(1)))
    z_exact = neighbors.robust_zscore(np.log(exact.mean(1)))
    differ = (z_found > 3) != (z_exact > 3)
    assert (z_exact > 3).sum() >= 10 and np.abs(z_exact[differ] - 3).max(initial=0) < 0.05
