"""The champion-and-challenger statistics and policy (imgclf.promotion), checked against figures
computed here by hand, without SciPy: binomial tails summed with math.comb, Clopper-Pearson
bounds by bisection of those tails."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imgclf.config import PromotionConfig, load_section, read_params, validate_all
from imgclf.errors import ConfigError
from imgclf.paths import PARAMS_FILE
from imgclf.promotion import (
    Paired,
    compare,
    decide,
    difference_interval,
    markdown,
    mcnemar_p,
    pair_counts,
    record,
    summary,
    tags,
)

POLICY = PromotionConfig()


def _upper_tail(x: int, m: int, p: float) -> float:
    return sum(math.comb(m, k) * p**k * (1 - p) ** (m - k) for k in range(x, m + 1))


def _lower_tail(x: int, m: int, p: float) -> float:
    return sum(math.comb(m, k) * p**k * (1 - p) ** (m - k) for k in range(0, x + 1))


def _bisect(f, lo: float = 0.0, hi: float = 1.0) -> float:
    """The root of an increasing f on [lo, hi]."""
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def _hand_interval(x: int, m: int, n: int, confidence: float) -> tuple[float, float]:
    """Clopper-Pearson bounds of x successes in m by definition (each tail = (1 - confidence) / 2),
    mapped to the accuracy difference over n images."""
    tail = (1 - confidence) / 2
    low = 0.0 if x == 0 else _bisect(lambda p: _upper_tail(x, m, p) - tail)
    high = 1.0 if x == m else _bisect(lambda p: tail - _lower_tail(x, m, p))
    return (2 * low - 1) * m / n, (2 * high - 1) * m / n


def _pairs(challenger_only: int, champion_only: int, n: int) -> Paired:
    both = (n - challenger_only - champion_only) * 9 // 10
    return Paired(both, challenger_only, champion_only, n - both - challenger_only - champion_only)


# --- the exact McNemar test ---------------------------------------------------------------------

def test_mcnemar_p_matches_binomial_tails_summed_by_hand():
    # 10 discordant, all the challenger's: p = 2 * 0.5^10.
    assert mcnemar_p(_pairs(10, 0, 100)) == pytest.approx(2 * 0.5**10, rel=1e-12)
    # 8 vs 2: p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 112 / 1024.
    assert mcnemar_p(_pairs(8, 2, 100)) == pytest.approx(112 / 1024, rel=1e-12)
    assert mcnemar_p(_pairs(2, 8, 100)) == pytest.approx(112 / 1024, rel=1e-12)
    # 30 vs 14: the two-sided tail of Binomial(44, 1/2), summed here.
    assert mcnemar_p(_pairs(30, 14, 1000)) == pytest.approx(2 * _upper_tail(30, 44, 0.5), rel=1e-9)
    assert mcnemar_p(_pairs(5, 5, 100)) == 1.0
    assert mcnemar_p(_pairs(0, 0, 100)) == 1.0


def test_difference_interval_matches_clopper_pearson_by_definition():
    # All 10 discordant images the challenger's: the lower bound has the closed form 0.025^(1/10).
    low, high = difference_interval(_pairs(10, 0, 100), 0.95)
    assert low == pytest.approx((2 * 0.025 ** 0.1 - 1) * 10 / 100, rel=1e-9)
    assert high == pytest.approx(0.10, rel=1e-12)
    for x, y, n in ((8, 2, 100), (30, 14, 1000), (3, 9, 600), (50, 50, 10000)):
        got = difference_interval(_pairs(x, y, n), 0.95)
        assert got == pytest.approx(_hand_interval(x, x + y, n, 0.95), abs=1e-7), (x, y, n)
    assert difference_interval(_pairs(0, 0, 100), 0.95) == (0.0, 0.0)


def test_interval_and_test_never_disagree():
    """The interval excludes 0 from below exactly when the challenger is ahead and p < alpha."""
    for alpha in (0.05, 0.01):
        for x in range(0, 35):
            for y in range(0, 35):
                pairs = _pairs(x, y, 500)
                low, high = difference_interval(pairs, 1 - alpha)
                assert (low > 0) == (x > y and mcnemar_p(pairs) < alpha), (alpha, x, y)
                assert (high < 0) == (y > x and mcnemar_p(pairs) < alpha), (alpha, x, y)
                assert low <= (x - y) / 500 <= high


def test_pair_counts():
    chall = np.array([1, 1, 0, 0, 1], dtype=bool)
    champ = np.array([1, 0, 1, 0, 1], dtype=bool)
    assert pair_counts(chall, champ) == Paired(both=2, challenger_only=1, champion_only=1, neither=1)


# --- the comparison -----------------------------------------------------------------------------

def _labels(per_class: dict[str, int]) -> list[str]:
    return [c for c, n in per_class.items() for _ in range(n)]


def test_compare_per_class_and_worst_drop_by_hand():
    actual = _labels({"a": 10, "b": 10})
    # challenger: 9/10 a, 6/10 b; champion: 7/10 a, 8/10 b.
    challenger = ["a"] * 9 + ["b"] + ["b"] * 6 + ["a"] * 4
    champion = ["a"] * 7 + ["b"] * 3 + ["b"] * 8 + ["a"] * 2
    c = compare(actual, challenger, champion, ["a", "b"], ["a", "b"])
    assert (c.images, c.compared, c.overlap) == (20, 20, 0)
    assert c.challenger_accuracy == pytest.approx(15 / 20)
    assert c.champion_accuracy == pytest.approx(15 / 20)
    assert c.per_class["a"].challenger == pytest.approx(0.9) and c.per_class["a"].champion == pytest.approx(0.7)
    assert c.worst_class == ("b", pytest.approx(0.2))
    # a: images 7,8 challenger only; b: images 16,17 champion only.
    assert (c.pairs.challenger_only, c.pairs.champion_only) == (2, 2)


def test_compare_leaves_out_overlapping_images_and_new_classes():
    actual = _labels({"a": 4, "b": 4, "new": 3})
    challenger = ["a", "a", "a", "b", "b", "b", "b", "b", "new", "new", "a"]
    champion = ["a", "a", "b", "b", "b", "b", "a", "a", "a", "b", "a"]
    exclude = np.zeros(11, dtype=bool)
    exclude[0] = True  # the champion trained on image 0
    c = compare(actual, challenger, champion, ["a", "b", "new"], ["a", "b"], exclude=exclude)
    assert (c.compared, c.overlap) == (7, 1)  # 8 shared-class images less the overlapping one
    assert c.new_classes == ["new"] and c.dropped_classes == []
    assert c.per_class["new"].champion is None and c.per_class["new"].challenger == pytest.approx(2 / 3)
    assert c.per_class["a"].images == 3
    # challenger right on 1,2 (a) and 4..7 (b): 6 of 7; champion on 1 (a), 4,5 (b): 3 of 7.
    assert c.challenger_accuracy == pytest.approx(6 / 7) and c.champion_accuracy == pytest.approx(3 / 7)
    d = decide(c, POLICY)
    assert d.outcome == "manual" and "adds new" in d.reason and "2 shared classes" in d.reason


def _case(n_per_class: int, challenger_right: dict[str, int], champion_right: dict[str, int]):
    """Predictions where each model gets the first k images of each class right (so the right
    sets are nested: every image the weaker one gets right, the stronger does too)."""
    classes = list(challenger_right)
    actual = _labels({c: n_per_class for c in classes})
    def preds(right):
        out = []
        for c in classes:
            wrong = classes[(classes.index(c) + 1) % len(classes)]
            out += [c] * right[c] + [wrong] * (n_per_class - right[c])
        return out
    return compare(actual, preds(challenger_right), preds(champion_right), classes, classes, confidence=0.95)


def test_policy_worse_significant_noise_and_class_drop():
    classes = ("a", "b", "c", "d")
    base = {c: 180 for c in classes}  # of 200 each: 90%
    worse = _case(200, {c: 175 for c in classes}, base)
    assert decide(worse, POLICY).outcome == "kept" and "not better" in decide(worse, POLICY).reason
    edge = _case(200, {"a": 170, "b": 200, "c": 200, "d": 200}, base)  # a down exactly 5 points: allowed
    assert decide(edge, POLICY).outcome == "promoted"
    better = _case(200, {c: 190 for c in classes}, base)  # +5 points on 800 images, 40 vs 0 discordant
    assert better.p_value < 1e-6 and decide(better, POLICY).outcome == "promoted"
    noise = _case(200, {"a": 181, "b": 181, "c": 180, "d": 180}, base)
    d = decide(noise, POLICY)
    assert noise.difference > 0 and d.outcome == "kept" and "not significantly" in d.reason
    drop = _case(200, {"a": 199, "b": 199, "c": 199, "d": 160}, base)  # +4.4 overall, d down 10 points
    assert drop.p_value < 0.05 and drop.difference > 0
    d = decide(drop, POLICY)
    assert d.outcome == "kept" and "'d' drops 10.00 points" in d.reason
    # A team that wants the newer model: not worse by more than a point is enough...
    lenient = PromotionConfig(margin=0.01)
    same = _case(200, base, base)
    assert decide(same, POLICY).outcome == "kept" and decide(same, lenient).outcome == "promoted"
    # ... but a clear loss is not.
    assert decide(worse, lenient).outcome == "kept"


def test_record_repeats_byte_for_byte_and_reads_well():
    c = _case(50, {"a": 48, "b": 45}, {"a": 40, "b": 44})
    d = decide(c, POLICY)
    rec1 = record("cnn", "3", "2", c, d, POLICY, "sha")
    rec2 = record("cnn", "3", "2", _case(50, {"a": 48, "b": 45}, {"a": 40, "b": 44}), d, POLICY, "sha")
    assert rec1 == rec2
    t = tags("2", c, d, POLICY, "sha")
    assert t["promotion.outcome"] == d.outcome and t["promotion.compared_against"] == "2"
    assert t["promotion.p_value"] == f"{c.p_value:.6g}"
    assert "significantly better" in t["promotion.policy"]
    table = markdown(rec1)
    assert "| a (50 images) | 96.00% | 80.00% | +16.00 |" in table
    line = summary("cnn", "3", "2", c, d)
    assert line.startswith("cnn version 3 vs champion version 2 on the same 100 test images: 93.00% vs 84.00%")


# --- params ---------------------------------------------------------------------------------

def test_promotion_params_are_validated_in_one_line():
    params = read_params(PARAMS_FILE)
    assert load_section("promotion", PromotionConfig, params) == PromotionConfig()
    for key, value, expect in (("alpha", 0.5, "promotion.alpha: got 0.5: input should be less than or equal to 0.2"),
                               ("margin", -0.01, "promotion.margin: got -0.01"),
                               ("max_class_drop", "5", "promotion.max_class_drop: got '5'"),
                               ("mystery", 1, "promotion.mystery: unknown key")):
        bad = {**params, "promotion": {**params["promotion"], key: value}}
        with pytest.raises(ConfigError) as exc:
            validate_all(bad)
        assert str(exc.value).startswith(expect) and "\n" not in str(exc.value)
    without = {k: v for k, v in params.items() if k != "promotion"}
    with pytest.raises(ConfigError, match="missing section 'promotion'"):
        validate_all(without)
