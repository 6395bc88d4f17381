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
    # [1, 2, 3, 4]: mean 2.5, squared deviations 5, so std sqrt(5/3) (n - 1), not sqrt(5/4)
    assert stats.mean_std([1.0, 2.0, None, 3.0, math.inf, 4.0]) == pytest.approx(
        {"mean": 2.5, "std": math.sqrt(5 / 3), "n": 4}
    )
    assert stats.mean_std([2.0]) == {"mean": 2.0, "std": None, "n": 1}
    assert stats.mean_std([1.0, 3.0])["std"] == pytest.approx(math.sqrt(2))  # two suffice
    assert stats.mean_std([None]) == stats.mean_std([]) == {"mean": None, "std": None, "n": 0}


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
    # n = 20 equal values: only 2 of 2^20 patterns are as extreme, so 2^16 random ones are
    # expected to hit 1/8 of a time; the observed pattern counts once more, so the p is
    # never 0 and, with no hit, exactly 1 / (2^16 + 1)
    p = stats.sign_flip_p([1.0] * 20)
    assert 1 / (stats.RESAMPLES + 1) <= p < 3 / (stats.RESAMPLES + 1)


def test_sign_flip_is_exact_up_to_its_limit():
    # n = 16 = EXACT_MAX_N: all 2^16 patterns, so scipy's exact p to rounding (a Monte Carlo
    # p would be off by about 0.002)
    d = [0.1 * math.cos(k) + 0.02 for k in range(stats.EXACT_MAX_N)]
    exact = sp.permutation_test(
        (np.array(d),), np.mean, permutation_type="samples", n_resamples=np.inf
    )
    assert stats.sign_flip_p(d) == pytest.approx(exact.pvalue, rel=1e-9)


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
    assert test["p"] == pytest.approx(sp.ttest_rel(arm, base).pvalue)  # two-sided
    assert test["diff"] == pytest.approx(statistics.fmean(D5))  # arm - base, not base - arm
    assert test["sd"] == pytest.approx(statistics.stdev(D5))  # n - 1: it feeds the mdd
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
    # one sample without variance: the other's still gives a test. [1, 1] against [2, 4]:
    # se = sqrt(0 / 2 + 2 / 2) = 1, t = -2, Welch's df = 1 (a Cauchy), p = 1 - 2 atan(2) / pi
    one = stats.welch([1.0, 1.0], [2.0, 4.0])
    assert one["p"] == pytest.approx(1 - 2 * math.atan(2) / math.pi)
    assert stats.welch([1.0], [2.0, 4.0])["note"] == "n < 2: no test"


def test_welch_matches_scipy_with_unequal_sizes_and_variances():
    # n = 5 and 3, variances 5.3 and 4: the Welch-Satterthwaite df (4.90) is not an integer
    # and Student's pooled t gives another p (0.722, not 0.714)
    a, b = [1.0, 2.0, 3.0, 4.0, 7.0], [2.0, 4.0, 6.0]
    test, expected = stats.welch(a, b), sp.ttest_ind(a, b, equal_var=False)
    assert test["p"] == pytest.approx(expected.pvalue)
    ci = expected.confidence_interval(0.95)
    assert test["diff"] == pytest.approx(-0.6)  # mean a < mean b
    assert test["ci"] == pytest.approx([ci.low, ci.high])
    assert stats.welch(b, a)["ci"] == pytest.approx([-ci.high, -ci.low])


def test_fisher_by_hand():
    # [[2, 2], [0, 4]]: P(table) = C(4,2)C(4,0)/C(8,2) = 6/28; as or less likely: 2 x 6/28
    assert stats.fisher(2, 4, 0, 4)["p"] == pytest.approx(12 / 28)
    assert stats.fisher(1, 2, 0, 0)["p"] is None
    assert stats.fisher(0, 0, 1, 2)["p"] is None


def censored(sample):
    return sp.CensoredData(
        uncensored=[t for t, r in sample if r], right=[t for t, r in sample if not r]
    )


def test_logrank_matches_scipy():
    a = [(3, True), (5, True), (7, True), (10, False), (10, False)]
    b = [(1, True), (2, True), (3, True), (4, True)]
    ours = stats.logrank(a, b)
    theirs = sp.logrank(censored(a), censored(b))
    assert ours["p"] == pytest.approx(theirs.pvalue)
    assert ours["chi2"] == pytest.approx(theirs.statistic**2)
    assert ours["o_minus_e"] < 0  # a reaches later


def test_logrank_matches_scipy_with_ties_and_censoring():
    # n = 7 and 7: two reaches at 3 and at 5 (the tie correction of the variance matters),
    # a censored at 7 when b reaches at 7 (a censored run is at risk at its time, not a
    # reach), and a alone at risk at 12 (one at risk: no variance term)
    a = [(3, True), (5, True), (5, True), (7, False), (8, True), (9, False), (12, True)]
    b = [(2, True), (3, True), (3, True), (4, True), (5, True), (7, False), (7, True)]
    test, expected = stats.logrank(a, b), sp.logrank(censored(a), censored(b))
    assert test["chi2"] == pytest.approx(expected.statistic**2)
    assert test["p"] == pytest.approx(expected.pvalue)  # two-sided
    assert test["o_minus_e"] < 0 and expected.statistic < 0  # a reaches the target later


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 (m = 3): 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 0.04)
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None}) == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06, "d": None}
    )
    assert stats.holm({"a": 0.5, "b": 0.6}) == {"a": 1.0, "b": 1.0}  # clipped at 1


def test_holm_caps_at_one_and_never_decreases():
    # sorted 0.3, 0.6, 0.9: 3 * 0.3 = 0.9, then 2 * 0.6 = 1.2 capped at 1, then
    # max(1, 0.9) = 1: the adjusted p keeps the order of the raw ones
    assert stats.holm({"a": 0.9, "b": 0.3, "c": 0.6}) == pytest.approx(
        {"a": 1.0, "b": 0.9, "c": 1.0}
    )
    assert stats.holm({"a": 0.02}) == {"a": 0.02}  # a family of one is not adjusted
    assert stats.holm({"a": None}) == {"a": None}


def test_factorial_contrasts_by_hand():
    # one seed: 00 = 1, 10 = 3, 01 = 4, 11 = 10: detector ((3-1)+(10-4))/2 = 4,
    # decay ((4-1)+(10-3))/2 = 5, interaction (10-3)-(4-1) = 4
    cells = {"00": [1.0, 0.0], "10": [3.0, 1.0], "01": [4.0, 1.0], "11": [10.0, 2.0]}
    assert stats.factorial(cells) == {
        "first": [4.0, 1.0],
        "second": [5.0, 1.0],
        "interaction": [4.0, 0.0],
    }
    with pytest.raises(ValueError):  # a cell short of a seed: no contrast from what is left
        stats.factorial({**cells, "11": [10.0]})


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
    # n = 2: S is exactly 0.5 after the first reach, and "0.5 or below" makes it the median
    assert stats.km_median([(1, True), (2, True)])["median"] == 1.0
    # everyone reaches: S ends at 0, where the band is undefined; S itself (0) closes it
    assert stats.km_median([(1, True), (2, True), (3, True)])["ci"] == [1.0, 3.0]


def test_km_interval_is_the_log_log_band_by_hand():
    # n = 14, reaches at 1..10, censored at 4, 6, 12, 12. By hand: S(t) = prod(1 - d/n),
    # Greenwood's V = sum d / (n (n - d)), and the log-log band S^exp(+-z sqrt(V) / |log S|)
    # with z = z_0.975. Its lower edge first falls to 0.5 at 3 (0.47), its upper at 10
    # (0.44); a linear band would give 4 (0.48) and a 90 % one 4 and 9 (0.499).
    samples = [(t, True) for t in range(1, 11)] + [(t, False) for t in (4, 6, 12, 12)]
    z, survival, v, low, high = sp.norm.ppf(0.975), 1.0, 0.0, [], []
    for t in range(1, 11):
        n = sum(s >= t for s, _ in samples)
        survival *= 1 - 1 / n
        v += 1 / (n * (n - 1))
        spread = math.exp(z * math.sqrt(v) / abs(math.log(survival)))
        low.append(survival**spread)
        high.append(survival ** (1 / spread))
    first = [next(t for t, s in zip(range(1, 11), edge) if s <= 0.5) for edge in (low, high)]
    assert first == [3, 10]
    assert stats.km_median(samples) == {"median": 7.0, "ci": first, "n": 14, "censored": 4}


def test_cv_and_detrended_cv():
    trend = [1.0 + 0.1 * k for k in range(10)]  # pure trend: all its CV is the trend
    assert stats.cv_pct(trend) == pytest.approx(100 * statistics.stdev(trend) / 1.45)
    assert stats.detrended_cv_pct(trend) == pytest.approx(0.0, abs=1e-12)
    noisy = [2.0, 2.2, 1.9, 2.3, 2.1, 2.4]
    fit = np.polyval(np.polyfit(range(6), noisy, 1), range(6))
    se = math.sqrt(sum((y - f) ** 2 for y, f in zip(noisy, fit, strict=True)) / 4)
    assert stats.detrended_cv_pct(noisy) == pytest.approx(100 * se / statistics.fmean(noisy))
    assert stats.detrended_cv_pct([1.0, None, 2.0]) is None
    # n = 2 leaves no degree of freedom around a line; a mean of 0 or below has no CV
    for losses in ([1.0, 2.0], [-1.0, 0.0, 1.0], [-3.0, -1.0, -2.0]):
        assert stats.detrended_cv_pct(losses) is None, losses
    # [2, 3, 4]: std 1, mean 3
    assert stats.cv_pct([2.0, 3.0, 4.0]) == pytest.approx(100 / 3)
    for losses in ([2.0], [2.0, None], [2.0, math.inf], [-1.0, 1.0], [-2.0, -1.0]):
        assert stats.cv_pct(losses) is None, losses


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
    assert stats.min_detectable(1.0, 1) is None  # one pair: no sd, no test


def test_min_detectable_counts_both_tails():
    # n = 5 at level 0.5: the critical value t_{4, 0.75} = 0.74 is small enough that the
    # lower tail holds 0.016 of the power, far above the root's 1e-6 tolerance
    delta = stats.min_detectable(1.0, 5, 0.5)
    crit, nc = sp.t.ppf(0.75, 4), delta * math.sqrt(5)
    lower = sp.nct.cdf(-crit, 4, nc)
    assert lower > 0.01
    assert sp.nct.sf(crit, 4, nc) + lower == pytest.approx(0.8)


def test_stein_total():
    # n0 = 5, s = 0.5 points, D = 0.3: (t_{4,0.975} 0.5 / 0.3)^2 = (2.776 x 1.667)^2 = 21.4
    assert stats.stein_n(0.5, 5, 0.3) == math.ceil((sp.t.ppf(0.975, 4) * 0.5 / 0.3) ** 2) == 22
    assert stats.stein_n(0.01, 5, 0.3) == 5  # never fewer than the pilot
    for n0, half_width in ((1, 0.3), (5, 0.0)):
        with pytest.raises(ValueError, match="needs a pilot of n0 >= 2 and a half-width > 0"):
            stats.stein_n(0.5, n0, half_width)


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


# --- what mutmut's survivors showed untested (benchmarks/mutation.py stats) ----------------


def test_the_detectable_difference_scales_with_the_sd_and_two_pairs_suffice():
    """The noncentrality is delta sqrt(n) / sd, so the mdd is proportional to sd; a paired t
    test needs two pairs (df 1), and Stein's pilot too."""
    assert stats.min_detectable(3.0, 10) == pytest.approx(3 * stats.min_detectable(1.0, 10))
    assert stats.min_detectable(1.0, 2) > stats.min_detectable(1.0, 3) > 0
    assert stats.stein_n(1.0, 2, 1.0) == math.ceil(sp.t.ppf(0.975, 1) ** 2)
    with pytest.raises(ValueError) as refused:
        stats.stein_n(1.0, 1, 1.0)
    message = "Stein's procedure needs a pilot of n0 >= 2 and a half-width > 0"
    assert str(refused.value) == message


def test_detrended_cv_of_three_losses_with_a_mean_below_one():
    """(0.5, 0.7, 0.5): the line is flat at the mean 1.7/3, the residuals -h/3, 2h/3, -h/3
    (h = 0.2) square to 2h^2/3 over n - 2 = 1 degree of freedom."""
    expected = 100 * math.sqrt(2 / 3) * 0.2 / (1.7 / 3)
    assert stats.detrended_cv_pct([0.5, 0.7, 0.5]) == pytest.approx(expected)


def test_fisher_counts_each_arms_runs_that_did_not_diverge():
    p = sp.fisher_exact([[0, 5], [5, 0]])[1]  # 2 / C(10, 5) = 0.0079
    assert stats.fisher(0, 5, 5, 5) == {"p": pytest.approx(p), "note": ""}
    assert stats.fisher(0, 0, 1, 2) == {"p": None, "note": "no finished run: no test"}


def test_logrank_of_one_reach_each_and_of_identical_times():
    """a reaches at 1, b at 2: at t = 1 two at risk, E = 1/2, variance 1/4; at t = 2 one
    at risk adds no variance: chi2 = (1/2)^2 / (1/4) = 1."""
    assert stats.logrank([(1.0, True)], [(2.0, True)]) == {
        "p": pytest.approx(sp.chi2.sf(1.0, 1)),
        "chi2": 1.0,
        "o_minus_e": 0.5,
        "note": "",
    }
    untested = {"p": None, "chi2": None, "o_minus_e": 0.0}
    # both at once: E = O, and (n - d) = 0 leaves no variance
    assert stats.logrank([(1.0, True)], [(1.0, True)]) == {
        **untested,
        "note": "identical times: no test",
    }
    assert stats.logrank([(1.0, False)], [(2.0, False)]) == {
        **untested,
        "note": "not testable (no run reached the target)",
    }


def test_sign_flip_monte_carlo_p_counts_the_observed_pattern_once():
    """n = 40 equal differences: only the two constant sign patterns reach |sum| = 40, and
    65536 random patterns hit one with probability 65536 * 2^-39 (about 1e-7): p is the
    observed pattern alone, 1 / (RESAMPLES + 1)."""
    assert stats.sign_flip_p([1.0] * 40) == 1 / (stats.RESAMPLES + 1)


def test_paired_needs_pairs_and_says_why_it_tests_nothing():
    with pytest.raises(ValueError):
        stats.paired([1.0, 2.0, 3.0], [1.0, 2.0])
    none = {"design": "paired", "ci": None, "p": None, "p_exact": None}
    assert stats.paired([], []) == {
        **none,
        "n": 0,
        "diff": None,
        "sd": None,
        "note": "no pairs to compare",
    }
    assert stats.paired([1.0, 2.0], [1.0, 2.0]) == {
        **none,
        "n": 2,
        "diff": 0.0,
        "sd": 0.0,
        "note": "identical values: no test",
    }
    # d = (1, 1): no interval, but the exact sign-flip p is 2 of 4 patterns
    assert stats.paired([2.0, 3.0], [1.0, 2.0]) == {
        **none,
        "n": 2,
        "diff": 1.0,
        "sd": 0.0,
        "p": 0.5,
        "p_exact": 0.5,
        "note": "identical differences: no interval",
    }


def test_the_note_says_why_there_is_no_test_and_is_empty_when_there_is_one():
    assert stats.paired([1.0, 2.0, 4.0], [0.5, 1.0, 1.0])["note"] == ""
    assert stats.welch([1.0, 2.0], [3.0, 5.0])["note"] == ""
    assert stats.welch([1.0, 1.0], [1.0, 1.0])["note"] == "identical values: no test"
    assert stats.welch([1.0, 1.0], [2.0, 2.0])["note"] == "not testable (zero variance)"


def test_welch_with_an_empty_arm_tests_nothing():
    assert stats.welch([], [1.0, 2.0]) == {
        "design": "unpaired",
        "n": [0, 2],
        "diff": None,
        "sd": None,
        "ci": None,
        "p": None,
        "p_exact": None,
        "note": "no values to compare",
    }


def test_the_expected_max_band_of_one_score_is_that_score():
    assert stats.expected_max_band([0.7]) == ([0.7], [0.7])


def test_the_expected_max_band_takes_its_two_quantiles():
    """Scores 0..19, k = 1: the curve is the mean of 20 draws with replacement, whose exact
    distribution is the 20-fold convolution of the uniform one (steps of 0.05). With 10^5
    resamples the Monte Carlo s.e. of a 2.5 % quantile is about 0.011, so the band's edges
    lie within 0.1 of the exact 2.5 % and 97.5 % quantiles; the 1.7 % or 5 % quantile lies
    0.2 or more off."""
    pmf = np.ones(1)
    for _ in range(20):
        pmf = np.convolve(pmf, np.full(20, 1 / 20))
    cdf = np.cumsum(pmf)
    low, high = stats.expected_max_band([float(i) for i in range(20)], resamples=100_000)
    assert low[0] == pytest.approx(np.searchsorted(cdf, 0.025) / 20, abs=0.1)
    assert high[0] == pytest.approx(np.searchsorted(cdf, 0.975) / 20, abs=0.1)
