"""The budget decision core: parsing, what to refine per budget, and what ships per budget."""

from __future__ import annotations

import pytest

from compressor.core.errors import NaspruneError
from search.budgets import Candidate, choose, parse_budget, parse_budgets, parse_memory, refine_candidates, unreachable


def test_budget_forms():
    assert parse_budget("0.35x").limit_ms(200.0) == pytest.approx(70.0)
    assert parse_budget("40ms").limit_ms(200.0) == 40.0
    assert parse_budget("0.04s").limit_ms(1.0) == pytest.approx(40.0)
    assert parse_budget(" 1x ").kind == "relative"
    assert parse_memory("300MB") == 300_000_000
    assert parse_memory("1GiB") == 2**30
    assert parse_memory(None) is None


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("0ms", "positive"),
        ("0", "not a latency"),
        ("0x", "positive"),
        ("-0.5x", "not a latency"),
        ("fast", "not a latency"),
        ("40", "not a latency"),
        ("3x", "for 3x faster write 0.333x"),
        ("nan ms", "not a latency"),
    ],
)
def test_bad_budgets_are_one_line(text, fragment):
    with pytest.raises(NaspruneError) as err:
        parse_budget(text)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_memory_and_duplicate_budgets():
    for bad in ("lots", "0MB", "-3GB"):
        with pytest.raises(NaspruneError):
            parse_memory(bad)
    with pytest.raises(NaspruneError, match="same budget"):
        parse_budgets(["0.5x", "0.50x"])


def _c(label, precision, quality, ms, baseline=False, memory=100):
    return Candidate(label, label, precision, 1000, memory, quality, baseline, latency_ms=ms)


ORIGINAL = [
    _c("original", "fp32", 30.0, 200.0, True),
    _c("original", "int8-mixed", 31.5, 105.0, True),
    _c("original", "int8", 56.0, 72.0, True),
]


def test_the_quantized_original_ships_where_it_fits_and_is_best():
    pruned = _c("1: 576-9-1280-24", "int8-mixed", 40.0, 80.0)
    [moderate] = choose(parse_budgets(["0.6x"]), ORIGINAL + [pruned], 200.0)
    assert moderate.shipped.baseline and moderate.shipped.precision == "int8-mixed"
    assert moderate.best_baseline == moderate.shipped
    assert "the original at int8-mixed fits" in moderate.reason


def test_only_a_pruned_model_meets_a_tight_budget():
    pruned = [_c("1: 576-9-1280-24", "int8-mixed", 40.0, 80.0), _c("2: 576-9-1024-20", "int8-pc", 70.0, 50.0)]
    [tight, tighter] = choose(parse_budgets(["0.3x", "0.2x"]), ORIGINAL + pruned, 200.0)
    assert tight.shipped.label == "2: 576-9-1024-20" and tight.best_baseline is None
    assert "only a pruned model" in tight.reason
    assert tighter.shipped is None and "nothing fits" in tighter.reason and "50.0 ms > 40.0 ms" in tighter.reason
    assert "2: 576-9-1024-20" in tighter.reason  # the fastest measured is named


def test_pruned_beats_the_original_that_fits_and_memory_binds():
    better = _c("3: 576-9-1408-28", "int8-pc", 45.0, 70.0, memory=50)
    [choice] = choose(parse_budgets(["0.4x"]), ORIGINAL + [better], 200.0)
    assert choice.shipped == better and choice.best_baseline.precision == "int8"
    [choice] = choose(parse_budgets(["0.4x"]), ORIGINAL + [better], 200.0, max_memory=40)
    assert choice.shipped is None and "within" in choice.reason


def test_unmeasured_candidates_never_ship():
    unmeasured = Candidate("4: x", "x", "fp32", 1, 1, 1.0, False, latency_ms=None)
    [choice] = choose(parse_budgets(["1x"]), [unmeasured], 200.0)
    assert choice.shipped is None and "no candidate was measured" in choice.reason


def test_refine_candidates_keep_a_margin_and_rank_by_quality():
    points = [
        {"predicted_ms": 69.0, "quality": 40.0},  # inside 70 ms but not 5 % inside
        {"predicted_ms": 60.0, "quality": 45.0},
        {"predicted_ms": 40.0, "quality": 80.0},
        {"predicted_ms": 150.0, "quality": 31.0},
    ]
    picks = refine_candidates(parse_budgets(["0.35x", "0.8x"]), points, 200.0, per_budget=2)
    assert picks == {"0.35x": [1, 2], "0.8x": [3, 0]}


def test_unreachable_budgets_are_named():
    budgets = parse_budgets(["0.05x", "0.5x", "20ms"])
    lines = unreachable(budgets, fastest_predicted_ms=25.0, original_fp32_ms=200.0)
    assert len(lines) == 2 and lines[0].startswith("budget 0.05x") and lines[1].startswith("budget 20ms")
