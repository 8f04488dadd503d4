"""How diloco's processes stop: signals, a bounded grace, exit codes, and never outliving a parent.

Exit codes (docs/operations.md, "Stopping"):

    0      a service stopped gracefully (SIGTERM/SIGINT, --max-rounds, or the run was stopped);
           `diloco run` reached --max-versions
    1      a failure (another component unreachable past --outage-limit-s, a crash)
    2      a mistake in settings or use
    128+N  stopped by signal N without a clean finish: `diloco run` interrupted (130 Ctrl-C, 143
           SIGTERM), or a service that had to be forced (a second signal, or the grace ran out)

A service's first SIGTERM or SIGINT asks it to stop after its current step; a watchdog exits the
process once `grace_s` has passed without it finishing; a second signal exits at once. What a
forced exit leaves behind (work-unit leases, the aggregator lock, the alive key) expires by its TTL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any, TypeVar

from diloco.errors import ConfigError

ENV_STOP_GRACE = "DILOCO_STOP_GRACE_S"
ENV_PARENT_PID = "DILOCO_PARENT_PID"  # set by `diloco run` for its children: stop when that process dies
DEFAULT_GRACE_S = 20.0   # below the 30 s stop_grace_period of compose.yaml and Kubernetes' default
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PARENT_POLL_S = 0.5      # the portable fallback's poll of os.getppid()
SIGNAL_POLL_S = 0.5      # the longest a main thread waiting on other threads leaves a signal unhandled
_PR_SET_PDEATHSIG = 1    # <linux/prctl.h>


def signal_exit_code(signum: int) -> int:
    """The shell's convention for "ended by signal N": 128 + N (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


def grace_from_env() -> float:
    """The default of --stop-grace-s: $DILOCO_STOP_GRACE_S, else DEFAULT_GRACE_S."""
    raw = os.environ.get(ENV_STOP_GRACE)
    if raw is None:
        return DEFAULT_GRACE_S
    try:
        return check_grace(float(raw))
    except ValueError:
        raise ConfigError(f"{ENV_STOP_GRACE}={raw!r} is not a positive number of seconds") from None


def check_grace(grace_s: float) -> float:
    if not grace_s > 0:
        raise ConfigError(f"the stop grace must be a positive number of seconds, got {grace_s}")
    return grace_s


class Interrupted(KeyboardInterrupt):
    """A stop signal turned into an exception; a KeyboardInterrupt, so code that unwinds on Ctrl-C
    unwinds on SIGTERM the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_now(signum: int, why: str) -> None:
    """Leave at once with 128+N. os.write, not logging: this may run inside a signal handler, where
    a logging lock could already be held by the code it interrupted."""
    os.write(2, f"diloco: {why}; exiting now with {signal_exit_code(signum)}\n".encode())
    os._exit(signal_exit_code(signum))


class GracefulStop:
    """SIGTERM and SIGINT handling for a long-running process.

    The first signal calls `on_stop(signum)` (set an event, or raise Interrupted) and, if `grace_s`
    is given, arms a watchdog that exits with 128+N once the grace has passed. Any later signal,
    or a signal after `begin()` (a stop the process started by itself), calls `on_again(signum)`,
    by default an immediate exit.
    """

    def __init__(self, on_stop: Callable[[int], None], *, grace_s: float | None,
                 on_again: Callable[[int], None] | None = None) -> None:
        self.on_stop, self.grace_s = on_stop, grace_s
        self.on_again = on_again or (lambda signum: exit_now(signum, "second signal"))
        self.signum: int | None = None
        self.stopping = False
        self._watchdog: threading.Timer | None = None

    def install(self) -> GracefulStop:
        """For the rest of the process's life: the watchdog then also covers the interpreter's exit."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    @contextlib.contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        """Only around a block (a command run inside another program, such as the tests): the previous
        handlers come back and the watchdog is disarmed when the block ends."""
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        self.install()
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._watchdog is not None:
                self._watchdog.cancel()

    def begin(self) -> None:
        """The process stops on its own (e.g. `diloco run` reached its goal): a signal now hurries it."""
        self.stopping = True

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.stopping:
            self.on_again(signum)
            return
        self.stopping, self.signum = True, signum
        if self.grace_s is not None:
            why = f"{signal.Signals(signum).name}: not stopped within the grace of {self.grace_s:g}s"
            self._watchdog = threading.Timer(self.grace_s, exit_now, (signum, why))
            self._watchdog.daemon = True  # must not keep a process that finished in time alive
            self._watchdog.start()
        self.on_stop(signum)


# --- the main thread stays able to take a signal ---------------------------------------------------
#
# CPython runs signal handlers in the main thread only, between bytecodes. The kernel hands a signal sent
# to the process to any thread that does not block it; when that is another thread, nothing wakes a main
# thread blocked in an untimed join or result(), and the handler (the graceful stop) waits until that wait
# ends by itself, maybe never. A streaming aggregator (one thread a fragment) ignored SIGTERM so until the
# chaos run killed it. Timed waits in a loop let the handler run within SIGNAL_POLL_S.

T = TypeVar("T")


def join_all(threads: Iterable[threading.Thread]) -> None:
    """Join every thread from the main thread, still taking signals."""
    for t in threads:
        while t.is_alive():
            t.join(SIGNAL_POLL_S)


def result_of(future: futures.Future[T]) -> T:
    """The future's result (or its exception) from the main thread, still taking signals."""
    while not future.done():
        futures.wait([future], timeout=SIGNAL_POLL_S)
    return future.result()


# --- children never outlive the parent -------------------------------------------------------------

def _prctl_pdeathsig() -> Callable[[int], int] | None:
    """Linux's prctl(PR_SET_PDEATHSIG, sig) as a function, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda sig: prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a diloco child process that must stop when this process dies (see tie_to_parent)."""
    return {**env, ENV_PARENT_PID: str(os.getpid())}


def tie_to_parent() -> None:
    """In a child started with child_env(): get SIGTERM (a graceful stop) when the parent dies.

    Linux: the kernel sends it (PR_SET_PDEATHSIG; it fires when the parent's thread that started
    us ends, and `diloco run` starts its children from its main thread). Elsewhere a daemon thread
    polls os.getppid(). Either way a parent that died before this ran is noticed here. The variable
    is removed so that processes this one starts are not tied to our parent.
    """
    raw = os.environ.pop(ENV_PARENT_PID, None)
    if not raw:
        return
    parent = int(raw)
    prctl = _prctl_pdeathsig()
    if prctl is None or prctl(signal.SIGTERM) != 0:
        threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the kernel (or the thread) was watching
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)  # a parent's death has no event to wait on here; poll
    os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A Popen preexec_fn that gives a non-Python child (redis-server) SIGTERM when we die; Linux only.

    It runs in the forked child before exec, and the death signal survives exec. If this process
    died between the fork and the prctl, the child ends there. Call Popen from the main thread.
    """
    prctl = _prctl_pdeathsig()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return preexec
