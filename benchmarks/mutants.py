"""Hand mutants: does the test suite catch each plausible one-line bug of the method, the
scripts' summary and the verdict's statistics?

    python benchmarks/mutants.py                      # every mutant, against its own tests
    python benchmarks/mutants.py tau3_tau4_swapped    # some of them, by name
    python benchmarks/mutants.py --full               # every mutant, against the whole suite
    python benchmarks/mutants.py --list               # the mutants and their tests

Each mutant is a one-line textual change to one file of the repository: a template, or a
generator module. Its pattern must occur in that file exactly once, so that a refactor makes
a mutant fail loudly instead of silently vanish. For each mutant the working tree (the files
git tracks or would track) is copied to a temporary folder, the change is made there,
generated/ is regenerated there with the real CLI when the file feeds generation (so the
golden test compares like with like), and pytest runs on the copy: the tests listed for the
mutant, or with --full the whole suite. The working tree itself is never modified.

First the same tests run on the unchanged copy: they must pass, so that a failure under a
mutant is the mutant's doing. A mutant is killed when pytest reports failed tests, survives
when they pass; anything else (the pattern not found once, generation failing, a test id that
no longer exists) is an error of the mutant's definition.

Exit status: 0 when every mutant is killed, 1 when one survives, 2 on an error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATS = "generator/stats.py"
# modules generation never imports: a change to them leaves generated/ as it is
OUTSIDE_GENERATION = {"generator/report.py", STATS}

DETECTOR = "generator/method/detector.py"
EPS_FULL = "generator/method/eps_full.py"
NOISE = "generator/method/noise.py"
ANTI_PGD = "generator/method/anti_pgd.py"
SUMMARY = "generator/method/summary.py"  # the scripts' summary and the report share it
FEATURES = "templates/_features.py.jinja"  # EMA and early stopping (the support module)
RUN = "templates/_run.py.jinja"  # evaluation and micro-batches (the support module)
DETECTOR_TESTS = "tests/test_detector.py::"
STATS_TESTS = "tests/test_stats.py::"
METHOD_TESTS = "tests/test_method_mutants.py::"
# tests/interpret/ (the Triton kernel under TRITON_INTERPRET=1) runs through this test
ANTICORRELATED = (
    "tests/test_peers.py::test_anti_pgd_perturbations_are_anticorrelated_and_do_not_accumulate"
)
INTERPRETER = "tests/test_kernels.py::test_triton_kernels_under_the_interpreter"
TREE_TESTS = (
    "tests/test_phase_tree.py::test_each_comparison_of_the_tree_at_its_threshold",
    "tests/test_phase_tree.py::test_the_tree_compares_each_statistic_with_its_own_threshold",
)
FINE_TUNING_RULE = "if grad_var < tau3 and param_delta < tau4 and smooth_low:"
EXPLORATION_RULE = "if grad_var > tau1 and param_delta > tau2 and smooth_high:"
HOLM_STEP = "running = max(running, min(1.0, (len(ranked) - i) * p))"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # occurs exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids that should kill it


MUTANTS = [
    # --- the method (issue 30's table) ---
    Mutant(
        "decay_half_t_p",
        EPS_FULL,
        "-self.decay * (step - detector.phase_start)",
        "-self.decay * (step - detector.phase_start) / 2",
        (DETECTOR_TESTS + "test_eps_of_each_arm_follows_its_formula",),
    ),
    Mutant(
        "tau3_tau4_swapped",
        DETECTOR,
        FINE_TUNING_RULE,
        "if grad_var < tau4 and param_delta < tau3 and smooth_low:",
        TREE_TESTS,
    ),
    Mutant(
        "grad_var_le_tau3",
        DETECTOR,
        FINE_TUNING_RULE,
        "if grad_var <= tau3 and param_delta < tau4 and smooth_low:",
        TREE_TESTS,
    ),
    Mutant(
        "tau1_tau2_swapped",
        DETECTOR,
        EXPLORATION_RULE,
        "if grad_var > tau2 and param_delta > tau1 and smooth_high:",
        TREE_TESTS,
    ),
    Mutant(
        "grad_var_ge_tau1",
        DETECTOR,
        EXPLORATION_RULE,
        "if grad_var >= tau1 and param_delta > tau2 and smooth_high:",
        TREE_TESTS,
    ),
    Mutant(
        "loss_smooth_le_tau_smooth",
        DETECTOR,
        "smooth_low = self.tau_smooth is None or loss_smooth < self.tau_smooth",
        "smooth_low = self.tau_smooth is None or loss_smooth <= self.tau_smooth",
        TREE_TESTS,
    ),
    Mutant(
        "patience_one_vote_late",
        DETECTOR,
        "if self.votes < self.patience:",
        "if self.votes <= self.patience:",
        ("tests/test_phase_tree.py::test_patience_and_monotonic_on_scripted_windows",),
    ),
    Mutant(
        "noise_std_eps_squared",
        NOISE,
        "target.add_(scratch, alpha=eps)",
        "target.add_(scratch, alpha=eps * eps)",
        (DETECTOR_TESTS + "test_applied_noise_has_std_eps",),
    ),
    Mutant(
        "loss_smooth_first_difference",
        DETECTOR,
        "abs(loss[i] - 2 * loss[i - 1] + loss[i - 2])",
        "abs(loss[i] - loss[i - 1])",
        (DETECTOR_TESTS + "test_statistics_of_the_window",),
    ),
    Mutant(
        "noise_rng_not_restored",
        NOISE,
        "generator.set_state(saved)",
        "generator.get_state()",
        (DETECTOR_TESTS + "test_resume_restores_the_detector_and_schedule_exactly",),
    ),
    # --- what mutmut leaves alone: decorated functions (benchmarks/mutation.py) ---
    Mutant(
        "kernel_mask_one_past",
        NOISE,
        "mask = offs < n_noise",
        "mask = offs <= n_noise",
        (INTERPRETER,),
    ),
    Mutant(
        "kernel_overwrites",
        NOISE,
        "tl.store(p_ptr + offs, p + eps * tl.randn(key, offs), mask=mask)",
        "tl.store(p_ptr + offs, eps * tl.randn(key, offs), mask=mask)",
        (INTERPRETER,),
    ),
    Mutant(
        "kernel_same_noise_every_block",
        NOISE,
        "p + eps * tl.randn(key, offs)",
        "p + eps * tl.randn(key, tl.arange(0, BLOCK))",
        (INTERPRETER,),
    ),
    Mutant(
        "triton_key_without_step",
        NOISE,
        "noise_add(self.flat, self.n_noise, eps, self.key_base | step)",
        "noise_add(self.flat, self.n_noise, eps, self.key_base)",
        (INTERPRETER,),
    ),
    Mutant(
        "torch_path_first_slice_only",
        NOISE,
        "for part in self.slices:",
        "for part in self.slices[:1]:",
        (METHOD_TESTS + "test_the_torch_path_adds_eps_times_its_own_streams",),
    ),
    Mutant(
        "threads_first_slice_only",
        NOISE,
        "list(self.pool.map(add_noise, self.slices, [eps] * len(self.slices)))",
        "list(self.pool.map(add_noise, self.slices[:1], [eps]))",
        (METHOD_TESTS + "test_threads_from_a_million_values_on_the_cpu_draw_the_same_stream",),
    ),
    # AntiPGD.apply is under @torch.no_grad() too
    Mutant(
        "anti_pgd_xi_never_taken_out",
        ANTI_PGD,
        "if self.last > 0:",
        "if self.last < 0:",
        (ANTICORRELATED,),
    ),
    Mutant(
        "anti_pgd_xi_added_twice",
        ANTI_PGD,
        "self.theta.add_(self.flat)",
        "self.theta.add_(self.flat, alpha=2)",
        (ANTICORRELATED,),
    ),
    Mutant(
        "ema_decay_swapped",
        FEATURES,
        "torch._foreach_lerp_(*self.pairs, 1 - self.decay)",
        "torch._foreach_lerp_(*self.pairs, self.decay)",
        (
            "tests/test_ema_early_stop_groups.py::test_ema_is_the_recurrence_over_the_raw_trajectory",
        ),
    ),
    Mutant(
        "label_smoothing_in_val_loss",
        RUN,
        'F.cross_entropy(logits.float(), yb, reduction="sum")',
        'F.cross_entropy(logits.float(), yb, reduction="sum", label_smoothing=0.1)',
        ("tests/test_step_features.py::test_label_smoothing_is_in_the_training_loss_only",),
    ),
    Mutant(
        "accumulation_weight_1_over_k",
        RUN,
        "yield x, y, len(y) / len(yb)",
        "yield x, y, 1 / len(chunks)",
        ("tests/test_step_features.py::test_micro_batches_give_the_big_batch_gradient",),
    ),
    Mutant(
        "cv_divides_by_n",  # the scripts' summary.json and the report's CV: one source
        SUMMARY,
        "return 100 * statistics.stdev(losses) / mean",
        "return 100 * statistics.pstdev(losses) / mean",
        (
            "tests/test_scripts.py::test_summary_cv_is_the_sample_cv_of_the_last_window",
            STATS_TESTS + "test_cv_and_detrended_cv",
        ),
    ),
    Mutant(
        "cv_of_one_loss",
        SUMMARY,
        "if len(losses) < 2 or",
        "if len(losses) < 1 or",
        (STATS_TESTS + "test_cv_and_detrended_cv",),
    ),
    Mutant(
        "cv_of_a_negative_mean",
        SUMMARY,
        "/ mean if mean > 0 else None",
        "/ mean if mean != 0 else None",
        (STATS_TESTS + "test_cv_and_detrended_cv",),
    ),
    # --- the verdict's statistics (generator/stats.py), each against scipy or a closed form ---
    *(
        Mutant(name, STATS, old, new, tuple(STATS_TESTS + test for test in tests))
        for name, old, new, *tests in (
            (
                "mean_std_ddof_0",
                "std = statistics.stdev(values) if len(values) > 1 else None",
                "std = statistics.pstdev(values) if len(values) > 1 else None",
                "test_mean_std_is_the_sample_std",
            ),
            (
                "mean_std_of_one_value",
                "std = statistics.stdev(values) if len(values) > 1 else None",
                "std = statistics.stdev(values) if len(values) > 0 else None",
                "test_mean_std_is_the_sample_std",
            ),
            (
                "mean_std_of_three_values",
                "std = statistics.stdev(values) if len(values) > 1 else None",
                "std = statistics.stdev(values) if len(values) > 2 else None",
                "test_mean_std_is_the_sample_std",
            ),
            (
                "finite_keeps_inf",
                "return [v for v in values if v is not None and math.isfinite(v)]",
                "return [v for v in values if v is not None and not math.isnan(v)]",
                "test_mean_std_is_the_sample_std",
            ),
            (
                "sign_flip_one_sided",
                "hits += abs(math.fsum(s * x for s, x in zip(signs, d, strict=True))) >= bar",
                "hits += math.fsum(s * x for s, x in zip(signs, d, strict=True)) >= bar",
                "test_sign_flip_is_exact_and_matches_scipy",
            ),
            (
                "sign_flip_ties_not_extreme",
                "bar = observed * (1 - TOLERANCE)",
                "bar = observed * (1 + TOLERANCE)",
                "test_sign_flip_is_exact_and_matches_scipy",
            ),
            (
                "sign_flip_exact_limit_off_by_one",
                "if len(d) <= EXACT_MAX_N:",
                "if len(d) < EXACT_MAX_N:",
                "test_sign_flip_is_exact_up_to_its_limit",
            ),
            (
                "sign_flip_monte_carlo_p_can_be_0",
                "return float((np.sum(sums >= bar) + 1) / (RESAMPLES + 1))",
                "return float(np.sum(sums >= bar) / RESAMPLES)",
                "test_sign_flip_above_the_exact_limit_is_close_to_the_exact_p",
            ),
            (
                "paired_difference_reversed",
                "d = [x - y for x, y in zip(a, b, strict=True)]",
                "d = [y - x for x, y in zip(a, b, strict=True)]",
                "test_paired_interval_is_scipy_ttest_rel",
            ),
            (
                "paired_sd_ddof_0",
                'out["sd"] = statistics.stdev(d)',
                'out["sd"] = statistics.pstdev(d)',
                "test_paired_interval_is_scipy_ttest_rel",
            ),
            (
                "paired_one_sided",
                "result = stats.ttest_rel(a, b)",
                'result = stats.ttest_rel(a, b, alternative="greater")',
                "test_paired_interval_is_scipy_ttest_rel",
            ),
            (
                "paired_needs_three_pairs",
                "if len(d) < 2:",
                "if len(d) < 3:",
                "test_paired_interval_is_scipy_ttest_rel",
            ),
            (
                "intervals_90_percent",
                "ALPHA = 0.05",
                "ALPHA = 0.1",
                "test_paired_interval_is_scipy_ttest_rel",
                "test_welch_is_scipy_and_zero_variance_is_not_testable",
            ),
            (
                "welch_as_student_t",
                "result = stats.ttest_ind(a, b, equal_var=False)",
                "result = stats.ttest_ind(a, b, equal_var=True)",
                "test_welch_matches_scipy_with_unequal_sizes_and_variances",
            ),
            (
                "welch_one_sided",
                "result = stats.ttest_ind(a, b, equal_var=False)",
                'result = stats.ttest_ind(a, b, equal_var=False, alternative="less")',
                "test_welch_matches_scipy_with_unequal_sizes_and_variances",
            ),
            (
                "welch_difference_reversed",
                'out["diff"] = statistics.fmean(a) - statistics.fmean(b)',
                'out["diff"] = statistics.fmean(b) - statistics.fmean(a)',
                "test_welch_matches_scipy_with_unequal_sizes_and_variances",
            ),
            (
                "welch_one_constant_sample_untestable",
                "if statistics.variance(a) == 0 and statistics.variance(b) == 0:",
                "if statistics.variance(a) == 0 or statistics.variance(b) == 0:",
                "test_welch_is_scipy_and_zero_variance_is_not_testable",
            ),
            (
                "welch_of_one_value",
                "if len(a) < 2 or len(b) < 2:",
                "if len(a) < 2 and len(b) < 2:",
                "test_welch_is_scipy_and_zero_variance_is_not_testable",
            ),
            (
                "fisher_one_sided",
                "stats.fisher_exact(table).pvalue",
                'stats.fisher_exact(table, alternative="greater").pvalue',
                "test_fisher_by_hand",
            ),
            (
                "fisher_table_of_totals",
                "table = [[diverged_a, n_a - diverged_a], [diverged_b, n_b - diverged_b]]",
                "table = [[diverged_a, n_a], [diverged_b, n_b]]",
                "test_fisher_by_hand",
            ),
            (
                "fisher_with_an_empty_arm",
                "if not n_a or not n_b:",
                "if not n_a and not n_b:",
                "test_fisher_by_hand",
            ),
            (
                "logrank_at_risk_excludes_its_time",
                "n1 = sum(s >= t for s, _ in a)",
                "n1 = sum(s > t for s, _ in a)",
                "test_logrank_matches_scipy_with_ties_and_censoring",
            ),
            (
                "logrank_censored_counts_as_reached",
                "d1 = sum(s == t and r for s, r in a)",
                "d1 = sum(s == t for s, _ in a)",
                "test_logrank_matches_scipy_with_ties_and_censoring",
            ),
            (
                "logrank_without_tie_correction",
                "variance += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)",
                "variance += d * (n1 / n) * (1 - n1 / n)",
                "test_logrank_matches_scipy_with_ties_and_censoring",
            ),
            (
                "logrank_one_at_risk",
                "if n > 1:",
                "if n > 0:",
                "test_logrank_matches_scipy_with_ties_and_censoring",
            ),
            (
                "logrank_one_sided",
                "stats.chi2.sf(chi2, 1)",
                "stats.chi2.sf(chi2, 1) / 2",
                "test_logrank_matches_scipy_with_ties_and_censoring",
            ),
            (
                "logrank_o_minus_e_sign",
                "o_minus_e += d1 - d * n1 / n",
                "o_minus_e += d * n1 / n - d1",
                "test_logrank_matches_scipy",
            ),
            (
                "holm_without_running_max",
                HOLM_STEP,
                "running = min(1.0, (len(ranked) - i) * p)",
                "test_holm_caps_at_one_and_never_decreases",
            ),
            (
                "holm_as_bonferroni",
                HOLM_STEP,
                "running = max(running, min(1.0, len(ranked) * p))",
                "test_holm_by_hand",
            ),
            (
                "holm_uncapped",
                HOLM_STEP,
                "running = max(running, (len(ranked) - i) * p)",
                "test_holm_caps_at_one_and_never_decreases",
            ),
            (
                "holm_largest_p_first",
                "ranked = sorted((p, k) for k, p in pvalues.items() if p is not None)",
                "ranked = sorted(((p, k) for k, p in pvalues.items() if p is not None), reverse=True)",
                "test_holm_by_hand",
            ),
            (
                "factorial_factors_swapped",
                '("00", "10", "01", "11")',
                '("00", "01", "10", "11")',
                "test_factorial_contrasts_by_hand",
            ),
            (
                "factorial_unaligned_cells",
                "rows = list(zip(c00, c10, c01, c11, strict=True))",
                "rows = list(zip(c00, c10, c01, c11, strict=False))",
                "test_factorial_contrasts_by_hand",
            ),
            (
                "factorial_first_as_a_difference",
                '"first": [((x10 - x00) + (x11 - x01)) / 2',
                '"first": [((x10 - x00) - (x11 - x01)) / 2',
                "test_factorial_contrasts_by_hand",
            ),
            (
                "factorial_second_not_halved",
                '"second": [((x01 - x00) + (x11 - x10)) / 2',
                '"second": [((x01 - x00) + (x11 - x10))',
                "test_factorial_contrasts_by_hand",
            ),
            (
                "factorial_interaction_sign",
                '"interaction": [(x11 - x10) - (x01 - x00)',
                '"interaction": [(x01 - x00) - (x11 - x10)',
                "test_factorial_contrasts_by_hand",
            ),
            (
                "km_median_strictly_below_half",
                "for t, s in zip(times, probabilities, strict=True) if s <= 0.5]",
                "for t, s in zip(times, probabilities, strict=True) if s < 0.5]",
                "test_km_median_and_its_interval",
            ),
            (
                "km_censored_as_reached",
                "uncensored=[t for t, r in samples if r], right=[t for t, r in samples if not r]",
                "uncensored=[t for t, r in samples], right=[]",
                "test_km_median_and_its_interval",
            ),
            (
                "km_counts_the_reached_as_censored",
                'out["censored"] = sum(not r for _, r in samples)',
                'out["censored"] = sum(r for _, r in samples)',
                "test_km_median_and_its_interval",
            ),
            (
                "km_linear_band",
                'band = sf.confidence_interval(1 - ALPHA, method="log-log")',
                'band = sf.confidence_interval(1 - ALPHA, method="linear")',
                "test_km_interval_is_the_log_log_band_by_hand",
            ),
            (
                "km_band_90_percent",
                'band = sf.confidence_interval(1 - ALPHA, method="log-log")',
                'band = sf.confidence_interval(1 - 2 * ALPHA, method="log-log")',
                "test_km_interval_is_the_log_log_band_by_hand",
            ),
            (
                "km_lower_edge_from_the_upper_band",
                "first(band.low.quantiles, edge(band.low.probabilities)),",
                "first(band.high.quantiles, edge(band.high.probabilities)),",
                "test_km_median_and_its_interval",
            ),
            (
                "km_band_undefined_at_the_end",
                (
                    "return [e if math.isfinite(e) else s for e, s in"
                    " zip(probabilities, sf.probabilities, strict=True)]"
                ),
                "return list(probabilities)",
                "test_km_median_and_its_interval",
            ),
            (
                "detrended_cv_df_n_minus_1",
                "/ (len(losses) - 2)) / mean",
                "/ (len(losses) - 1)) / mean",
                "test_cv_and_detrended_cv",
            ),
            (
                "detrended_cv_of_two_losses",
                "if len(losses) < 3 or",
                "if len(losses) < 2 or",
                "test_cv_and_detrended_cv",
            ),
            (
                "detrended_cv_of_a_zero_mean",
                "if mean <= 0:",
                "if mean < 0:",
                "test_cv_and_detrended_cv",
            ),
            (
                "detrended_cv_not_detrended",
                "residuals = np.asarray(losses) - (intercept + slope * x)",
                "residuals = np.asarray(losses) - mean",
                "test_cv_and_detrended_cv",
            ),
            (
                "power_one_sided",
                "crit = stats.t.ppf(1 - alpha / 2, n - 1)",
                "crit = stats.t.ppf(1 - alpha, n - 1)",
                "test_min_detectable_difference",
            ),
            (
                "power_df_n",
                "crit = stats.t.ppf(1 - alpha / 2, n - 1)",
                "crit = stats.t.ppf(1 - alpha / 2, n)",
                "test_min_detectable_difference",
            ),
            (
                "power_noncentrality_sqrt_n_minus_1",
                "nc = delta * math.sqrt(n) / sd",
                "nc = delta * math.sqrt(n - 1) / sd",
                "test_min_detectable_difference",
            ),
            (
                "power_upper_tail_only",
                "return float(stats.nct.sf(crit, n - 1, nc)) + (0.0 if math.isnan(lower) else lower)",
                "return float(stats.nct.sf(crit, n - 1, nc))",
                "test_min_detectable_counts_both_tails",
            ),
            (
                "power_90_percent",
                "POWER = 0.8",
                "POWER = 0.9",
                "test_min_detectable_difference",
            ),
            (
                "min_detectable_of_one_pair",
                "if sd is None or sd <= 0 or n < 2:",
                "if sd is None or sd <= 0 or n < 1:",
                "test_min_detectable_difference",
            ),
            (
                "stein_df_n0",
                "t = float(stats.t.ppf(1 - alpha / 2, n0 - 1))",
                "t = float(stats.t.ppf(1 - alpha / 2, n0))",
                "test_stein_total",
            ),
            (
                "stein_one_sided",
                "t = float(stats.t.ppf(1 - alpha / 2, n0 - 1))",
                "t = float(stats.t.ppf(1 - alpha, n0 - 1))",
                "test_stein_total",
            ),
            (
                "stein_rounds",
                "return max(n0, math.ceil((t * sd / half_width) ** 2))",
                "return max(n0, round((t * sd / half_width) ** 2))",
                "test_stein_total",
            ),
            (
                "stein_below_the_pilot",
                "return max(n0, math.ceil((t * sd / half_width) ** 2))",
                "return math.ceil((t * sd / half_width) ** 2)",
                "test_stein_total",
            ),
            (
                "stein_pilot_of_one",
                "if n0 < 2 or half_width <= 0:",
                "if n0 < 1 or half_width <= 0:",
                "test_stein_total",
            ),
            (
                "stein_zero_half_width",
                "if n0 < 2 or half_width <= 0:",
                "if n0 < 2 or half_width < 0:",
                "test_stein_total",
            ),
        )
    ),
]


class BadMutant(Exception):
    """A mutant that cannot be applied or run as defined."""


def mutated(mutant: Mutant, text: str) -> str:
    """`text` with the mutant's one-line change; BadMutant unless the pattern occurs once."""
    if "\n" in mutant.old or "\n" in mutant.new or mutant.old == mutant.new:
        raise BadMutant(f"{mutant.name}: not a one-line change")
    count = text.count(mutant.old)
    if count != 1:
        raise BadMutant(
            f"{mutant.name}: {mutant.path} holds {mutant.old!r} {count} times, not once"
        )
    return text.replace(mutant.old, mutant.new)


def copy_working_tree(dest: Path) -> None:
    """The files git tracks or would track (not ignored ones: no venv, no runs)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run(cmd: list[str], cwd: Path, timeout: float) -> tuple[int | None, str]:
    """(exit status or None on timeout, the last lines of the output) of `cmd` in `cwd`,
    with the copy's code first on the import path."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    try:
        done = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return None, ""
    return done.returncode, "\n".join((done.stdout + done.stderr).splitlines()[-15:])


def pytest_cmd(tests: tuple[str, ...], full: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    return cmd + (["tests"] if full else ["-n", "0", *tests])


def try_mutant(mutant: Mutant, base: Path, work: Path, full: bool, timeout: float) -> str:
    """'killed', 'survived' or 'killed (timeout)'; BadMutant when it cannot be judged."""
    shutil.copytree(base, work)
    target = work / mutant.path
    target.write_text(mutated(mutant, target.read_text()))
    if mutant.path not in OUTSIDE_GENERATION:
        cmd = [sys.executable, "-m", "generator", "generate", "specs", "-o", "generated"]
        code, tail = run(cmd, work, timeout)
        if code != 0:
            raise BadMutant(f"{mutant.name}: generation failed (exit {code}):\n{tail}")
    code, tail = run(pytest_cmd(mutant.tests, full), work, timeout)
    if code is None:
        return "killed (timeout)"
    if code not in (0, 1):  # 2 interrupted, 4 usage error (a missing test id), 5 no tests
        raise BadMutant(f"{mutant.name}: pytest exited {code}:\n{tail}")
    return "survived" if code == 0 else "killed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--full", action="store_true", help="run the whole suite per mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    args = parser.parse_args()
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(f"error: no mutant named {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    chosen = [known[n] for n in args.names] or MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name}  {m.path}\n    - {m.old}\n    + {m.new}")
            print("".join(f"    test: {t}\n" for t in m.tests), end="")
        return 0
    try:  # every pattern is checked before anything runs
        for m in chosen:
            mutated(m, (REPO / m.path).read_text())
    except BadMutant as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="perturbgen-mutants-") as tmp:
        base = Path(tmp) / "base"
        copy_working_tree(base)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        code, tail = run(pytest_cmd(tests, args.full), base, args.timeout)
        if code != 0:
            print(f"error: the tests fail without any mutant (exit {code}):\n{tail}")
            return 2
        rows, errors = [], 0
        for i, m in enumerate(chosen):
            start = time.perf_counter()
            try:
                result = try_mutant(m, base, Path(tmp) / f"m{i}", args.full, args.timeout)
            except BadMutant as exc:
                print(f"error: {exc}", file=sys.stderr)
                result, errors = "error", errors + 1
            shutil.rmtree(Path(tmp) / f"m{i}", ignore_errors=True)
            rows.append((m.name, m.path, result, time.perf_counter() - start))
            print(f"{m.name}: {result}", file=sys.stderr, flush=True)
    survived = [r[0] for r in rows if r[2] == "survived"]
    print("| mutant | file | result | seconds |\n|---|---|---|---|")
    for name, path, result, seconds in rows:
        print(
            f"| {name} | {path} | {'**survived**' if result == 'survived' else result} | {seconds:.0f} |"
        )
    killed = sum(r[2].startswith("killed") for r in rows)
    print(f"\n{killed} of {len(rows)} killed ({'whole suite' if args.full else 'own tests'})")
    return 2 if errors else 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
