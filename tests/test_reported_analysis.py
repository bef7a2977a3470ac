"""The reported-sets analysis: reading victims, the pre-registered hypotheses and the noise control."""

import json

from benchmarks.reported_analysis import noise_control, read_victims, reseeded_clean


def _row(trial, defense, p, seed_offset=0, hit=False):
    return {"kind": "victim", "trial": trial, "seed": trial, "victim_seed": trial + seed_offset, "defense": defense,
            "target_adv_prob": p, "clean_accuracy": 0.8, "target_hit": hit, "budget": 500, "seconds": 1.0,
            "target_index": 1, "adversarial_class": 2, "clean_dropped": 0}


def test_noise_control_compares_the_defaults_distance_with_a_second_poison_free_victims(tmp_path):
    rows = [_row(0, "none", 0.5, hit=True), _row(0, "clean", 1e-4), _row(0, "density", 4e-4),
            _row(0, "clean", 1e-3, seed_offset=100),  # the reseeded control: 10x from the first poison-free
            _row(1, "none", 0.1), _row(1, "clean", 2e-3), _row(1, "density", 1e-3),
            _row(1, "clean", 3e-3, seed_offset=100)]
    path = tmp_path / "v.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"kind": "run"}, *rows]))
    sets, reseeded = read_victims([path]), reseeded_clean([path])
    assert sets[0]["clean"]["target_adv_prob"] == 1e-4  # the reseeded victim is not the set's reference
    assert sorted(reseeded) == [0, 1] and reseeded[0]["target_adv_prob"] == 1e-3
    text = noise_control(sets, reseeded)
    assert "| 0 | 0.0001 | 0.001 | 0.0004 | 10.0× | 4.0× |" in text
    assert "| 1 | 0.002 | 0.003 | 0.001 | 1.5× | 2.0× |" in text
    assert "within 2×: second poison-free 1/2, default 1/2" in text
    assert "no set" in noise_control(sets, {})
