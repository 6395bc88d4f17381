"""mutmut over one part of the package, against the narrowest tests that cover it.

    python benchmarks/mutation.py method          # the detector, the eps(t) policies, the noise
    python benchmarks/mutation.py stats           # the verdict's statistics
    python benchmarks/mutation.py method --work /tmp/m   # keep mutmut's folder, for `show`

pyproject.toml's [tool.mutmut] configures one run (generator/stats.py); this script runs any
TARGET below without editing it: the working tree (the files git tracks or would track) is
copied to a work folder, the copy's [tool.mutmut] section is replaced by the target's, and
`python -m mutmut run` runs there, then `mutmut results`, and `mutmut show` for each mutant
that survived. The working tree itself is never modified. In the work folder
(`cd WORK && python -m mutmut show NAME`) mutmut's own commands keep working.

mutmut leaves decorated functions alone (Perturbation.apply under @torch.no_grad(), the
@triton.jit kernel): benchmarks/mutants.py plants their mutants by hand.

Exit status: mutmut's when it fails, else 0 when no mutant survived, 1 when some did.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import copy_working_tree  # benchmarks/ is not a package


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
                "detector.py",
                "eps_fixed.py",
                "eps_full.py",
                "eps_phase.py",
                "eps_schedule.py",
                "noise.py",
                "sampling.py",
                "summary.py",
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
        ),
        (("TRITON_INTERPRET", "1"),),
    ),
}


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
    args = parser.parse_args()
    target = TARGETS[args.target]
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
        survivors = sorted(name for name, s in status.items() if s != "killed")
        for name in survivors:
            print(mutmut(work, env, "show", name, capture=True).stdout)
        return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
