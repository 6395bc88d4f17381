"""generator.stats against scipy and closed forms; each test states its n."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest
from scipy import stats as sp

from generator import stats

D5 = [0.012, -0.004, 0.021, 0.008, 0.015]  # five paired differences, one negative


def test_mean_std_is_the_sample_std():
    assert stats.mean_std([1.0, 2.0, None, float("nan"), 4.0]) == {
        "mean": 7 / 3,
        "std": statistics.stdev([1, 2, 4]),
        "n": 3,
    }
    assert stats.mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_sign_flip_is_exact_and_matches_scipy():
    # n = 5: 32 patterns. |sum| >= observed (0.052) only with the one negative flipped or
    # not, i.e. all positive or all negative signs on the four positives: 4/32 by hand
    assert stats.sign_flip_p(D5) == pytest.approx(4 / 32)
    for d in (D5, [0.3, -0.1, 0.2, 0.0, 0.05, -0.02, 0.4], [1.0, 1.0, -1.0, 1.0]):
        exact = sp.permutation_test(
            (np.array(d),), np.mean, permutation_type="samples", n_resamples=np.inf
        )
        assert stats.sign_flip_p(d) == pytest.approx(exact.pvalue)
    assert stats.sign_flip_p([0.0, 0.0, 0.0]) == 1.0  # zeros: every pattern ties


def test_sign_flip_above_the_exact_limit_is_close_to_the_exact_p():
    # n = 17 (2^17 patterns: scipy's exact answer is feasible); 2^16 random patterns give a
    # Monte Carlo p whose standard error is at most 0.5 / 256 = 0.002: 0.01 is 5 of them
    d = [0.1 * math.sin(k) + 0.03 for k in range(17)]
    exact = sp.permutation_test(
        (np.array(d),), np.mean, permutation_type="samples", n_resamples=np.inf
    )
    assert stats.sign_flip_p(d) == pytest.approx(exact.pvalue, abs=0.01)
    assert stats.sign_flip_p(d) == stats.sign_flip_p(d)  # fixed seed: reproducible


def test_paired_interval_is_scipy_ttest_rel():
    base = [0.90, 0.91, 0.93, 0.92, 0.95]
    arm = [b + x for b, x in zip(base, D5, strict=True)]
    test = stats.paired(arm, base)
    ci = sp.ttest_rel(arm, base).confidence_interval()
    assert test["ci"] == pytest.approx([ci.low, ci.high])
    # the closed form: mean(d) +- t_{4, 0.975} sd(d) / sqrt(5)
    half = sp.t.ppf(0.975, 4) * statistics.stdev(D5) / math.sqrt(5)
    assert test["ci"] == pytest.approx([statistics.fmean(D5) - half, statistics.fmean(D5) + half])
    assert test["p_exact"] == pytest.approx(4 / 32) and test["n"] == 5
    assert test["p"] == pytest.approx(sp.ttest_rel(arm, base).pvalue)
    same = stats.paired([0.5, 0.6], [0.4, 0.5])  # identical differences: exact p only
    assert same["ci"] is None and same["p"] == pytest.approx(0.5)
    assert stats.paired([0.5], [0.4])["note"] == "n < 2 pairs: no test"


def test_welch_is_scipy_and_zero_variance_is_not_testable():
    a, b = [0.90, 0.92, 0.94], [0.80, 0.82, 0.84]
    test = stats.welch(a, b)
    expected = sp.ttest_ind(a, b, equal_var=False)
    assert test["p"] == pytest.approx(expected.pvalue) and test["design"] == "unpaired"
    # equal variances and n: Welch's df = 4, se = sqrt(2 * 0.0004 / 3)
    half = sp.t.ppf(0.975, 4) * math.sqrt(2 * 0.0004 / 3)
    assert test["ci"] == pytest.approx([0.1 - half, 0.1 + half])
    assert stats.welch([0.5, 0.5], [0.6, 0.6])["note"] == "not testable (zero variance)"


def test_fisher_by_hand():
    # [[2, 2], [0, 4]]: P(table) = C(4,2)C(4,0)/C(8,2) = 6/28; as or less likely: 2 x 6/28
    assert stats.fisher(2, 4, 0, 4)["p"] == pytest.approx(12 / 28)
    assert stats.fisher(1, 2, 0, 0)["p"] is None


def test_logrank_matches_scipy():
    a = [(3, True), (5, True), (7, True), (10, False), (10, False)]
    b = [(1, True), (2, True), (3, True), (4, True)]
    ours = stats.logrank(a, b)

    def censored(x):
        return sp.CensoredData(
            uncensored=[t for t, r in x if r], right=[t for t, r in x if not r]
        )

    theirs = sp.logrank(censored(a), censored(b))
    assert ours["p"] == pytest.approx(theirs.pvalue)
    assert ours["chi2"] == pytest.approx(theirs.statistic**2)
    assert ours["o_minus_e"] < 0  # a reaches later


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 (m = 3): 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 0.04)
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None}) == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06, "d": None}
    )
    assert stats.holm({"a": 0.5, "b": 0.6}) == {"a": 1.0, "b": 1.0}  # clipped at 1


def test_factorial_contrasts_by_hand():
    # one seed: 00 = 1, 10 = 3, 01 = 4, 11 = 10: detector ((3-1)+(10-4))/2 = 4,
    # decay ((4-1)+(10-3))/2 = 5, interaction (10-3)-(4-1) = 4
    cells = {"00": [1.0, 0.0], "10": [3.0, 1.0], "01": [4.0, 1.0], "11": [10.0, 2.0]}
    assert stats.factorial(cells) == {
        "first": [4.0, 1.0],
        "second": [5.0, 1.0],
        "interaction": [4.0, 0.0],
    }


def test_km_median_and_its_interval():
    # n = 5, two censored at 10: S = 0.8, 0.6, 0.4 at 3, 5, 7: the median is 7
    km = stats.km_median([(3, True), (5, True), (7, True), (10, False), (10, False)])
    assert km["median"] == 7.0 and km["censored"] == 2
    band = sp.ecdf(sp.CensoredData(uncensored=[3, 5, 7], right=[10, 10])).sf
    ci = band.confidence_interval(method="log-log")
    assert ci.low.probabilities[0] <= 0.5  # the lower edge is at 0.20 already at t = 3
    assert km["ci"] == [3.0, None]  # the upper edge never reaches 0.5: not reached
    # one reach in four: S never gets to 0.5, the median is "not reached"
    assert stats.km_median([(2, True), (9, False), (9, False), (9, False)])["median"] is None
    assert stats.km_median([(9, False)]) == {
        "median": None,
        "ci": [None, None],
        "n": 1,
        "censored": 1,
    }


def test_cv_and_detrended_cv():
    trend = [1.0 + 0.1 * k for k in range(10)]  # pure trend: all its CV is the trend
    assert stats.cv_pct(trend) == pytest.approx(100 * statistics.stdev(trend) / 1.45)
    assert stats.detrended_cv_pct(trend) == pytest.approx(0.0, abs=1e-12)
    noisy = [2.0, 2.2, 1.9, 2.3, 2.1, 2.4]
    fit = np.polyval(np.polyfit(range(6), noisy, 1), range(6))
    se = math.sqrt(sum((y - f) ** 2 for y, f in zip(noisy, fit, strict=True)) / 4)
    assert stats.detrended_cv_pct(noisy) == pytest.approx(100 * se / statistics.fmean(noisy))
    assert stats.detrended_cv_pct([1.0, None, 2.0]) is None


def test_min_detectable_difference():
    # at the returned delta the noncentral t gives power 0.8 (n = 5, df 4)
    delta = stats.min_detectable(1.0, 5)
    crit = sp.t.ppf(0.975, 4)
    nc = delta * math.sqrt(5)
    assert sp.nct.sf(crit, 4, nc) + sp.nct.cdf(-crit, 4, nc) == pytest.approx(0.8)
    # n = 2000: the normal approximation (z_0.975 + z_0.8) sd / sqrt(n) holds to 0.1 %
    normal = (sp.norm.ppf(0.975) + sp.norm.ppf(0.8)) / math.sqrt(2000)
    assert stats.min_detectable(1.0, 2000) == pytest.approx(normal, rel=1e-3)
    assert stats.min_detectable(1.0, 5, 0.05 / 4) > delta  # a stricter level needs more
    assert stats.min_detectable(0.0, 5) is None


def test_stein_total():
    # n0 = 5, s = 0.5 points, D = 0.3: (t_{4,0.975} 0.5 / 0.3)^2 = (2.776 x 1.667)^2 = 21.4
    assert stats.stein_n(0.5, 5, 0.3) == math.ceil((sp.t.ppf(0.975, 4) * 0.5 / 0.3) ** 2) == 22
    assert stats.stein_n(0.01, 5, 0.3) == 5  # never fewer than the pilot
    with pytest.raises(ValueError):
        stats.stein_n(0.5, 1, 0.3)


# --- tuning budgets (Dodge et al. 2019) --------------------------------------------------------


def test_expected_max_is_the_mean_of_the_best_of_k_draws_enumerated():
    """N = 4 scores with a tie: every one of the N^k ordered draws with replacement, k = 1..4
    (256 draws at k = 4), gives the exact expectation of the best of k."""
    scores = [0.71, 0.9, 0.64, 0.9]
    enumerated = [
        statistics.fmean(max(draw) for draw in itertools.product(scores, repeat=k))
        for k in range(1, 5)
    ]
    assert stats.expected_max(scores) == pytest.approx(enumerated, abs=1e-12)


def test_expected_max_of_hits_and_misses_is_one_minus_all_misses():
    """m ones among N = 10 scores, the others 0: the best of k is 1 unless all k draws miss,
    so E[max_k] = 1 - ((N - m) / N)^k, for every k = 1..10."""
    scores = [0.0] * 7 + [1.0] * 3
    closed = [1 - 0.7**k for k in range(1, 11)]
    assert stats.expected_max(scores) == pytest.approx(closed, abs=1e-12)
    assert stats.expected_max(scores)[0] == pytest.approx(statistics.fmean(scores))


def test_the_bootstrap_band_holds_the_curve_and_is_reproducible():
    """N = 20 scores: the band is ordered, spans the point estimate at every k (the
    resamples' curves scatter around it), collapses for constant scores and is the same from
    the same seed."""
    rng = np.random.default_rng(1)
    scores = list(rng.uniform(0.8, 0.95, size=20))
    low, high = stats.expected_max_band(scores)
    curve = stats.expected_max(scores)
    assert len(low) == len(high) == 20
    assert all(lo <= c <= hi for lo, c, hi in zip(low, curve, high, strict=True))
    assert high[-1] <= max(scores) and low[0] >= min(scores)
    assert stats.expected_max_band(scores) == (low, high)
    flat_low, flat_high = stats.expected_max_band([0.9] * 5)
    assert flat_low == pytest.approx([0.9] * 5) and flat_high == pytest.approx([0.9] * 5)
