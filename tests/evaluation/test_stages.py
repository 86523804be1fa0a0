"""The anytime search's plan (evaluation.stages, evaluation.search's order): the order feature sets are
taken in, what a feature set still costs, how a budget is spent, and the line each stage prints."""

import math

import pytest

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import UsageError
from featurepipe.data.augment import AugmentSpec
from featurepipe.data.dataset import scan
from featurepipe.evaluation import search
from featurepipe.evaluation.cost import pass_cost
from featurepipe.evaluation.stages import (
    PRIOR_SECONDS_PER_PASS, Pace, SearchProgress, Skipped, StageRecord, check_budget, first_stage, fit_budget,
    next_group, pending_passes, stage_message,
)
from featurepipe.extraction.extract import extract

TINY = BackboneSpec(name="tiny", weights="random", image_size=32, resize="squash").resolved()
TINY2 = BackboneSpec(name="tiny2", weights="random", resize="squash").resolved()


def test_the_default_search_is_in_search_order_and_a_users_backbones_keep_theirs(monkeypatch):
    assert [(s.name, s.resize) for s in search.search_specs()] == list(search.DEFAULT_POOL)
    assert search.SEARCH_ORDER[:len(search.DEFAULT_POOL)] == search.DEFAULT_POOL
    pairs = [(s.name, s.resize) for s in search.search_specs(resize="auto")]
    assert pairs[:3] == list(search.SEARCH_ORDER[:3]) and sorted(pairs) == sorted(search.SEARCH_ORDER)
    assert len(set(pairs)) == 9
    given = search.search_specs(["efficientnet_lite2", "efficientnet_lite0"], "squash")
    assert [s.name for s in given] == ["efficientnet_lite2", "efficientnet_lite0"]
    assert [s.name for s in search.search_specs(quick=True)] == [search.QUICK_BACKBONE]
    # The order is data: another one (pairs not searched ignored, sets not listed last) is followed as given.
    monkeypatch.setattr(search, "SEARCH_ORDER", (("efficientnet_lite2", "squash"), ("nope", "squash"),
                                                 ("efficientnet_lite0", "letterbox")))
    pairs = [(s.name, s.resize) for s in search.search_specs(resize="auto")]
    assert pairs[:2] == [("efficientnet_lite2", "squash"), ("efficientnet_lite0", "letterbox")]
    assert pairs[2:] == [(b, p) for b in search.DEFAULT_BACKBONES for p in ("squash", "center_crop", "letterbox")
                         if (b, p) not in pairs[:2]]


@pytest.mark.parametrize("value", [-1, math.nan, math.inf, "soon"])
def test_a_budget_is_a_positive_number_of_seconds(value):
    with pytest.raises(UsageError, match="--budget"):
        check_budget(value)


def test_no_budget():
    assert check_budget(None) is None and check_budget(0) is None and check_budget(12) == 12.0


def test_pending_passes_counts_what_the_stores_lack_without_making_a_store(image_tree, cache):
    dataset = scan(image_tree, cache_dir=cache)
    features = cache / "features"
    before = sorted(features.iterdir()) if features.exists() else []
    assert pending_passes(dataset, TINY, cache, AugmentSpec(0)) == 24
    assert pending_passes(dataset, TINY, cache, AugmentSpec(2)) == 24 * 3
    assert (sorted(features.iterdir()) if features.exists() else []) == before   # nothing created
    extract(dataset, TINY, cache)
    assert pending_passes(dataset, TINY, cache, AugmentSpec(0)) == 0
    assert pending_passes(dataset, TINY, cache, AugmentSpec(2)) == 48   # the views are still to run
    extract(dataset, TINY, cache, augment=2)
    assert pending_passes(dataset, TINY, cache, AugmentSpec(2)) == 0
    assert pending_passes(dataset, TINY2, cache, AugmentSpec(0)) == 24


def test_the_pace_is_what_was_measured_in_lite0_passes():
    pace = Pace()
    assert pace.seconds_per_pass == PRIOR_SECONDS_PER_PASS   # nothing measured yet
    pace.extracted(TINY, 0, 5.0)                               # a cached set measures nothing
    assert pace.seconds_per_pass == PRIOR_SECONDS_PER_PASS
    pace.extracted(TINY, 100, 2.5, build_seconds=0.5)         # 2 s of extraction, 0.5 s building the model
    per_pass = 2.0 / (100 * pass_cost(TINY))
    assert pace.seconds_per_pass == pytest.approx(per_pass)
    assert pace.estimate(TINY2, 50) == pytest.approx(0.5 + 50 * pass_cost(TINY2) * per_pass)
    pace.extracted(TINY2, 10, 1.5, build_seconds=1.5)          # the builds average 1 s
    per_pass = 2.0 / (100 * pass_cost(TINY) + 10 * pass_cost(TINY2))
    pace.evaluated(2, 3.0)                                     # 1.5 s of evaluation per added set
    assert pace.estimate(TINY2, 50) == pytest.approx(1.0 + 50 * pass_cost(TINY2) * per_pass + 1.5)
    assert pace.estimate(TINY2, 0) == pytest.approx(1.5)       # cached: no build, no extraction


def test_the_budget_keeps_what_fits_in_order_and_always_what_is_cached():
    pace = Pace(extract_seconds=1.0, passes=1.0)               # 1 s per Lite0 pass: easy numbers
    big, cached, small = (BackboneSpec(name="tiny", weights="random", image_size=32, resize=r).resolved()
                          for r in ("squash", "center_crop", "letterbox"))
    unit = pass_cost(big)
    pending = {big: 100, cached: 0, small: 10}
    kept, skipped, seconds = fit_budget([big, cached, small], pending, pace, left=50 * unit)
    assert kept == [cached, small] and seconds == pytest.approx(10 * unit)
    assert skipped == [Skipped("tiny/squash", pytest.approx(100 * unit), pytest.approx(50 * unit))]
    kept, skipped, _ = fit_budget([big, cached, small], pending, pace, left=-5.0)   # the budget is spent
    assert kept == [cached] and [s.feature_set for s in skipped] == ["tiny/squash", "tiny/letterbox"]
    assert skipped[0].left_s == 0.0
    kept, skipped, _ = fit_budget([big, cached, small], pending, pace, left=None)
    assert kept == [big, cached, small] and skipped == []


def test_stages_take_the_first_set_with_the_cached_ones_then_the_stage_sizes(monkeypatch):
    specs = [BackboneSpec(name="tiny", weights="random", image_size=s).resolved() for s in (32, 40, 48, 56, 64, 72)]
    pending = {s: 0 if i in (3, 4) else 10 for i, s in enumerate(specs)}
    assert first_stage(specs, pending) == [specs[0], specs[3], specs[4]]
    monkeypatch.setattr("featurepipe.evaluation.stages.STAGE_SIZES", (1, 2))
    rest = [specs[1], specs[2], specs[5]]
    assert next_group(rest, 2) == rest[:2] and next_group(rest[2:], 3) == rest[2:]
    assert next_group(rest, 3) == rest   # after the sized stages: everything left


def test_the_stage_line_says_the_result_and_what_comes_next():
    progress = SearchProgress(budget=60.0, order=["a/squash", "b/squash", "c/squash", "d/squash"])
    first = StageRecord(1, ["a/squash"], 1, {"mean": 0.93, "ci_low": 0.88, "ci_high": 0.97}, 0.95, "a/squash", 14.2, 24)
    assert stage_message(first, ["b/squash", "c/squash"], 30.4, progress) == (
        "a/squash: nested 0.930 (0.880-0.970) after 14 s; next: 2 more feature sets, ~30 s")
    progress.skipped.append(Skipped("d/squash", 100.0, 10.0))
    last = StageRecord(2, ["b/squash", "c/squash"], 3, None, 0.97, "vote", 41.0, 48)
    assert stage_message(last, [], 0.0, progress) == (
        "b/squash, c/squash (3 feature sets): best CV row 0.970 (optimistic) after 41 s; search done, 1 left out "
        "by --budget 60 s")
    note = progress.skipped_note()
    assert "1 of 4 feature sets not searched (d/squash)" in note and "--budget 60 s" in note
