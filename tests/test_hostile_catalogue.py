"""Issue 13's hostile-input catalogue (tests/hostile/catalogue.py), one test per case: every bad input must
get a clear error (or, for inputs that are legitimately accepted, be accepted). Cases whose fix belongs to a
file edited elsewhere are strict xfails: fixing the bug turns them into failures until the mark is removed.
``python -m tests.hostile.catalogue`` prints the whole table with the totals per outcome."""

import pytest

from tests.hostile.catalogue import CASES, PASSING, run_case


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.id,
                 marks=[pytest.mark.xfail(reason=case.xfail_reason, strict=True)] if case.xfail_reason else [])
    for case in CASES
])
def test_hostile_input_gets_a_clear_answer(case, tmp_path):
    outcome, message = run_case(case, tmp_path)
    assert outcome in PASSING, f"{case.id}: {outcome}: {message}"


def test_the_catalogue_covers_every_area():
    areas = {case.area for case in CASES}
    assert {"labels", "embeddings", "gradient_embeddings", "policy options", "Sanitizer", "rounds", "SanitizerConfig",
            "load_state_dict", "PoisonSet", "CIFAR-10 reader", "CLI certify", "CLI attack", "CLI verify"} <= areas
    assert len(CASES) >= 150
