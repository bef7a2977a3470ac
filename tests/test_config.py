"""SanitizerConfig: one place that validates a Sanitizer's plain-value options and rebuilds a sanitizer."""

import json

import numpy as np
import pytest

from sanitizer import Sanitizer, SanitizerConfig
from sanitizer.certificate import sanitizer_options
from sanitizer.errors import SanitizerError
from sanitizer.train import TrainConfig, train_classifier
from tests.planted import planted_dataset, tiny_mlp


def test_a_spec_splits_into_sanitizer_options_and_policy_options():
    cfg = SanitizerConfig.from_spec("density:k=7:threshold=2.5:every=2:harvest=true:embedding=logits", epochs=10)
    assert cfg.policy == "density" and cfg.policy_options == {"k": 7, "threshold": 2.5}
    assert (cfg.every, cfg.harvest, cfg.embedding) == (2, True, "logits")
    assert cfg.warmup == 3  # 30 % of 10 epochs, the default schedule
    assert cfg.make_policy().k == 7


def test_to_dict_is_json_and_round_trips():
    cfg = SanitizerConfig(policy="epic-0.2", epochs=8, audit_policies="spectral", unlearn_options={"lr": 0.01})
    text = json.dumps(cfg.to_dict())
    back = SanitizerConfig.from_dict(json.loads(text))
    assert back == cfg and back.audit_policies == ("spectral",)


@pytest.mark.parametrize("options, message", [
    ({"every": 1.5}, "every must be an integer"),
    ({"warmup": -1}, "warmup"),
    ({"action": "burn"}, "unknown action 'burn'"),
    ({"embedding": "grads"}, "unknown embedding 'grads'"),
    ({"policy": "nosuch"}, "unknown policy 'nosuch'"),
    ({"policy_options": {"k": 2.5}}, "k must be an integer"),
    ({"harvest": "yes"}, "harvest must be True, False or None"),
    ({"cumulative": 1}, "cumulative must be True or False"),
    ({"policy_options": [("k", 5)]}, "policy_options must be a dict"),
])
def test_bad_values_are_refused_with_their_name(options, message):
    with pytest.raises(SanitizerError, match=message):
        SanitizerConfig(**options)


def test_unknown_keys_and_mixed_objects_are_refused():
    with pytest.raises(SanitizerError, match=r"unknown sanitizer option\(s\) \['evry'\]"):
        SanitizerConfig.from_dict({"evry": 2})
    data, _ = planted_dataset()
    with pytest.raises(SanitizerError, match=r"\['every'\] are configuration"):
        Sanitizer.from_config(tiny_mlp(), data, SanitizerConfig(epochs=4), every=2)
    with pytest.raises(SanitizerError, match="must be a SanitizerConfig"):
        Sanitizer.from_config(tiny_mlp(), data, {"epochs": 4})


def _trained(sanitizer: Sanitizer, model, data) -> np.ndarray:
    train_classifier(model, data, TrainConfig(epochs=6, batch_size=32, lr=0.05, seed=0), sanitizer=sanitizer)
    return sanitizer.keep.copy()


def test_a_rebuilt_sanitizer_makes_the_same_decisions():
    """sanitizer.config holds what was resolved (policy options, schedule): a sanitizer rebuilt from its JSON
    drops exactly the same examples in the same training run, and the certificate's proxy options carry the
    defense (action, harvest) but not the run (seed, classes)."""
    data, planted = planted_dataset()
    first = Sanitizer(tiny_mlp(), data, policy="density:k=5:threshold=2.0", warmup=2, every=2, seed=3,
                      verbose=False)
    keep = _trained(first, first.model, data)
    assert set(planted) <= set(np.flatnonzero(~keep))  # the rounds did something to compare
    rebuilt_config = SanitizerConfig.from_dict(json.loads(json.dumps(first.config.to_dict())))
    model = tiny_mlp()
    again = Sanitizer.from_config(model, data, rebuilt_config)
    assert again.config == first.config
    np.testing.assert_array_equal(_trained(again, model, data), keep)
    carried = sanitizer_options(first)
    assert carried["policy_options"]["k"] == 5 and carried["action"] == "drop" and "harvest" in carried
    assert "seed" not in carried and "num_classes" not in carried
