"""mutmut over one part of the package, against the narrowest tests that cover it.

    python benchmarks/mutation.py method          # generator/method/: detector, eps(t), noise
    python benchmarks/mutation.py stats           # the verdict's statistics
    python benchmarks/mutation.py method --work /tmp/m   # keep mutmut's folder, for `show`

pyproject.toml's [tool.mutmut] configures one run (generator/stats.py); this script runs any
TARGET below without editing it: the working tree (the files git tracks or would track) is
copied to a work folder, the copy's [tool.mutmut] section is replaced by the target's, and
`python -m mutmut run` runs there, then `mutmut results`, and `mutmut show` for each mutant
that survived. The working tree itself is never modified. In the work folder
(`cd WORK && python -m mutmut show NAME`) mutmut's own commands keep working.

mutmut leaves decorated functions alone (Perturbation.apply and AntiPGD.apply under
@torch.no_grad(), the @triton.jit kernel): benchmarks/mutants.py plants their mutants by hand.

Every mutant that survives must be a known equivalent: benchmarks/mutation_equivalents.toml
lists them per target, by mutmut's name, each with the reason no test can tell it apart.
docs/mutation.md's tables of them are made from that list (`--doc` rewrites the target's).

Exit status: mutmut's when it fails; 2 on bad input; else 0 when the mutants that survived
are exactly the target's known equivalents (a timeout counts as detected: the tests stopped
an endless loop), 1 when one is not listed (its diff is printed) or a listed one did not
survive (killed now, or gone with the code it mutated: the list is stale).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tomllib

# benchmarks/ is not a package, and its folder must not go on sys.path in a process that
# imports this file (a test): its kernels.py would shadow the `kernels` package transformers uses
_mutants = runpy.run_path(str(Path(__file__).resolve().with_name("mutants.py")), run_name="mutants")
REPO, copy_working_tree = _mutants["REPO"], _mutants["copy_working_tree"]


@dataclass(frozen=True)
class Target:
    files: tuple[str, ...]  # the modules mutmut mutates
    tests: tuple[str, ...]  # pytest paths or node ids that test them directly
    env: tuple[tuple[str, str], ...] = ()  # set for the whole run


METHOD = "generator/method/"
TARGETS = {
    "stats": Target(("generator/stats.py",), ("tests/test_stats.py",)),
    # the tests that import generator/method/ themselves: the ones that render scripts would
    # render mutmut's trampolines into them. TRITON_INTERPRET=1 (set before triton is
    # imported) lets the Triton launcher run on the CPU, in tests/interpret/.
    "method": Target(
        tuple(
            METHOD + name
            for name in (
                "anti_pgd.py",
                "detector.py",
                "drawn.py",
                "eps_anti_pgd.py",
                "eps_fixed.py",
                "eps_full.py",
                "eps_gradient_noise.py",
                "eps_phase.py",
                "eps_schedule.py",
                "gradient_noise.py",
                "noise.py",
                "sampling.py",
                "summary.py",
                "timing.py",
            )
        ),
        (
            "tests/test_method_mutants.py",
            "tests/interpret/test_method_triton.py",
            *(
                "tests/test_detector.py::" + name
                for name in (
                    "test_each_branch_of_the_tree",
                    "test_loss_smoothness_votes_only_with_a_threshold",
                    "test_statistics_of_the_window",
                    "test_warm_up_stays_in_exploration",
                    "test_patience_needs_consecutive_votes",
                    "test_monotonic_phases_only_advance",
                    "test_relative_thresholds_are_calibrated_on_the_first_window",
                    "test_non_finite_samples_are_dropped",
                    "test_detector_state_round_trips",
                    "test_two_detectors_with_different_settings_live_side_by_side",
                    "test_sample_steps_come_every_n_steps",
                    "test_each_policy_follows_its_formula",
                )
            ),
            "tests/test_kernels.py::test_triton_is_refused_where_it_cannot_run",
            "tests/test_kernels.py::test_two_perturbations_with_different_settings_in_one_process",
            *(
                "tests/test_peers.py::" + name
                for name in (
                    "test_gradient_noise_variance_follows_the_annealing_schedule",
                    "test_a_skipped_step_takes_its_gradient_noise_back",
                    "test_gradient_noise_goes_to_the_chosen_parameters_in_the_flat_layout",
                    "test_gradient_noise_follows_the_learning_rate_under_scale_lr",
                    "test_gradient_noise_pairs_follow_the_flat_layout_not_the_models_order",
                    "test_anti_pgd_perturbations_are_anticorrelated_and_do_not_accumulate",
                    "test_anti_pgd_state_holds_xi_and_resumes_exactly",
                )
            ),
            *(
                "tests/test_hot_loop.py::" + name
                for name in (
                    "test_cpu_train_s_sums_the_steps_and_leaves_data_loading_out",
                    "test_cuda_train_s_reads_events_at_the_end_and_never_waits_inside_a_step",
                )
            ),
        ),
        (("TRITON_INTERPRET", "1"),),
    ),
}


EQUIVALENTS = REPO / "benchmarks" / "mutation_equivalents.toml"
DOC = REPO / "docs" / "mutation.md"
DETECTED = {"killed", "timeout"}  # mutmut's statuses of a mutant the tests detected


def equivalents(path: Path = EQUIVALENTS) -> dict[str, dict[str, str]]:
    """{target: {mutant name: why it is equivalent}}, one table per target in `path`."""
    try:
        listed = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: {error}") from None
    unknown = sorted(listed.keys() - TARGETS.keys())
    if unknown:
        raise ValueError(f"{path}: {', '.join(unknown)} is not a target")
    return {name: listed.get(name, {}) for name in TARGETS}


def judge(status: dict[str, str], known: dict[str, str]) -> tuple[list[str], list[str]]:
    """(the mutants not detected that are not known equivalents, the known equivalents that
    did not survive: killed now, given another status, or no longer made)."""
    alive = {name for name, s in status.items() if s not in DETECTED}
    survived = {name for name in alive if status[name] == "survived"}
    return sorted(alive - known.keys()), sorted(known.keys() - survived)


def equivalents_table(target: str, known: dict[str, str]) -> str:
    """docs/mutation.md's block for one target's known equivalents, markers included."""
    rows = [f"| `{name}` | {why} |" for name, why in sorted(known.items())]
    return "\n".join(
        [
            f"<!-- equivalents of {target}: python benchmarks/mutation.py {target} --doc -->",
            "| mutant | why no test can tell it apart |",
            "|---|---|",
            *rows,
            "<!-- end of equivalents -->",
        ]
    )


def with_table(text: str, target: str, known: dict[str, str]) -> str:
    """`text` (docs/mutation.md) with the target's block replaced by the list's table."""
    block = re.compile(
        rf"^<!-- equivalents of {target}: .*?^<!-- end of equivalents -->$",
        re.MULTILINE | re.DOTALL,
    )
    if len(block.findall(text)) != 1:
        raise ValueError(f"{DOC}: no single table of the equivalents of {target}")
    return block.sub(lambda _: equivalents_table(target, known), text)


def mutmut_section(target: Target) -> str:
    """The [tool.mutmut] section of a target (JSON string arrays are TOML arrays)."""
    lines = [
        "[tool.mutmut]",
        'source_paths = ["generator"]',
        f"only_mutate = {json.dumps(list(target.files))}",
        f"pytest_add_cli_args_test_selection = {json.dumps(list(target.tests))}",
        'pytest_add_cli_args = ["-n", "0", "-p", "no:cacheprovider"]',
    ]
    return "\n".join(lines) + "\n"


def configure(pyproject: Path, target: Target) -> None:
    """Replace the [tool.mutmut] section of `pyproject` by the target's."""
    text = pyproject.read_text()
    section = re.compile(r"^\[tool\.mutmut\]\n(?:(?!\[).*\n)*", re.MULTILINE)
    if len(section.findall(text)) != 1:
        raise SystemExit(f"error: {pyproject} has no single [tool.mutmut] section")
    pyproject.write_text(section.sub(lambda _: mutmut_section(target) + "\n", text))


def mutmut(work: Path, env: dict[str, str], *args: str, capture: bool = False):
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=work,
        env=env,
        text=True,
        capture_output=capture,
        check=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--max-children", type=int, default=2, help="mutants run at once")
    parser.add_argument("--work", type=Path, help="work folder to keep (default: a temporary one)")
    parser.add_argument(
        "--doc", action="store_true", help="rewrite docs/mutation.md's table of the equivalents"
    )
    args = parser.parse_args()
    target = TARGETS[args.target]
    try:
        known = equivalents()[args.target]
        if args.doc:
            DOC.write_text(with_table(DOC.read_text(), args.target, known))
            return 0
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="perturbgen-mutation-") as tmp:
        work = args.work or Path(tmp)
        if args.work and work.exists() and any(work.iterdir()):
            print(f"error: {work} is not empty", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
        copy_working_tree(work)
        configure(work / "pyproject.toml", target)
        # one thread per test process, as in the suite (tests/conftest.py); the copy's code
        # first on the import path (mutmut puts its mutants/ folder before it)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work), **dict(target.env)}
        start = time.perf_counter()
        run = mutmut(work, env, "run", "--max-children", str(args.max_children), capture=True)
        seconds = time.perf_counter() - start
        if run.returncode != 0:  # its progress line redraws itself: only the end is worth showing
            print((run.stdout + run.stderr)[-3000:], file=sys.stderr)
            return run.returncode
        print(f"mutmut run: {seconds:.0f} s")
        listed = mutmut(work, env, "results", "--all", "true", capture=True).stdout
        status = dict(line.strip().rsplit(": ", 1) for line in listed.splitlines() if ": " in line)
        counts = Counter(status.values())
        print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())), f"of {len(status)}")
        unknown, stale = judge(status, known)
        for name in unknown:
            print(mutmut(work, env, "show", name, capture=True).stdout)
        equivalent = len(known) - len(stale)
        print(f"{equivalent} survived as known equivalents ({EQUIVALENTS.relative_to(REPO)})")
        for name in stale:
            got = status.get(name, "no longer made")
            print(f"stale: {name} is listed as equivalent but did not survive ({got})")
        if unknown:
            print(f"{len(unknown)} not detected and not known equivalents (above)")
        return 1 if unknown or stale else 0


if __name__ == "__main__":
    sys.exit(main())
