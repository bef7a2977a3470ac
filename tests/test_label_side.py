"""The density policy's label side (sanitizer.label_agreement): it finds randomly flipped labels and stays
closed on clean labels, even when the classes overlap."""

import numpy as np
import pytest
from planted import last_layer_rows

from sanitizer.label_agreement import gate_ratio, label_agreement, mislabelled
from sanitizer.neighbors import outer_product_factors
from sanitizer.policies.density import DensityPolicy


def second_round_policy(**options) -> DensityPolicy:
    policy = DensityPolicy(**options)
    policy.start_round(1)  # the label side acts from the second round on
    return policy


def test_agreement_counts_the_neighbours_that_share_the_label():
    f = np.array([[1.0, 0.0], [0.9, 0.1], [0.95, 0.05], [0.0, 1.0], [0.1, 0.9]], dtype=np.float32)
    agree = label_agreement(f, np.array([0, 0, 1, 1, 1]), k=2)
    assert agree.tolist() == [0.5, 0.5, 0.0, 0.5, 0.5]
    assert label_agreement(f[:1], np.array([0])).tolist() == [1.0]  # nothing to compare with


def test_the_gate_ratio_is_low_mass_over_middle_mass():
    agreement = np.array([0.0, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0])
    assert gate_ratio(agreement) == pytest.approx(3 / 2)
    assert gate_ratio(np.ones(5)) == 0.0


def test_random_flips_are_found_when_classes_are_separated():
    x, labels, flipped = last_layer_rows(separation=4.0, flip_rate=0.1)
    sel = second_round_policy().select(x, labels)
    side = sel.info["label_side"]
    assert side["open"] and side["gate_ratio"] > 1
    dropped = ~sel.keep
    assert dropped[flipped].mean() >= 0.9
    assert flipped[dropped].mean() >= 0.8
    assert np.all(sel.scores[flipped & dropped] > DensityPolicy().threshold)


@pytest.mark.parametrize("separation", [4.0, 1.0, 0.5])
def test_clean_labels_keep_the_gate_closed_even_when_classes_overlap(separation):
    x, labels, flipped = last_layer_rows(separation=separation, flip_rate=0.0)
    assert not flipped.any()
    with_side = second_round_policy().select(x, labels)
    without = second_round_policy(label_side=False).select(x, labels)
    assert not with_side.info["label_side"]["open"]
    assert with_side.info["label_side"]["dropped_by_label_side_only"] == 0
    assert np.array_equal(with_side.keep, without.keep)


def test_the_first_round_and_label_side_false_leave_the_labels_alone():
    x, labels, _ = last_layer_rows(separation=4.0, flip_rate=0.1)
    first = DensityPolicy().select(x, labels)  # round 0: the side only gathers evidence for round 1
    assert not first.info["label_side"]["open"] and first.info["label_side"]["evidence_only"]
    assert "label_side" not in DensityPolicy(label_confirm=False).select(x, labels).info
    off = second_round_policy(label_side=False).select(x, labels)
    on = second_round_policy().select(x, labels)
    assert (~on.keep).sum() > (~off.keep).sum() == (~first.keep).sum()


def test_other_embeddings_skip_the_label_side_and_say_why():
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    sel = second_round_policy().select(x, np.arange(200) % 2)
    assert sel.info["label_side"]["open"] is False and "not last-layer" in sel.info["label_side"]["skipped"]


def test_never_more_than_half_of_a_class_is_dropped_by_the_label_side():
    # class 1 is six examples, one from each of six other clusters (its own cluster's examples now say 7):
    # none of them has a neighbour labelled 1, so all six are flagged, and only three may go
    x, labels, _ = last_layer_rows(separation=4.0, flip_rate=0.0)
    true = labels.copy()
    labels[true == 1] = 7
    labels[[np.flatnonzero(true == c)[0] for c in (0, 2, 3, 4, 5, 6)]] = 1
    features = outer_product_factors(x, 10)[1][:, :-1]
    flagged, _, info = mislabelled(features, labels, k=20)
    assert info["open"] and flagged[labels == 1].all()
    sel = second_round_policy().select(x, labels)
    assert (~sel.keep[labels == 1]).sum() == 3


@pytest.mark.parametrize("options, message", [({"label_k": 0}, "label_k"), ({"label_gate": -1}, "label_gate"),
                                              ({"label_max_probability": 1.5}, "label_max_probability"),
                                              ({"label_max_probability": "0.1"}, "label_max_probability"),
                                              ({"label_start_round": -1}, "label_start_round")])
def test_bad_label_side_options_are_refused_by_name(options, message):
    from sanitizer.errors import SanitizerError

    with pytest.raises(SanitizerError, match=message):
        DensityPolicy(**options)


def test_the_default_sanitizer_drops_flipped_labels_and_says_why_in_its_history():
    from planted import planted_dataset, tiny_mlp

    from sanitizer import Sanitizer
    from sanitizer.train import TrainConfig, train_classifier

    data, flipped = planted_dataset(per_class=100, planted_per_class=8, seed=0)  # 8 % of each class relabelled
    model = tiny_mlp(seed=0)
    sanitizer = Sanitizer(model, data, warmup=2, every=1, epochs=5, verbose=False, seed=0)
    train_classifier(model, data, TrainConfig(epochs=5, lr=0.05, batch_size=32, augment=False, seed=0),
                     sanitizer=sanitizer)
    rounds = [r for r in sanitizer.history if r.get("kind") != "screen"]
    assert rounds[0]["label_side"]["evidence_only"]  # the first round leaves labels alone
    assert rounds[1]["label_side"]["open"] and rounds[1]["label_side"]["flagged"] >= 6  # what round 0 left
    assert "unconfirmed" in rounds[1]["label_side"]  # round 1 asked round 0's evidence
    assert set(flipped) <= set(sanitizer.dropped.tolist())


def test_an_example_the_model_supports_is_spared_when_label_max_probability_is_set():
    """With ``label_max_probability``, a flagged example is dropped only if the model also gives its label less
    than that probability: here half of the flips are rewritten so that the model believes their label."""
    x, labels, flipped = last_layer_rows(separation=4.0, flip_rate=0.1)
    n, classes = len(labels), 10
    rows = x.reshape(n, classes, -1)
    h1 = rows[np.arange(n), 0] / rows[:, 0, -1:]  # the [features; 1] factor of each row
    believed = np.flatnonzero(flipped)[::2]
    probs = np.full((len(believed), classes), 0.02)
    probs[np.arange(len(believed)), labels[believed]] = 0.82
    error = probs - np.eye(classes)[labels[believed]]
    rows[believed] = error[:, :, None] * h1[believed, None, :]
    x = rows.reshape(n, -1)
    features = outer_product_factors(x, classes)[1][:, :-1]
    by_neighbours, _, _ = mislabelled(features, labels, k=20)
    assert by_neighbours[believed].mean() >= 0.9  # the neighbours alone flag nearly all of them
    plain = second_round_policy().select(x, labels)
    careful = second_round_policy(label_max_probability=0.5).select(x, labels)
    no_side = second_round_policy(label_side=False).select(x, labels)
    assert careful.info["label_side"]["spared_by_the_model"] == by_neighbours[believed].sum()
    # of the believed flips, the careful policy drops only what the class-by-class side drops anyway
    assert np.array_equal(careful.keep[believed], no_side.keep[believed])
    assert (~plain.keep[believed]).sum() > (~careful.keep[believed]).sum()
    others = np.setdiff1d(np.flatnonzero(flipped), believed)
    assert np.array_equal(careful.keep[others], plain.keep[others])  # flips the model does not believe: as before


def test_a_flag_needs_the_previous_rounds_evidence_for_the_same_example():
    """Flipped labels stay wrong from round to round; an example that looks mislabelled in one round only (here:
    rows whose dataset indices were in the agreeing majority last round) is spared."""
    x, labels, flipped = last_layer_rows(separation=4.0, flip_rate=0.1)
    ids = np.arange(len(labels))
    policy = DensityPolicy()
    policy.start_round(0, ids)
    assert policy.select(x, labels).info["label_side"]["evidence_only"]
    fresh = np.flatnonzero(flipped)[:5]  # give five flipped rows the indices of clean examples
    swapped = ids.copy()
    swapped[fresh] = np.flatnonzero(~flipped)[:5]
    swapped[np.flatnonzero(~flipped)[:5]] = fresh
    policy.start_round(1, swapped)
    sel = policy.select(x, labels)
    by_label_side = ~sel.keep & DensityPolicy(label_side=False).select(x, labels).keep  # beyond isolation
    assert not by_label_side[fresh].any() and sel.info["label_side"]["unconfirmed"] >= 5
    assert (~sel.keep)[flipped].sum() >= 0.9 * flipped.sum() - 5
    unconfirmed = DensityPolicy(label_confirm=False)
    unconfirmed.start_round(0, ids)
    unconfirmed.select(x, labels)
    unconfirmed.start_round(1, swapped)
    assert (~unconfirmed.select(x, labels).keep)[fresh].all()  # one round decides without label_confirm


def test_the_label_sides_memory_travels_in_the_sanitizer_state():
    from planted import planted_dataset, tiny_mlp

    from sanitizer import Sanitizer

    data, _ = planted_dataset(per_class=100, planted_per_class=8, seed=0)
    sanitizer = Sanitizer(tiny_mlp(seed=0), data, warmup=0, every=1, verbose=False, seed=0)
    sanitizer.run_round(0)
    state = sanitizer.state_dict()
    assert len(state["policy_state"]["label_low"]) > 0
    resumed = Sanitizer(tiny_mlp(seed=0), data, warmup=0, every=1, verbose=False, seed=0)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.policy._label_low, sanitizer.policy._label_low)
    del state["policy_state"]  # a state saved before the label side had a memory still loads
    Sanitizer(tiny_mlp(seed=0), data, warmup=0, every=1, verbose=False, seed=0).load_state_dict(state)


def test_once_open_the_gate_stays_open_for_the_flips_the_first_open_round_could_not_confirm():
    """Dropping the flips lowers the gate ratio; the flips still waiting for their confirmation are dropped in
    the next round anyway, while a run whose gate never opened stays closed."""
    x, labels, flipped = last_layer_rows(separation=4.0, flip_rate=0.1)
    ids = np.arange(len(labels))
    late = np.flatnonzero(flipped)[:6]  # flips that looked like their label in round 0 (a clean row of it)
    donors = [np.flatnonzero(~flipped & (labels == labels[i]))[j] for j, i in enumerate(late)]
    round0 = x.copy()
    round0[late] = x[donors]
    policy = DensityPolicy()
    policy.start_round(0, ids)
    policy.select(round0, labels)
    policy.start_round(1, ids)
    first = policy.select(x, labels)
    isolation_only = DensityPolicy(label_side=False).select(x, labels).keep
    assert first.info["label_side"]["open"]
    waiting = late[first.keep[late] & isolation_only[late]]  # unconfirmed (some are gross outliers anyway)
    assert len(waiting) >= 3
    kept = np.flatnonzero(first.keep)  # round 2 sees only what round 1 kept
    policy.label_gate = 1e9  # as if dropping the flips had brought R under the gate (it stays high on this data)
    policy.start_round(2, kept)
    second = policy.select(x[kept], labels[kept])
    side = second.info["label_side"]
    assert side["gate_ratio"] <= side["gate"] and side["latched"]
    assert np.isin(waiting, kept[~second.keep]).all()
    clean_x, clean_labels, _ = last_layer_rows(separation=4.0, flip_rate=0.0)
    closed = DensityPolicy()
    for r in range(3):
        closed.start_round(r, np.arange(len(clean_labels)))
        assert not closed.select(clean_x, clean_labels).info["label_side"]["open"]


def test_harvested_rows_ask_for_a_pass_only_when_they_hint_at_flipped_labels():
    # the same labels and flips, seen through blurred features (harvested: augmented, train mode) and sharp ones
    blurred, labels, flipped = last_layer_rows(separation=0.5, flip_rate=0.1)
    sharp, same_labels, _ = last_layer_rows(separation=4.0, flip_rate=0.1)
    assert np.array_equal(labels, same_labels)
    calls = []
    policy = second_round_policy()
    policy.use_clean_views(lambda: calls.append("pass") or policy.cross_class_features(sharp, 10))
    sel = policy.select(blurred, labels)
    side = sel.info["label_side"]
    assert calls == ["pass"] and side["views"] == "pass"
    assert policy.label_pass_trigger < side["harvested_gate_ratio"] < policy.label_gate  # closed on the rows alone
    assert side["open"] and (~sel.keep)[flipped].mean() >= 0.9 and flipped[~sel.keep].mean() >= 0.8
    alone = second_round_policy().select(blurred, labels)  # the harvested rows alone keep the flips
    assert not alone.info["label_side"]["open"] and alone.info["label_side"]["dropped_by_label_side_only"] == 0
    # clean labels: the harvested gate ratio stays under the trigger and no pass is made
    clean, clean_labels, _ = last_layer_rows(separation=0.7, flip_rate=0.0)
    policy = second_round_policy()
    policy.use_clean_views(lambda: calls.append("pass") or policy.cross_class_features(clean, 10))
    side = policy.select(clean, clean_labels).info["label_side"]
    assert calls == ["pass"] and side["views"] == "harvested" and not side["open"]
    with pytest.raises(ValueError, match="label_pass_trigger"):
        DensityPolicy(label_pass_trigger=-1)


def large_round(flip_rate: float, n: int = 40_000, seed: int = 0):
    """Penultimate-feature-like rows of a round above GATE_SAMPLE_MIN_ROWS: ten overlapping classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = (rng.normal(size=(10, 16)) * 2.5)[y] + rng.normal(size=(n, 16))
    flipped = rng.random(n) < flip_rate
    labels = np.where(flipped, (y + rng.integers(1, 10, n)) % 10, y)
    return x.astype(np.float32), labels, flipped


def test_a_large_clean_round_bounds_the_gate_on_a_sample_and_skips_the_full_search(monkeypatch):
    import sanitizer.label_agreement as side

    x, labels, _ = large_round(flip_rate=0.0)
    assert len(labels) >= side.GATE_SAMPLE_MIN_ROWS
    searched = []
    real = side._agreeing_neighbours
    monkeypatch.setattr(side, "_agreeing_neighbours",
                        lambda *a, **kw: searched.append(kw.get("queries")) or real(*a, **kw))
    flagged, agreement, info = mislabelled(x, labels, k=20, skip_below=0.7)
    assert not flagged.any() and not info["open"]
    assert info["sampled"] == side.GATE_SAMPLE and info["gate_ratio"] <= info["gate_ratio_upper"] <= 0.7
    assert len(searched) == 1 and len(searched[0]) == side.GATE_SAMPLE  # the sample only
    assert np.isnan(agreement).sum() == len(labels) - side.GATE_SAMPLE
    # the estimate is the full search's ratio within its sampling error
    assert abs(info["gate_ratio"] - gate_ratio(label_agreement(x, labels, k=20))) < 0.1


def test_a_round_searched_by_a_graph_skips_the_sample_and_searches_once(monkeypatch):
    """Above CLUSTER_MAX_ROWS the search is a graph built on every row whatever the queries: a sample would
    cost about what the full search costs, so the full search runs once (the limit is lowered here)."""
    import sanitizer.label_agreement as side

    x, labels, _ = large_round(flip_rate=0.0)
    monkeypatch.setattr(side, "CLUSTER_MAX_ROWS", len(labels) - 1)
    assert side.sampled_gate(x, labels, k=20) is None
    searched = []
    real = side._agreeing_neighbours
    monkeypatch.setattr(side, "_agreeing_neighbours",
                        lambda *a, **kw: searched.append(kw.get("queries")) or real(*a, **kw))
    flagged, agreement, info = mislabelled(x, labels, k=20, skip_below=0.7)
    assert searched == [None] and "sampled" not in info and not info["open"] and not flagged.any()
    assert not np.isnan(agreement).any()


def test_a_large_round_with_flipped_labels_goes_on_to_the_full_search():
    x, labels, flipped = large_round(flip_rate=0.1)
    flagged, _, info = mislabelled(x, labels, k=20, skip_below=0.7)
    assert "sampled" not in info and info["open"]
    assert flagged[flipped].mean() >= 0.9 and flipped[flagged].mean() >= 0.8


def test_the_sampled_gate_bound_covers_the_true_ratio():
    """The approximation: R from GATE_SAMPLE random examples, bounded above with Poisson counts. Over many
    samples of a known population the bound must cover the true R at least 95 % of the time, and not by much."""
    from sanitizer.label_agreement import GATE_SAMPLE, gate_ratio_upper

    rng = np.random.default_rng(0)
    population = rng.choice([0.0, 0.05, 0.3, 0.45, 0.9], p=[0.03, 0.02, 0.05, 0.04, 0.86], size=50_000)
    true = gate_ratio(population)
    draws = [rng.choice(population, GATE_SAMPLE, replace=False) for _ in range(300)]
    upper = np.array([gate_ratio_upper(d) for d in draws])
    estimates = np.array([gate_ratio(d) for d in draws])
    assert np.mean(upper >= true) >= 0.95
    assert np.mean(upper) - true < 4 * estimates.std()  # about two standard errors above, not a blanket bound


def test_label_flip_bound_precision_at_recall_and_margin():
    """The issue-15 bound study's two measures on arrays whose answers are known by hand."""
    from benchmarks.label_flip_bound import margin, precision_at_recall

    flipped = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    score = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.05])  # ranks: F, C, F, C(0.2), C(0.1), F
    assert precision_at_recall(score, flipped, 2 / 3) == pytest.approx(2 / 3)  # two flips in the top three
    assert precision_at_recall(score, flipped, 1.0) == pytest.approx(0.5)  # all three need all six
    logits = np.array([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    assert margin(logits, np.array([0, 0])).tolist() == [1.0, -3.0]
