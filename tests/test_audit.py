"""Audit mode: rounds are scored exactly as for dropping, but nothing is dropped."""

import copy

import numpy as np
import pytest
import torch

from sanitizer import Sanitizer, gradient_embeddings, select
from sanitizer.errors import SanitizerError
from sanitizer.models import CompactCNN
from sanitizer.train import TrainConfig, train_classifier
from tests.test_sanitizer import planted_dataset


@pytest.fixture(scope="module")
def trained():
    ds, planted = planted_dataset()
    torch.manual_seed(0)
    model = CompactCNN(1, 2, width=4)
    train_classifier(model, ds, TrainConfig(epochs=2, lr=0.05, batch_size=32, augment=False, seed=0))
    return model, ds, planted


def test_audit_drops_nothing_and_records_what_the_dropping_run_drops(trained):
    model, ds, _ = trained
    options = {"k": 5, "threshold": 1.5}
    dropping = Sanitizer(copy.deepcopy(model), ds, policy_options=options, warmup=0, every=1)
    auditing = Sanitizer(copy.deepcopy(model), ds, policy_options=options, warmup=0, every=1, audit=True)
    dropping.run_round(0)
    record = auditing.run_round(0)
    assert len(dropping.dropped) > 0, "the planted set must make the dropping run drop something"
    assert auditing.keep.all() and record["dropped_now"] == [] and record["dropped_total"] == 0
    assert record["audit"]["mode"] == "audit"
    assert record["audit"]["policies"]["density"]["would_drop"] == [int(i) for i in dropping.dropped]
    np.testing.assert_array_equal(auditing.scores(), dropping.last_scores.astype(np.float32))


def test_audit_policies_score_on_their_own_embedding(trained):
    model, ds, _ = trained
    san = Sanitizer(model, ds, warmup=0, every=1, audit=True, audit_policies=["epic-0.1", "deep_knn"])
    record = san.run_round(0)
    assert record["audit"]["policies"]["epic-0.1"]["embedding"] == "logits"
    assert record["audit"]["policies"]["deep_knn"]["embedding"] == "features"
    logits = gradient_embeddings(model, ds, embedding="logits")
    expected = select(logits, ds.labels, policy="epic-0.1", seed=0)
    np.testing.assert_allclose(san.scores("epic-0.1"), expected.scores, rtol=1e-6)
    assert record["audit"]["policies"]["epic-0.1"]["would_drop"] == [int(i) for i in expected.dropped]


def test_audit_scores_survive_a_resume(trained):
    model, ds, _ = trained
    first = Sanitizer(model, ds, warmup=0, every=1, audit=True, audit_policies=["spectral"])
    first.run_round(0)
    first.run_round(1)
    state = first.state_dict()
    resumed = Sanitizer(model, ds, warmup=0, every=1, audit=True, audit_policies=["spectral"])
    resumed.load_state_dict(state)
    for epoch in (0, 1):
        np.testing.assert_array_equal(resumed.scores("spectral", epoch), first.scores("spectral", epoch))
    assert resumed.keep.all()


def test_audit_errors_are_clear(trained):
    model, ds, _ = trained
    with pytest.raises(SanitizerError, match="listed twice"):
        Sanitizer(model, ds, audit=True, audit_policies=["epic-0.1", "epic-0.1"])
    san = Sanitizer(model, ds, audit=True)
    with pytest.raises(SanitizerError, match="no audited round"):
        san.scores()
    san.run_round(0)
    with pytest.raises(SanitizerError, match="no audited scores"):
        san.scores("epic-0.1")


def test_audit_reaches_the_certificate_and_the_report(trained, tmp_path):
    from sanitizer.certificate import verify_certificate

    model, ds, planted = trained
    san = Sanitizer(model, ds, warmup=0, every=1, audit=True, audit_policies=["epic-0.1"])
    san.run_round(0)
    cert = san.certificate(tmp_path / "cert.json", poison_indices=planted, report_dir=tmp_path / "report")
    audit = cert["audit"]["rounds"][0]["audit"]
    assert audit["mode"] == "audit" and set(audit["policies"]) == {"density", "epic-0.1"}
    assert verify_certificate(cert).ok
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Audit: what each policy would drop" in page and "nothing was dropped" in page
    assert (tmp_path / "report" / "audit_0.png").exists() and (tmp_path / "report" / "audit_1.png").exists()
