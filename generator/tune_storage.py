"""Where a tune's studies live and who runs their trials: the Optuna storage (SQLite by
default, a journal file or a database server), the file locks processes on one machine take
turns with, and the owner mark (host:pid:start time) that tells a lost trial from a running
one."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Any

import optuna

from generator.errors import SpecError, SpecErrors
from generator.tune_space import Settings

HEARTBEAT_S = 10  # RDB storages: a trial whose process sent none for 6 of these is failed


def open_storage(s: Settings) -> tuple[Any, Path | None, str]:
    """(the storage, the local file it lives in or None, its URL as shown to people)."""
    url = s.storage or f"sqlite:///{(s.out / 'study.db').resolve()}"
    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:")).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.JournalStorage(backend), path, url
        if "://" not in url:
            raise ValueError("expected an Optuna storage URL or journal:FILE")
        from sqlalchemy.engine import make_url

        shown = make_url(url).render_as_string(hide_password=True)
        if s.storage is None:  # the default: as the -o given, not this machine's absolute path
            shown = str(s.out / "study.db")
        local = None
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite:///"):
            local = Path(url.removeprefix("sqlite:///")).resolve()
            local.parent.mkdir(parents=True, exist_ok=True)
            kwargs = {"connect_args": {"timeout": 60}}  # several processes take turns
        with file_lock(local):  # two processes creating one database's tables collide
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=6 * HEARTBEAT_S,
            )
        return storage, local, shown
    except Exception as exc:  # sqlalchemy and the drivers raise many types
        message = f"cannot open {url!r}: {exc}".splitlines()[0]
        raise SpecErrors([SpecError("--storage", None, "", message)]) from None


@contextlib.contextmanager
def file_lock(storage_file: Path | None):
    """An exclusive lock beside a storage file (none for a server's database)."""
    if storage_file is None:
        yield
        return
    with exclusive(Path(f"{storage_file}.claims")):  # not .lock: a journal uses that one
        yield


@contextlib.contextmanager
def exclusive(path: Path):
    """An exclusive flock on `path` (created if missing), held for the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def owner() -> str:
    """host:pid:start time of this process (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the name


def alive(owner: str) -> bool:
    """Whether the process that wrote `owner` still runs; True when that cannot be told."""
    host, pid, started = (owner.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started in ("?", _start_time(int(pid)))
