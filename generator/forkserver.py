"""Run generated scripts in forked children of one process that imported torch once.

A generated script spends seconds before its first step importing torch and what its first
optimizer construction pulls in (torch._dynamo). `ablate` runs dozens of them; here that
cost is paid once: the server imports the heavy modules, then forks one child per run. The
child is the run: it starts a session of its own, points stdout and stderr at the run's log,
restores default signal handlers, sets the thread count, the environment, the working
directory, `sys.argv` and `sys.path[0]` as `python SCRIPT ARGS...` would, and executes the
script with runpy under run_name "__main__"; its exit status is the script's. Nothing in the
server touches torch's RNG or thread pools, so a run is bit-identical to the script run alone
with the same flags and threads (tests/test_ablate.py checks it).

A run dies with its launcher: a forked child asks the kernel for SIGTERM when the server
ends, and the server ends when its client does (its request pipe closes), so a killed
`ablate` leaves no run training behind; the run stops as on any SIGTERM, with a checkpoint
that a rerun resumes. A run that `ablate` or `tune` starts as a process of its own gets the
same through `guarded` (python -m generator.forkserver --guard PID COMMAND...).

Protocol (JSON lines): the client writes {"script", "args", "cwd", "log", "env", "threads"}
to the server's stdin; the server answers {"pid": N} on its stdout, and later
{"exited": N, "code": C} when that child ends (C < 0: killed by signal -C, as Popen says).
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
import traceback

PR_SET_PDEATHSIG = 1  # prctl(2)
PRELOAD = ("torch", "torch._dynamo", "torch.nn.functional", "torch.distributed")
OPTIONAL = ("triton", "triton.language")  # the scripts import them where installed


def serve() -> None:
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # children must not read the request pipe nor write the reply one
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the client decides when runs stop
    for name in PRELOAD:
        __import__(name)
    for name in OPTIONAL:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - a broken optional install is the script's business
            pass
    replies.write(json.dumps({"ready": True}) + "\n")
    children, buffer = set(), b""
    while True:
        readable, _, _ = select.select([requests], [], [], 0.05)
        if readable:
            chunk = requests.read(65536)
            if not chunk:  # the client went away: so do we, and the runs stop (die_with_parent);
                replies.flush()  # skip the interpreter's teardown of torch (a second)
                os._exit(0)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                _check_single_threaded()
                server = os.getpid()
                pid = os.fork()
                if pid == 0:
                    requests.close()
                    replies.close()
                    os._exit(_child(request) if die_with_parent(server) else 128 + 15)
                children.add(pid)
                replies.write(json.dumps({"pid": pid}) + "\n")
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                replies.write(json.dumps({"exited": pid, "code": code}) + "\n")


def _check_single_threaded() -> None:
    """fork() copies only the calling thread: a lock that another thread held at that moment
    (an import lock, a logger's, a tracker's) stays locked in the child forever, and the run
    hangs. So this process must never start a Python thread, nor import a module that does.
    (The BLAS pool that numpy starts is native, holds no lock between calls and re-creates
    itself in the child through pthread_atfork.)"""
    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate())
        raise RuntimeError(f"the fork server must stay single-threaded; it runs: {names}")


def _child(request: dict) -> int:
    """The run itself, in the forked child: returns its exit status."""
    try:
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh python
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        import random

        import torch

        torch.set_num_threads(request["threads"])
        # a fresh interpreter seeds these from the OS, and so does each child: a script that
        # seeds nothing draws differently in every run, as it would alone
        torch.seed()
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        script = request["script"]
        sys.argv = [script, *request["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        # as a fresh python would: PYTHONPATH's folders right after the script's own
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[1:1] = [p for p in extra if p not in sys.path]
    except BaseException:  # noqa: BLE001 - the run could not even start: say so in its log
        traceback.print_exc()
        return 1
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - what python would print for an uncaught error
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    return code


def die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGTERM when this process's parent ends (Linux's parent-death
    signal: it fires when the thread that forked us exits, and the server and `guarded`'s
    callers fork from their main thread). False when `parent` has already gone: the signal
    was asked for too late to come."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl (not Linux): no signal
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent


def guarded(command: list[str]) -> list[str]:
    """`command` to Popen so that it gets SIGTERM when this process dies: a small python
    arms the signal in the child, then execs `command` (the signal survives exec). Safe in
    a multi-threaded parent, unlike Popen's preexec_fn."""
    return [sys.executable, "-m", "generator.forkserver", "--guard", str(os.getpid()), *command]


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
    return 1


class Server:
    """The client side: one server process, and a Popen-like handle per run it forks."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "generator.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # Ctrl-C reaches the client, which stops the runs itself
        )
        self.codes: dict[int, int] = {}
        self.pending = b""  # reply bytes read from the pipe but not yet handled
        self.ready = False  # it imports torch meanwhile: the first start() waits for it

    def _wait_ready(self) -> None:
        if not self.ready:
            reply = self._read()
            if not reply.get("ready"):
                raise RuntimeError(f"the fork server did not start: {reply}")
            self.ready = True

    def _read(self) -> dict:
        """The next reply, waiting for it. Replies are read with os.read into our own
        buffer: a buffered readline could hold a second reply where select cannot see it."""
        while b"\n" not in self.pending:
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the fork server exited")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def wait(self, timeout: float) -> None:
        """Until a run ends or `timeout` seconds pass."""
        self._drain(timeout)

    def _drain(self, timeout: float = 0.0) -> None:
        """Record the exits the server has reported (waiting up to `timeout` for one)."""
        while b"\n" in self.pending or select.select([self.process.stdout], [], [], timeout)[0]:
            reply = self._read()
            if "exited" in reply:
                self.codes[reply["exited"]] = reply["code"]
            self.ready = self.ready or reply.get("ready", False)
            timeout = 0.0

    def start(self, script: str, args: list[str], log: str, env: dict, threads: int) -> Run:
        self._wait_ready()
        request = {
            "script": script,
            "args": args,
            "cwd": os.getcwd(),
            "log": log,
            "env": env,
            "threads": threads,
        }
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()
        while True:
            reply = self._read()
            if "exited" in reply:
                self.codes[reply["exited"]] = reply["code"]
            elif "pid" in reply:
                return Run(self, reply["pid"])

    def close(self) -> None:
        """End the server; it exits as soon as it reads EOF (runs it forked still running,
        if any, get SIGTERM)."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


class Run:
    """What ablate needs of a subprocess.Popen, for a run forked by the server."""

    def __init__(self, server: Server, pid: int) -> None:
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.server._drain()
            self.returncode = self.server.codes.pop(self.pid, None)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            self.server._drain(0.05)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass  # it has just ended; the server reports it

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guard"]:  # guarded(): arm the signal, then become the command
        if not die_with_parent(int(sys.argv[2])):
            sys.exit(128 + signal.SIGTERM)  # the launcher is gone already: nothing to run for
        os.execvp(sys.argv[3], sys.argv[3:])
    serve()
