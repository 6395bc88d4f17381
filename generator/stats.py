"""The statistics of the verdict: pure functions of numbers (no files, no words).

Each returns plain numbers (None where a number does not exist) and, where a test cannot be
made, a short `note`; report.py stores them in report.json and report_md.py words them.
Every function is checked against scipy or a closed form in tests/test_stats.py.
"""

from __future__ import annotations

import itertools
import math
import statistics
import warnings
from typing import Any

# The seed paper's CV (Table II): one definition, emitted into the scripts' summary too.
from generator.method.summary import cv_pct  # noqa: F401 (stats.cv_pct is the report's)

ALPHA = 0.05
POWER = 0.8
EXACT_MAX_N = 16  # the sign-flip test enumerates all 2^n patterns up to this n
RESAMPLES = 2**16  # beyond it: this many random sign patterns, from a fixed seed
TOLERANCE = 1e-12  # |mean| within this (relative) of the observed one counts as "as extreme"


def finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1) and n; std is None below two values."""
    values = finite(values)
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def sign_flip_p(d: list[float]) -> float:
    """Two-sided p of the sign-flip permutation test of mean(d) = 0: the share of sign
    patterns whose |mean| is at least the observed one. Zeros stay in (their sign flips to
    themselves) and ties count as "as extreme". Exact (all 2^n patterns) for n <= EXACT_MAX_N;
    above it RESAMPLES random patterns from a fixed seed, the observed one included."""
    observed = abs(math.fsum(d))
    bar = observed * (1 - TOLERANCE)
    if len(d) <= EXACT_MAX_N:
        patterns = itertools.product((1, -1), repeat=len(d))
        hits = total = 0
        for signs in patterns:
            total += 1
            hits += abs(math.fsum(s * x for s, x in zip(signs, d, strict=True))) >= bar
        return hits / total
    import numpy as np

    rng = np.random.default_rng(0)
    signs = rng.choice((-1.0, 1.0), size=(RESAMPLES, len(d)))
    sums = np.abs(signs @ np.asarray(d))
    return float((np.sum(sums >= bar) + 1) / (RESAMPLES + 1))


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """a - b over pairs (a[i], b[i]): the mean difference, its 95 % paired t interval and p,
    the exact sign-flip p (no normality assumed), n and sd of the differences."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    out: dict[str, Any] = {"design": "paired", "n": len(d), "diff": None, "sd": None}
    out.update({"ci": None, "p": None, "p_exact": None, "note": ""})
    if not d:
        return {**out, "note": "no pairs to compare"}
    out["diff"] = statistics.fmean(d)
    if len(d) < 2:
        return {**out, "note": "n < 2 pairs: no test"}
    out["sd"] = statistics.stdev(d)
    if out["sd"] == 0:
        note = "identical differences: no interval" if out["diff"] else "identical values: no test"
        exact = sign_flip_p(d) if out["diff"] else None
        return {**out, "p": exact, "p_exact": exact, "note": note}
    from scipy import stats

    result = stats.ttest_rel(a, b)
    ci = result.confidence_interval(1 - ALPHA)
    # the verdict's p is the paired t's (it agrees with the interval); the exact sign-flip p
    # beside it assumes no normality, but cannot fall below 2 / 2^n (0.0625 at n = 5)
    out.update(ci=[float(ci.low), float(ci.high)], p=float(result.pvalue), p_exact=sign_flip_p(d))
    return out


def welch(a: list[float], b: list[float]) -> dict[str, Any]:
    """Welch's t-test of a against b (runs that do not pair) and the 95 % Welch interval of
    mean(a) - mean(b)."""
    out: dict[str, Any] = {"design": "unpaired", "n": [len(a), len(b)], "diff": None}
    out.update({"sd": None, "ci": None, "p": None, "p_exact": None, "note": ""})
    if not a or not b:
        return {**out, "note": "no values to compare"}
    out["diff"] = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {**out, "note": "n < 2: no test"}
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        note = "not testable (zero variance)" if out["diff"] else "identical values: no test"
        return {**out, "note": note}
    from scipy import stats

    with warnings.catch_warnings():  # near-identical samples: scipy warns, the p stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(1 - ALPHA)
    p = float(result.pvalue)
    return {**out, "ci": [float(ci.low), float(ci.high)], "p": p}


def fisher(diverged_a: int, n_a: int, diverged_b: int, n_b: int) -> dict[str, Any]:
    """Fisher's exact test (two-sided) of the rates diverged_a/n_a and diverged_b/n_b."""
    if not n_a or not n_b:
        return {"p": None, "note": "no finished run: no test"}
    from scipy import stats

    table = [[diverged_a, n_a - diverged_a], [diverged_b, n_b - diverged_b]]
    return {"p": float(stats.fisher_exact(table).pvalue), "note": ""}


def logrank(a: list[tuple[float, bool]], b: list[tuple[float, bool]]) -> dict[str, Any]:
    """The log-rank test of two samples of (time, reached); a run that did not reach the
    target is censored at its time. O - E is a's observed minus expected reaches; positive
    means a reaches the target sooner."""
    times = sorted({t for t, reached in a + b if reached})
    o_minus_e = variance = 0.0
    for t in times:
        n1 = sum(s >= t for s, _ in a)  # at risk: not yet reached, not yet censored
        n = n1 + sum(s >= t for s, _ in b)
        d1 = sum(s == t and r for s, r in a)
        d = d1 + sum(s == t and r for s, r in b)
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            variance += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    if variance == 0:
        note = (
            "not testable (no run reached the target)" if not times else "identical times: no test"
        )
        return {"p": None, "chi2": None, "o_minus_e": o_minus_e, "note": note}
    from scipy import stats

    chi2 = o_minus_e**2 / variance
    return {"p": float(stats.chi2.sf(chi2, 1)), "chi2": chi2, "o_minus_e": o_minus_e, "note": ""}


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni adjusted p-values over one family (the keys with a p)."""
    ranked = sorted((p, k) for k, p in pvalues.items() if p is not None)
    adjusted: dict[str, float | None] = {k: None for k in pvalues}
    running = 0.0
    for i, (p, k) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - i) * p))
        adjusted[k] = running
    return adjusted


def factorial(cells: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-seed contrasts of a 2x2 design from its cells' per-seed values (aligned lists):
    "00" neither factor, "10" the first (detector), "01" the second (decay), "11" both."""
    c00, c10, c01, c11 = (cells[k] for k in ("00", "10", "01", "11"))
    rows = list(zip(c00, c10, c01, c11, strict=True))
    return {
        "first": [((x10 - x00) + (x11 - x01)) / 2 for x00, x10, x01, x11 in rows],
        "second": [((x01 - x00) + (x11 - x10)) / 2 for x00, x10, x01, x11 in rows],
        "interaction": [(x11 - x10) - (x01 - x00) for x00, x10, x01, x11 in rows],
    }


def km_median(samples: list[tuple[float, bool]]) -> dict[str, Any]:
    """Kaplan-Meier median of (time, reached) with its 95 % interval: the first time at
    which the survival curve (its log-log confidence band's lower and upper edges) falls to
    0.5 or below; None where it never does ("not reached")."""
    out: dict[str, Any] = {"median": None, "ci": [None, None], "n": len(samples)}
    out["censored"] = sum(not r for _, r in samples)
    if not any(r for _, r in samples):
        return out
    from scipy import stats

    data = stats.CensoredData(
        uncensored=[t for t, r in samples if r], right=[t for t, r in samples if not r]
    )
    sf = stats.ecdf(data).sf
    with warnings.catch_warnings():  # the band is undefined where S is 0 or 1: nan, skipped
        warnings.simplefilter("ignore", RuntimeWarning)
        band = sf.confidence_interval(1 - ALPHA, method="log-log")

    def first(times: Any, probabilities: Any) -> float | None:
        hit = [float(t) for t, s in zip(times, probabilities, strict=True) if s <= 0.5]
        return hit[0] if hit else None

    def edge(probabilities: Any) -> list[float]:  # nan where S is 0 or 1: S itself
        return [e if math.isfinite(e) else s for e, s in zip(probabilities, sf.probabilities, strict=True)]

    out["median"] = first(sf.quantiles, sf.probabilities)
    out["ci"] = [
        first(band.low.quantiles, edge(band.low.probabilities)),
        first(band.high.quantiles, edge(band.high.probabilities)),
    ]
    return out


def detrended_cv_pct(losses: list[float | None]) -> float | None:
    """CV of the residuals around a least-squares line over the same window: the residual
    standard deviation (n - 2 degrees of freedom) / mean * 100, so a steady trend (e.g.
    over-fitting) is not counted as noise. None below three losses or if one is missing."""
    if len(losses) < 3 or any(v is None or not math.isfinite(v) for v in losses):
        return None
    mean = statistics.fmean(losses)
    if mean <= 0:
        return None
    import numpy as np

    x = np.arange(len(losses), dtype=float)
    slope, intercept = np.polyfit(x, np.asarray(losses, dtype=float), 1)
    residuals = np.asarray(losses) - (intercept + slope * x)
    return 100 * math.sqrt(float(residuals @ residuals) / (len(losses) - 2)) / mean


def _power(delta: float, sd: float, n: int, alpha: float) -> float:
    from scipy import stats

    crit = stats.t.ppf(1 - alpha / 2, n - 1)
    nc = delta * math.sqrt(n) / sd
    lower = float(stats.nct.cdf(-crit, n - 1, nc))  # nan far out in the tail, where it is 0
    return float(stats.nct.sf(crit, n - 1, nc)) + (0.0 if math.isnan(lower) else lower)


def min_detectable(sd: float | None, n: int, alpha: float = ALPHA) -> float | None:
    """The smallest true mean difference a two-sided paired t-test at level alpha detects
    with power POWER, given n pairs whose differences have standard deviation sd."""
    if sd is None or sd <= 0 or n < 2:
        return None
    from scipy import optimize

    high = sd
    while _power(high, sd, n, alpha) < POWER:
        high *= 2
    return float(optimize.brentq(lambda x: _power(x, sd, n, alpha) - POWER, 0.0, high))


def stein_n(sd: float, n0: int, half_width: float, alpha: float = ALPHA) -> int:
    """Stein's two-stage total: after a pilot of n0 pairs with sd of their differences sd,
    N = max(n0, ceil((t_{n0-1, 1-alpha/2} * sd / half_width)^2)) pairs in all make
    mean(d) +- half_width an interval of coverage >= 1 - alpha (Stein 1945)."""
    if n0 < 2 or half_width <= 0:
        raise ValueError("Stein's procedure needs a pilot of n0 >= 2 and a half-width > 0")
    from scipy import stats

    t = float(stats.t.ppf(1 - alpha / 2, n0 - 1))
    return max(n0, math.ceil((t * sd / half_width) ** 2))


def expected_max(scores: list[float]) -> list[float]:
    """The expected best of k trials drawn with replacement from the N observed scores, for
    k = 1..N (Dodge et al. 2019, "Show Your Work"): with v_(1) <= ... <= v_(N),
    E[max_k] = sum_i v_(i) ((i/N)^k - ((i - 1)/N)^k)."""
    v = sorted(scores)
    n = len(v)
    return [
        math.fsum(x * ((i / n) ** k - ((i - 1) / n) ** k) for i, x in enumerate(v, 1))
        for k in range(1, n + 1)
    ]


def expected_max_band(
    scores: list[float], level: float = 1 - ALPHA, resamples: int = 1000, seed: int = 0
) -> tuple[list[float], list[float]]:
    """The percentile bootstrap band of expected_max over the N trials: each resample draws
    N scores with replacement (from a fixed seed); per k, the (1 - level)/2 and
    (1 + level)/2 quantiles of its curve."""
    import numpy as np

    n = len(scores)
    if n == 0:
        return [], []
    rng = np.random.default_rng(seed)
    v = np.sort(rng.choice(np.asarray(scores, dtype=float), size=(resamples, n)), axis=1)
    i = np.arange(1, n + 1) / n
    k = np.arange(1, n + 1)[:, None]
    weights = i[None, :] ** k - (i[None, :] - 1 / n) ** k  # k x N
    curves = v @ weights.T  # resamples x k
    low, high = np.quantile(curves, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return low.tolist(), high.tolist()
