"""The reported-sets analysis: reading victims, the pre-registered hypotheses and the noise control."""

import json

from benchmarks.reported_analysis import noise_control, read_victims, reseeded_clean, secondary


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


def test_transfer_analysis_pairs_setups_by_extractor_and_counts_hits_beyond_the_clean_head(tmp_path):
    from benchmarks.transfer_extractors_analysis import DEFAULT, mcnemar_less, read, table

    def victim(seed, defense, hit):
        return {"kind": "victim", "attack": "bullseye_polytope", "seed": seed, "defense": defense, "target_hit": hit,
                "clean_accuracy": 0.7, "budget": 25, "poisons_dropped": 0, "clean_dropped": 0}

    paths = []
    for extractor, hits in ((0, {"none": [0, 1, 2], DEFAULT: [2], "clean": [2]}), (1, {"none": [0], DEFAULT: [],
                                                                                      "clean": []})):
        rows = [{"kind": "run", "preset": {"extractor_seed": extractor}}]
        rows += [victim(s, d, s in hit) for d, hit in hits.items() for s in range(3)]
        path = tmp_path / f"e{extractor}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        paths.append(path)
    setups = read(paths)["bullseye_polytope"]
    assert len(setups) == 6 and (1, 0) in setups  # seed 0 of extractor 1 is its own setup
    only_default, only_none, p = mcnemar_less(setups, DEFAULT, "none")
    assert (only_default, only_none) == (0, 3) and abs(p - 0.125) < 1e-12
    text = table("bullseye_polytope", setups)
    assert "| none | 6 | 4/6" in text and "| 3/3 | 1/3 | 3/6 |" in text  # per extractor, then beyond the clean head
    assert "| 1/3 | 0/3 | 0/6 |" in text  # the default's one hit is the clean head's own mistake


def test_the_surrogate_table_groups_files_by_surrogate_and_pools_the_pairs(tmp_path):
    from benchmarks.reported_analysis import mcnemar_less, surrogate_table, taken_note

    first, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in [  # an older file: no surrogate_seed in its preset
        {"kind": "run", "preset": {}}, _row(0, "none", 0.9, hit=True), _row(0, "density", 1e-3),
        _row(1, "none", 0.1), _row(1, "density", 1e-3)]))
    other.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "run", "preset": {"surrogate_seed": 77_778}}, _row(0, "none", 0.8, hit=True), _row(0, "density", 0.01),
        _row(1, "none", 0.7, hit=True), _row(1, "density", 0.6, hit=True)]))
    text = surrogate_table([first, other])
    assert "| 77777 | 2 | 1/2" in text and "| 77778 | 2 | 2/2" in text
    assert "over 4 paired setups" in text
    assert "| 77778 | 1 | #1 → 2 | 0.7 (taken) | 0.6 (taken) | – | – |" in text  # per setup, no control ran
    screened = dict(_row(1, "density", 0.6, hit=True), screen={"poisons_dropped": 500})
    assert taken_note(screened) == " (taken, no poison trained)"
    assert taken_note(dict(screened, screen={"poisons_dropped": 499})) == " (taken)"
    assert taken_note(_row(1, "density", 0.01)) == ""
    # ours hit alone never, theirs alone twice: P(0 of 2 | p = 1/2) = 1/4
    assert mcnemar_less([(False, True), (False, True), (True, True), (False, False)]) == 0.25
    assert mcnemar_less([(False, False)]) == 1.0


def test_the_surrogate_table_counts_screened_default_victims_once_per_training_run(tmp_path):
    from benchmarks.reported_analysis import surrogate_table

    def screened(trial, p, accuracy):
        return dict(_row(trial, "density", p), clean_accuracy=accuracy, screen={"poisons_dropped": 500})

    files = []
    set1 = {77_777: screened(1, 0.6, 0.8), 77_778: screened(1, 0.6, 0.8), 77_779: _row(1, "density", 0.6)}
    for seed in set1:
        path = tmp_path / f"{seed}.jsonl"  # set 0 screened identically on every surrogate; set 1 on two of three
        path.write_text("\n".join(json.dumps(r) for r in [
            {"kind": "run", "preset": {"surrogate_seed": seed}}, _row(0, "none", 0.9), screened(0, 1e-3, 0.81),
            _row(1, "none", 0.2), set1[seed]]))
        files.append(path)
    assert "on 5 of 6 setups; those victims are 2 distinct training runs" in surrogate_table(files)
    files[1].write_text(files[1].read_text().replace('"clean_accuracy": 0.81', '"clean_accuracy": 0.82'))
    assert "on 5 of 6 setups; those victims are 3 distinct training runs" in surrogate_table(files)


def test_the_main_table_reads_only_the_default_surrogates_files(tmp_path, capsys):
    from benchmarks.reported_analysis import main

    default, other = tmp_path / "s1_a.jsonl", tmp_path / "s1_ss77778.jsonl"
    default.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "run", "preset": {}}, _row(1, "none", 0.2), _row(1, "clean", 0.05), _row(1, "density", 0.019)]))
    other.write_text("\n".join(json.dumps(r) for r in [  # the same set crafted on another surrogate
        {"kind": "run", "preset": {"surrogate_seed": 77_778}}, _row(1, "none", 0.55, hit=True),
        _row(1, "density", 0.1)]))
    main([str(other), str(default)])  # the other surrogate's file first: its rows must not win
    out = capsys.readouterr().out
    assert "| 1 | #1 → 2 | 0.2 / 80.00 % | 0.05 / 80.00 % | 0.019 / 80.00 % |" in out
    assert "Skipped 1 files of other surrogates" in out and "s1_ss77778.jsonl" in out


def test_the_secondary_table_compares_accuracy_and_time_with_the_same_sets_undefended_victim():
    sets = {0: {"none": _row(0, "none", 0.9, hit=True), "jpeg": {**_row(0, "jpeg", 0.1), "clean_accuracy": 0.75,
                                                                  "seconds": 2.0}},
            1: {"none": {**_row(1, "none", 0.1), "clean_accuracy": 0.9}, "jpeg": _row(1, "jpeg", 0.1, hit=True)},
            2: {"jpeg": _row(2, "jpeg", 0.1)}}  # no undefended victim: counted in success, not in the paired means
    text = secondary(sets)
    assert "| jpeg | 3 | 1/3 = 33% [6–79%] |" in text
    assert "| -7.50 points | 1.50 |" in text  # (75 - 80 and 80 - 90) / 2; (2 / 1 and 1 / 1) / 2
    assert "| none | 2 | 1/2" in text and "| +0.00 points | 1.00 |" in text
