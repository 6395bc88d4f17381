"""A real single-node Slurm for the tests: munged, slurmctld and slurmd in a private folder.

Everything lives under one folder (config, key, sockets, state, logs, pid files) and uses
free ports, so it touches nothing in /etc and can run beside another Slurm. The daemons
are stopped by their pid files. `python tests/slurm_cluster.py DIR` starts one by hand and
prints the SLURM_CONF to export.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = (
    "slurmctld",
    "slurmd",
    "munged",
    "mungekey",
    "sinfo",
    "sbatch",
    "squeue",
    "scancel",
    "scontrol",
)


class ClusterError(RuntimeError):
    """The daemons could not start; the message says why in one line."""


def missing_tools() -> list[str]:
    return [name for name in TOOLS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, host: str, cpus: int, memory_mb: int) -> str:
    """A slurm.conf for one node, this host, with every path under `root`."""
    return "\n".join(
        [
            "ClusterName=perturbgen-test",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"AuthInfo=socket={root / 'munge.socket'}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=10",  # seconds between SIGTERM and SIGKILL: a checkpoint fits
            "MinJobAge=600",  # finished jobs stay visible to squeue for 10 minutes
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            f"NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


@dataclass
class Cluster:
    root: Path
    conf: Path
    env: dict

    def stop(self) -> None:
        """Stop the daemons by their pid files (slurmd first), and wait for them; then kill
        what their jobs left running (slurmstepd outlives slurmd), found by its SLURM_CONF."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / f"{name}.pid"
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        for pid in self._job_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _job_processes(self) -> list[int]:
        mine = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if mine in environ:
                found.append(int(entry.name))
        return found


def start(root: Path, timeout_s: float = 60.0) -> Cluster:
    """Start munged, slurmctld and slurmd under `root`; return when the node is idle."""
    missing = missing_tools()
    if missing:
        raise ClusterError(
            f"not installed: {', '.join(missing)} (apt-get install slurmctld "
            "slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        raise ClusterError("the test Slurm runs its daemons as root, and this is not root")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, os.cpu_count() or 1, memory_mb))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Cluster(root, conf, env)
    key = root / "munge.key"
    steps = [
        ["mungekey", "--create", f"--keyfile={key}", "--force"],
        [
            "munged",
            "--force",
            f"--socket={root / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={root / 'munged.pid'}",
            f"--log-file={root / 'munged.log'}",
            f"--seed-file={root / 'munged.seed'}",
        ],
        ["slurmctld", "-c", "-f", str(conf)],  # -c: a clean start, no state from before
        ["slurmd", "-f", str(conf)],
    ]
    try:
        for command in steps:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                why = " ".join((done.stderr or done.stdout).split())[:300]
                raise ClusterError(f"{command[0]} exited {done.returncode}: {why}")
        deadline = time.time() + timeout_s
        state = ""
        while time.time() < deadline:
            done = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30
            )
            state = done.stdout.strip() or done.stderr.strip()
            if state == "idle":
                return cluster
            time.sleep(0.5)
        raise ClusterError(
            f"the node did not become idle in {timeout_s:.0f} s (sinfo: "
            f"{state!r}); logs in {root}"
        )
    except BaseException:
        cluster.stop()
        raise


if __name__ == "__main__":
    started = time.time()
    cluster = start(Path(sys.argv[1]).resolve())
    print(f"up in {time.time() - started:.1f} s; export SLURM_CONF={cluster.conf}")
