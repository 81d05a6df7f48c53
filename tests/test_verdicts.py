"""Verdicts against known answers: planted effects, pure noise, Holm and t-test p-values computed by hand."""

import math

import numpy as np
import pytest

from orchestrator.report.verdicts import ONE_SEED_NOTE, check_guards, compare_to_baseline, holm


def study(rng, n_seeds, shifts, noise=1.0, seed_spread=5.0):
    """Values of a study: seed k adds the same seed effect to every arm (that is what pairing removes)."""
    seed_effects = rng.normal(0, seed_spread, n_seeds)
    return {arm: {k: float(seed_effects[k] + shift + rng.normal(0, noise)) for k in range(n_seeds)}
            for arm, shift in shifts.items()}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_planted_large_effect_with_five_seeds_is_found_in_the_right_direction(mode):
    values = study(np.random.default_rng(1), 5, {"base": 0.0, "up": 6.0, "down": -6.0, "same": 0.0})
    verdicts = compare_to_baseline(values, "base", mode)
    better, worse = ("down", "up") if mode == "min" else ("up", "down")
    assert verdicts["base"].verdict == "baseline"
    assert verdicts[better].verdict == "better" and verdicts[worse].verdict == "worse"
    assert verdicts["same"].verdict == "inconclusive"
    assert verdicts[better].wins == 5 and verdicts[better].wins_text == "5/5" and verdicts[worse].wins == 0
    assert verdicts["up"].ci_low < 6.0 < verdicts["up"].ci_high and verdicts["up"].diff_mean > 0
    assert all(v.n == 5 for v in verdicts.values())


def test_pure_noise_is_inconclusive_in_almost_every_study():
    rng = np.random.default_rng(2024)
    arms = {"base": 0.0, "a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}
    studies_with_a_claim = 0
    for _ in range(200):
        verdicts = compare_to_baseline(study(rng, 5, arms), "base", "min")
        studies_with_a_claim += any(v.verdict in ("better", "worse") for v in verdicts.values())
    # Holm keeps the family-wise error at 5% (10 of 200 expected); unadjusted, 4 tests would claim ~17%.
    assert studies_with_a_claim <= 16


def test_holm_matches_a_hand_computation():
    # sorted: 0.01 x4 = 0.04; 0.03 x3 = 0.09; 0.04 x2 = 0.08 -> 0.09 (monotone); 0.20 x1 = 0.20
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.20}) == pytest.approx(
        {"a": 0.04, "b": 0.09, "c": 0.09, "d": 0.20})
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}
    assert holm({}) == {}


def test_p_value_and_interval_match_a_hand_computation_with_three_degrees_of_freedom():
    values = {"base": {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0}, "arm": {0: 11.0, 1: 12.0, 2: 13.0, 3: 14.0}}
    v = compare_to_baseline(values, "base", "max")["arm"]
    mean, sd = 2.5, math.sqrt(5 / 3)                 # differences 1, 2, 3, 4
    t = mean / (sd / math.sqrt(4))
    # Student t with 3 degrees of freedom has a closed-form CDF
    cdf = 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi
    assert v.p_value == pytest.approx(2 * (1 - cdf), rel=1e-9)
    assert v.p_adjusted == pytest.approx(v.p_value)      # a family of one
    t_975_3 = 3.182446305284263                          # table value of t(0.975, 3)
    assert (v.ci_low, v.ci_high) == pytest.approx((mean - t_975_3 * sd / 2, mean + t_975_3 * sd / 2))
    assert v.verdict == "better" and v.wins == 4 and v.bca_low is None


def test_two_seeds_give_a_very_wide_interval():
    values = {"base": {0: 0.0, 1: 0.0}, "arm": {0: 1.0, 1: 3.0}}
    v = compare_to_baseline(values, "base", "min")["arm"]
    # differences 1, 3: mean 2, standard error 1, t = 2 with 1 degree of freedom (a Cauchy distribution)
    assert v.p_value == pytest.approx(1 - 2 / math.pi * math.atan(2.0))
    t_975_1 = 12.706204736174698
    assert (v.ci_low, v.ci_high) == pytest.approx((2 - t_975_1, 2 + t_975_1))
    assert v.verdict == "inconclusive" and v.wins == 0


def test_one_seed_is_inconclusive():
    verdicts = compare_to_baseline({"base": {0: 1.0}, "arm": {0: 100.0}}, "base", "max")
    v = verdicts["arm"]
    assert (v.verdict, v.n, v.diff_mean, v.p_value, v.p_adjusted, v.ci_low) == ("inconclusive", 1, 99.0, None,
                                                                                 None, None)
    assert ONE_SEED_NOTE in v.note
    assert verdicts["base"].verdict == "baseline" and verdicts["base"].per_seed == [(0, 1.0, 1.0)]


def test_identical_differences_do_not_crash():
    base = {0: 0.1, 1: 0.2, 2: 0.3}
    values = {"base": base, "copy": {k: v for k, v in base.items()},
              "shifted": {k: v + 0.5 for k, v in base.items()},
              "shifted-two": {0: 0.6, 1: 0.7}}
    verdicts = compare_to_baseline(values, "base", "min")
    assert verdicts["copy"].verdict == "inconclusive" and verdicts["copy"].diff_mean == 0
    assert "identical" in verdicts["copy"].note and verdicts["copy"].p_value is None
    assert verdicts["shifted"].verdict == "worse" and verdicts["shifted"].p_value == 0
    assert verdicts["shifted"].ci_low == pytest.approx(0.5) == verdicts["shifted"].ci_high
    assert verdicts["shifted-two"].verdict == "inconclusive" and verdicts["shifted-two"].p_value is None
    assert "needs 3 seeds" in verdicts["shifted-two"].note


def test_unpaired_seeds_are_dropped_and_said():
    values = {"base": {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, "arm": {0: 1.5, 1: 2.2, 2: 3.9, 5: 9.0}}
    v = compare_to_baseline(values, "base", "max")["arm"]
    assert v.n == 3 and [s for s, _, _ in v.per_seed] == [0, 1, 2]
    assert v.diff_mean == pytest.approx((0.5 + 0.2 + 0.9) / 3)
    assert "seed 5 of arm left out (base has no value there)" in v.note
    assert "seed 3 of base left out (arm has no value there)" in v.note


def test_bootstrap_interval_from_ten_seeds():
    values = study(np.random.default_rng(3), 10, {"base": 0.0, "arm": 1.0})
    v = compare_to_baseline(values, "base", "max")["arm"]
    assert v.bca_low < v.diff_mean < v.bca_high
    assert v.bca_high - v.bca_low == pytest.approx(v.ci_high - v.ci_low, rel=0.5)
    again = compare_to_baseline(values, "base", "max")["arm"]
    assert (again.bca_low, again.bca_high) == (v.bca_low, v.bca_high)   # the same report from the same numbers


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="mode must be"):
        compare_to_baseline({"base": {0: 1.0}}, "base", "lower")
    with pytest.raises(ValueError, match="baseline 'nope'"):
        compare_to_baseline({"base": {0: 1.0}}, "nope", "min")


def test_a_better_verdict_a_guard_metric_contradicts_is_demoted():
    """Precision rewards mode collapse: an arm more precise than the baseline but clearly worse on recall is not
    called better; one more precise and no worse on recall is."""
    rng = np.random.default_rng(7)
    precision = study(rng, 5, {"base": 0.6, "collapsed": 0.9, "sharper": 0.9}, noise=0.01, seed_spread=0.02)
    recall = study(rng, 5, {"base": 0.6, "collapsed": 0.1, "sharper": 0.6}, noise=0.01, seed_spread=0.02)
    verdicts = compare_to_baseline(precision, "base", "max")
    assert verdicts["collapsed"].verdict == verdicts["sharper"].verdict == "better"
    check_guards(verdicts, "precision", "mode collapse", {"recall": ("max", recall)}, "base")
    assert verdicts["collapsed"].verdict == "inconclusive"
    assert verdicts["collapsed"].note.startswith("better on precision but worse on recall (-0.4")
    assert "flattered by mode collapse" in verdicts["collapsed"].note
    assert verdicts["sharper"].verdict == "better" and verdicts["sharper"].note == ""
    assert verdicts["base"].verdict == "baseline"


def test_a_guard_nobody_reported_leaves_the_verdict_and_says_so():
    values = study(np.random.default_rng(8), 4, {"base": 0.0, "up": 5.0}, noise=0.1)
    verdicts = compare_to_baseline(values, "base", "max")
    check_guards(verdicts, "m", "noise", {"kid": ("min", {"base": {}, "up": {}})}, "base")
    assert verdicts["up"].verdict == "better" and verdicts["up"].note == "not checked against kid: not reported"
