"""Which test or script runs each command of README.md, and a runner for them.

Every ```sh block of README.md is split into commands (a line, with its backslash
continuations; a block that starts with #! is one batch script). Each command is
- in "The two commands": run as written by `--all` on a fresh clone (the test command is
  also what .ci/run runs, which tests/test_readme.py checks);
- in "A five-minute tour": run as written, in order, in an empty folder, by
  tests/test_readme.py (and by this script);
- listed in LONG: run as written by `--all`, after the two commands, in the same clone;
- listed in NOT_RUN, with the reason it cannot run here and what tests the same path.
tests/test_readme.py fails on a README command that is none of these. The ```python blocks
are run by tests/test_export.py (README) and tests/test_export_{lightning,hf}.py
(docs/export.md).

    python tests/readme_commands.py          # the tour, in a temporary folder (seconds)
    python tests/readme_commands.py --all    # also the two commands and LONG, on a fresh
                                             # clone of HEAD (network for pip; ~20 minutes)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LONG = [
    "perturbgen tune specs/tune/mnist1d_cnn_fair.yaml --trials 20 --workers 2 -o tune/fair",
]

NOT_RUN = {
    "torchrun --standalone --nproc_per_node 4 train_full.py --out runs/full-seed0": "needs 4 "
    "GPUs (or 4 CPU processes) and a full run; tests/test_ddp.py runs the scripts under "
    "torchrun --standalone with 2 CPU processes",
    "torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --rdzv_backend c10d "
    "--rdzv_endpoint $MASTER:29500 --rdzv_id full0 train_full.py --out runs/full-seed0": "needs "
    "two nodes",
    "perturbgen ablate specs/cifar10_resnet18.yaml --seeds 3 --jobs 1 --nproc 2": "needs the "
    "CIFAR-10 batches and GPUs to finish; tests/test_ablate.py runs ablate --nproc 2",
    "perturbgen ablate specs/cifar10_resnet18.yaml --seeds 3 --launcher slurm --partition gpu "
    "--time-min 720 --gpus-per-run 1 --cpus-per-run 8 --mem 32G --account myproj --qos normal "
    "--sbatch constraint=a100": "needs a cluster with that partition, account and qos; "
    "tests/test_slurm.py runs ablate --launcher slurm on a one-node test Slurm",
    "#!/bin/bash": "a batch script for two nodes with 8 GPUs each",
}


def section(name: str, text: str) -> str:
    return text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]


def commands(text: str) -> list[str]:
    """The commands of the ```sh blocks of `text`, in order (a batch script: its first line)."""
    found = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        if block.startswith("#!"):
            found.append(block.split("\n", 1)[0])
            continue
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                found.append(line.strip())
    return found


def bare(command: str) -> str:
    """The command without its trailing comment."""
    return re.sub(r"\s+#\s.*$", "", command)


def readme() -> str:
    return (REPO / "README.md").read_text()


def uncovered(text: str) -> list[str]:
    """README commands that no test or script runs, and that NOT_RUN does not excuse."""
    covered = set(commands(section("The two commands", text)))
    covered |= set(commands(section("A five-minute tour", text)))
    covered |= set(LONG) | set(NOT_RUN)
    return [c for c in commands(text) if bare(c) not in covered and c not in covered]


def run(command: str, cwd: Path, env: dict) -> None:
    print(f"$ {command}", flush=True)
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, check=False)
    if result.returncode:
        raise SystemExit(f"exit {result.returncode}: {command} (in {cwd})")


def tour(folder: Path) -> None:
    """The tour's spec and commands, as written, in `folder`: `perturbgen` and `python` are
    this interpreter, with this checkout's generator."""
    text = section("A five-minute tour", readme())
    (folder / "my_mlp.yaml").write_text(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    bin_dir = folder / ".bin"
    bin_dir.mkdir()
    for name, program in (("perturbgen", "-m generator "), ("python", "")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" {program}"$@"\n')
        shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for command in commands(text):
        run(command, folder, env)


def everything(folder: Path) -> None:
    """The two commands and LONG, as written, on a fresh clone of HEAD in `folder`."""
    clone = folder / "perturbgen"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = dict(os.environ)
    for command in commands(section("The two commands", readme())):
        run(command, clone, env)
    env["PATH"] = f"{clone / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    for command in LONG:
        run(command, clone, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="also the long commands (clone)")
    args = parser.parse_args()
    missing = uncovered(readme())
    if missing:
        raise SystemExit("README commands nothing runs:\n  " + "\n  ".join(missing))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tour").mkdir()
        tour(Path(tmp) / "tour")
        if args.all:
            everything(Path(tmp))
    print("every README command ran")


if __name__ == "__main__":
    main()
