"""The data directory of `diloco run`: one run at a time, and no process of a dead run left in it.

`run.lock` is held (flock) while a `diloco run` uses the directory; the kernel releases it when
that process dies, however it dies, so a lock is never stale. `processes.json` lists the
processes the run started (pid and, on Linux, start time, so a reused pid is never taken for
one of ours); a clean stop removes it. The next run finds it only after a crash (SIGKILL, OOM),
and then waits for those processes, which stop by themselves once their parent is gone
(diloco.stopping.tie_to_parent), and kills any that outlast the grace.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from diloco.errors import ConfigError

POLL_S = 0.1


@dataclass(frozen=True)
class Proc:
    name: str
    pid: int
    start: str | None  # /proc/<pid>/stat start time; None where there is no /proc


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks after boot (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22; the name before ")" may hold spaces


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know


class DataDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path, self.procs_path = path / "run.lock", path / "processes.json"
        self._lock_fd: int | None = None
        self._procs: list[Proc] = []

    def lock(self) -> None:
        """Take the directory for this process; a clear error if another live `diloco run` has it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"{self.path} is in use by another diloco run (pid {holder}); stop it first, "
                              "or give this one another --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd  # held (never closed) until this process exits

    def record(self, name: str, pid: int) -> None:
        """Add a started process to processes.json (rewritten whole, atomically)."""
        self._procs.append(Proc(name, pid, start_time(pid)))
        tmp = self.procs_path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(p) for p in self._procs]))
        tmp.replace(self.procs_path)

    def forget(self) -> None:
        """After a clean stop: nothing of this run is left running."""
        self._procs = []
        with contextlib.suppress(FileNotFoundError):
            self.procs_path.unlink()

    def left_over(self) -> list[Proc]:
        """The processes a dead run recorded that still run (same pid and start time)."""
        try:
            recorded = [Proc(**p) for p in json.loads(self.procs_path.read_text())]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{self.procs_path} is unreadable ({e}); check no process of an earlier run "
                              "still uses this directory, then delete the file") from None
        return [p for p in recorded if running(p.pid) and (p.start is None or start_time(p.pid) == p.start)]

    def clear_left_over(self, grace_s: float, say: Callable[[str], None] = print) -> None:
        """Wait up to `grace_s` for a dead run's processes to stop by themselves, then kill the rest.

        Without /proc a pid cannot be told from a reused one, so those are never killed: still
        running after the grace, they are an error that names them.
        """
        procs = self.left_over()
        if procs:
            say(f"waiting up to {grace_s:g}s for {len(procs)} processes of an earlier run to stop: "
                + ", ".join(f"{p.name} (pid {p.pid})" for p in procs))
        procs = self._wait_gone(procs, grace_s)
        unknown = [p for p in procs if p.start is None]
        for p in procs:
            if p.start is not None:
                say(f"killing {p.name} (pid {p.pid}), still running after {grace_s:g}s")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        self._wait_gone(procs, 10.0)  # SIGKILL takes effect at once, but not synchronously
        if unknown:
            raise ConfigError("processes of an earlier diloco run still use " + str(self.path) + ": "
                              + ", ".join(f"{p.name} (pid {p.pid})" for p in unknown) + "; stop them first")
        self.forget()

    def _wait_gone(self, procs: list[Proc], timeout_s: float) -> list[Proc]:
        """Those of `procs` still running after up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while procs and time.monotonic() < deadline:
            time.sleep(POLL_S)  # not our children: there is no wait() to block on
            procs = [p for p in procs if p in self.left_over()]
        return procs
