"""Hand mutants: does the test suite catch each plausible one-line bug of the method, the
scripts' summary and the report's statistics?

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
# modules that only read run folders: a change to them leaves generated/ as it is
READS_RUNS_ONLY = {"generator/report.py"}

PERTURBATION = "templates/_perturbation.py.jinja"
TRAINING = "templates/_training.py.jinja"
REPORT = "generator/report.py"
DETECTOR_TESTS = "tests/test_detector.py::"
TREE_TESTS = (
    "tests/test_phase_tree.py::test_each_comparison_of_the_tree_at_its_threshold",
    "tests/test_phase_tree.py::test_the_tree_compares_each_statistic_with_its_own_threshold",
)
FINE_TUNING_RULE = "if grad_var < TAU3 and param_delta < TAU4 and smooth_low:"
EXPLORATION_RULE = "if grad_var > TAU1 and param_delta > TAU2 and smooth_high:"
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
        PERTURBATION,
        "math.exp(-DECAY * (step - self.detector.phase_start))",
        "math.exp(-DECAY * (step - self.detector.phase_start) / 2)",
        (DETECTOR_TESTS + "test_eps_of_each_arm_follows_its_formula",),
    ),
    Mutant(
        "tau3_tau4_swapped",
        PERTURBATION,
        FINE_TUNING_RULE,
        "if grad_var < TAU4 and param_delta < TAU3 and smooth_low:",
        TREE_TESTS,
    ),
    Mutant(
        "grad_var_le_tau3",
        PERTURBATION,
        FINE_TUNING_RULE,
        "if grad_var <= TAU3 and param_delta < TAU4 and smooth_low:",
        TREE_TESTS,
    ),
    Mutant(
        "tau1_tau2_swapped",
        PERTURBATION,
        EXPLORATION_RULE,
        "if grad_var > TAU2 and param_delta > TAU1 and smooth_high:",
        TREE_TESTS,
    ),
    Mutant(
        "grad_var_ge_tau1",
        PERTURBATION,
        EXPLORATION_RULE,
        "if grad_var >= TAU1 and param_delta > TAU2 and smooth_high:",
        TREE_TESTS,
    ),
    Mutant(
        "loss_smooth_le_tau_smooth",
        PERTURBATION,
        "smooth_low = TAU_SMOOTH is None or loss_smooth < TAU_SMOOTH",
        "smooth_low = TAU_SMOOTH is None or loss_smooth <= TAU_SMOOTH",
        TREE_TESTS,
    ),
    Mutant(
        "patience_one_vote_late",
        PERTURBATION,
        "if self.votes < PATIENCE:",
        "if self.votes <= PATIENCE:",
        ("tests/test_phase_tree.py::test_patience_and_monotonic_on_scripted_windows",),
    ),
    Mutant(
        "noise_std_eps_squared",
        PERTURBATION,
        "target.add_(scratch, alpha=eps)",
        "target.add_(scratch, alpha=eps * eps)",
        (DETECTOR_TESTS + "test_applied_noise_has_std_eps",),
    ),
    Mutant(
        "loss_smooth_first_difference",
        PERTURBATION,
        "abs(loss[i] - 2 * loss[i - 1] + loss[i - 2])",
        "abs(loss[i] - loss[i - 1])",
        (DETECTOR_TESTS + "test_statistics_of_the_window",),
    ),
    Mutant(
        "noise_rng_not_restored",
        PERTURBATION,
        "generator.set_state(saved)",
        "generator.get_state()",
        (DETECTOR_TESTS + "test_resume_restores_the_detector_and_schedule_exactly",),
    ),
    Mutant(
        "ema_decay_swapped",
        TRAINING,
        "torch._foreach_lerp_(*self.pairs, 1 - EMA_DECAY)",
        "torch._foreach_lerp_(*self.pairs, EMA_DECAY)",
        (
            "tests/test_ema_early_stop_groups.py::test_ema_is_the_recurrence_over_the_raw_trajectory",
        ),
    ),
    Mutant(
        "label_smoothing_in_val_loss",
        TRAINING,
        'F.cross_entropy(logits.float(), yb, reduction="sum")',
        'F.cross_entropy(logits.float(), yb, reduction="sum"'
        "{% if m.smooths %}, label_smoothing=LABEL_SMOOTHING{% endif %})",
        ("tests/test_step_features.py::test_label_smoothing_is_in_the_training_loss_only",),
    ),
    Mutant(
        "accumulation_weight_1_over_k",
        TRAINING,
        "weight, last = len(y) / len(yb), i == len(chunks) - 1",
        "weight, last = 1 / len(chunks), i == len(chunks) - 1",
        ("tests/test_step_features.py::test_micro_batches_give_the_big_batch_gradient",),
    ),
    Mutant(
        "script_cv_divides_by_n",
        TRAINING,
        "std = math.sqrt(sum((v - mean) ** 2 for v in losses) / (len(losses) - 1))",
        "std = math.sqrt(sum((v - mean) ** 2 for v in losses) / len(losses))",
        ("tests/test_scripts.py::test_summary_cv_is_the_sample_cv_of_the_last_window",),
    ),
    # --- the report's statistics ---
    Mutant(
        "holm_without_running_max",
        REPORT,
        HOLM_STEP,
        "running = min(1.0, (len(ranked) - i) * p)",
        ("tests/test_report.py::test_holm_adjustment",),
    ),
    Mutant(
        "holm_as_bonferroni",
        REPORT,
        HOLM_STEP,
        "running = max(running, min(1.0, len(ranked) * p))",
        ("tests/test_report.py::test_holm_adjustment",),
    ),
    Mutant(
        "holm_uncapped",
        REPORT,
        HOLM_STEP,
        "running = max(running, (len(ranked) - i) * p)",
        ("tests/test_report.py::test_holm_caps_at_one_and_never_decreases",),
    ),
    Mutant(
        "report_cv_ddof_0",
        REPORT,
        "return 100 * statistics.stdev(losses) / mean",
        "return 100 * statistics.pstdev(losses) / mean",
        ("tests/test_report.py::test_mean_std_and_cv_use_the_sample_std",),
    ),
    Mutant(
        "mean_std_ddof_0",
        REPORT,
        "std = statistics.stdev(values) if len(values) > 1 else None",
        "std = statistics.pstdev(values) if len(values) > 1 else None",
        ("tests/test_report.py::test_mean_std_and_cv_use_the_sample_std",),
    ),
    Mutant(
        "welch_df_sizes_swapped",
        REPORT,
        "sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1)",
        "sa**2 / (len(b) - 1) + sb**2 / (len(a) - 1)",
        ("tests/test_report.py::test_welch_matches_scipy_with_unequal_sizes_and_variances",),
    ),
    Mutant(
        "welch_ci_90_percent",
        REPORT,
        "stats.t.ppf(0.975, dof)",
        "stats.t.ppf(0.95, dof)",
        ("tests/test_report.py::test_welch_ci_by_hand_and_zero_variance_is_not_testable",),
    ),
    Mutant(
        "hedges_g_uncorrected",
        REPORT,
        "correction = 1 - 3 / (4 * (len(a) + len(b)) - 9)",
        "correction = 1",
        ("tests/test_report.py::test_welch_matches_scipy_with_unequal_sizes_and_variances",),
    ),
    Mutant(
        "logrank_without_tie_correction",
        REPORT,
        "variance += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)",
        "variance += d * (n1 / n) * (1 - n1 / n)",
        ("tests/test_report.py::test_logrank_matches_scipy_with_ties_and_censoring",),
    ),
    Mutant(
        "logrank_one_sided",
        REPORT,
        "stats.chi2.sf(chi2, 1)",
        "stats.chi2.sf(chi2, 1) / 2",
        ("tests/test_report.py::test_logrank_matches_scipy_with_ties_and_censoring",),
    ),
    Mutant(
        "fisher_one_sided",
        REPORT,
        "stats.fisher_exact(table).pvalue",
        'stats.fisher_exact(table, alternative="greater").pvalue',
        ("tests/test_report.py::test_fisher_exact_matches_the_hypergeometric_by_hand",),
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
    if mutant.path not in READS_RUNS_ONLY:
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
