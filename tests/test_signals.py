"""Stopping by signal: `diloco run` and every service under SIGTERM, SIGKILL of `diloco run`, the grace.

Real processes and real signals throughout. A process's children are found in /proc (Linux), not
in what `diloco run` records about them, so the tests do not trust the code they check.
"""

from __future__ import annotations

import ctypes
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import redis

from diloco import keys, runs, stopping
from diloco.datadir import DataDir
from diloco.errors import ConfigError
from tests import harness

DILOCO = [sys.executable, "-m", "diloco"]
ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 15
# H=100 on the tiny task: rounds long enough that a signal lands while the worker trains.
RUN_ARGS = ["run", "--task", "tiny", "--sync-every", "100", "--batch-size", "8", "--inner-warmup-steps", "0",
            "--workers", "1", "--no-monitor", "--stop-grace-s", str(GRACE_S)]

ALT_SCREEN_ON, ALT_SCREEN_OFF = b"\x1b[?1049h", b"\x1b[?1049l"  # a full-screen program's enter and leave

@pytest.fixture(autouse=True)
def _needs_proc():
    """These tests find child processes in /proc: elsewhere they fail saying so, never skip."""
    if not Path("/proc/self/stat").exists():
        pytest.fail("tests/test_signals.py finds child processes in /proc: run it on Linux", pytrace=False)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the process name (state first), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited; only its parent has not reaped it


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and int(stat[1]) == pid:
            found.append(int(entry.name))
    return found


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Those of `pids` still running after up to `timeout_s` (not our children: nothing to wait() on)."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


class LocalRun:
    """A `diloco run` process with its output in a file, and a client of its redis-server."""

    def __init__(self, data: Path, max_versions: int = 1000) -> None:
        self.data, self.out = data, data.parent / f"{data.name}-run-{time.monotonic_ns()}.out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen([*DILOCO, *RUN_ARGS, "--data-dir", str(data), "--max-versions",
                                          str(max_versions)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT)
        self.r = self._connect()

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def _connect(self, timeout_s: float = 120) -> redis.Redis:
        """A client once redis-server answers; its port is on the run's first line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.text()
            if m := re.search(r"redis-server on\s+redis://127.0.0.1:(\d+)", self.text()):
                client = redis.Redis(port=int(m.group(1)), decode_responses=True)
                try:
                    client.ping()
                    return client
                except redis.ConnectionError:
                    client.close()
            time.sleep(0.05)  # startup has no event to wait on; poll with a deadline
        raise TimeoutError(f"diloco run did not start its redis-server within {timeout_s}s:\n{self.text()}")

    def mid_round(self, version: int = 1) -> tuple[int, list[int]]:
        """Wait until `version` is committed and w0 trains the next round; (head version, child pids)."""
        harness.wait_for_version(self.r, "local", version)
        harness.wait_for_key(self.r, keys.eval_losses("local"))  # the evaluator is past its start too
        harness.wait_for_field(self.r, keys.worker_stats("local", "w0"), "state", "training")
        head = runs.read_head(self.r, "local").version
        return head, _children(self.proc.pid)

    def kill(self, pids: list[int]) -> None:
        """Cleanup after a failed test: this run and the children it had, by pid."""
        self.r.close()
        for pid in [self.proc.pid, *pids]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


def test_sigterm_to_run_mid_round_stops_every_child_in_order_and_a_second_run_resumes(tmp_path):
    data = tmp_path / "data"
    run = LocalRun(data)
    pids: list[int] = []
    try:
        head, pids = run.mid_round()
        assert len(pids) == 4, f"redis-server, aggregator, evaluator, w0: {pids}"
        run.proc.send_signal(signal.SIGTERM)
        rc = run.proc.wait(GRACE_S + 15)
    finally:
        run.kill(pids)
    out = run.text()
    assert rc == 143, out
    assert "SIGTERM: stopping" in out and "killed" not in out, out
    assert not [p for p in pids if _running(p)], "every child stopped before diloco run exited"
    assert not (data / "processes.json").exists(), "a clean stop leaves nothing for the next run to clear"
    logs = {name: (data / "logs" / f"{name}.log").read_text() for name in ("w0", "evaluator", "aggregator")}
    for name, log in logs.items():
        assert "SIGTERM: stopping after the current step" in log, (name, log[-2000:])
    assert "Calling fsync() on the AOF file" in (data / "redis" / "redis.log").read_text(), "redis-server shut down"

    again = subprocess.run([*DILOCO, *RUN_ARGS, "--data-dir", str(data), "--max-versions", str(head + 2)],
                           capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = int(re.search(r"resumed at version (\d+)", again.stdout).group(1))
    assert resumed >= head, "nothing committed before the signal was lost"
    assert f"reached version {head + 2}" in again.stdout
    assert "earlier run" not in again.stdout, "no process of the stopped run was left to wait for"


def test_sigkill_to_run_its_children_stop_by_themselves_and_nothing_committed_is_lost(tmp_path):
    data = tmp_path / "data"
    run = LocalRun(data)
    pids: list[int] = []
    try:
        _, pids = run.mid_round(2)
        committed = max(int(f["version"]) for _, f in run.r.xrange(keys.versions("local")))
        port = run.r.connection_pool.connection_kwargs["port"]
        run.proc.send_signal(signal.SIGKILL)
        assert run.proc.wait(30) == -signal.SIGKILL
        # Nobody is left to stop them: each must notice its parent's death on its own, within its grace.
        still = _wait_gone(pids, GRACE_S + 30)
    finally:
        run.kill(pids)
    assert len(pids) == 4 and not still, f"children still running after diloco run was killed: {still}"
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, socket_connect_timeout=1).ping()  # the port is free again

    again = subprocess.run([*DILOCO, *RUN_ARGS, "--data-dir", str(data), "--max-versions", str(committed)],
                           capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    head = int(re.search(r"already at version (\d+)", again.stdout).group(1))
    assert head >= committed, f"version {committed} was committed before the kill, the run resumed at {head}"


def _leases(r: redis.Redis, cfg) -> int:
    """Leases held in any open epoch (rounds of 100 units pass through several 512-unit epochs)."""
    hi = int(r.hget(keys.units_meta("t", cfg.dataset_id), "epoch_hi"))
    return sum(r.zcard(keys.units_leases("t", cfg.dataset_id, e)) for e in range(hi + 2))


def test_worker_and_aggregator_exit_0_on_sigterm_mid_round_releasing_leases_lock_and_liveness(
        redis_url, file_url, r, tmp_path):
    cfg = harness.init(redis_url, file_url, sync_every=100)
    common = ["--run", "t", "--redis-url", redis_url, "--store", file_url]
    procs = []
    for name, args in (("agg", ["aggregator", *common, "--id", "a1"]),
                       ("w1", ["worker", *common, "--worker-id", "w1", "--heartbeat-interval-s", "0.5",
                               "--threads", "1"])):
        with open(tmp_path / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([*DILOCO, *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                          cwd=ROOT))
    try:
        harness.wait_for_version(r, "t", 1)
        # Mid-round: the heartbeat's state may still say `training` for the round just committed, so
        # wait for the next round's leases too (version 1 took the first 100 units of epoch 0).
        harness.wait_for_field(r, keys.worker_stats("t", "w1"), "state", "training")
        deadline = time.monotonic() + 60
        while _leases(r, cfg) == 0:
            assert time.monotonic() < deadline, "the second round's units were never leased"
            time.sleep(0.02)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(GRACE_S + 30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in ("agg", "w1"))
    assert codes == [0, 0], logs
    assert _leases(r, cfg) == 0, "leases given back, not left to expire"
    assert r.get(keys.lock("t")) is None, "the lock released, not left to expire"
    assert r.get(keys.worker_alive("t", "w1")) is None
    assert r.hget(keys.worker_stats("t", "w1"), "state") == "stopped"


def _tgkill(pid: int, tid: int, signum: int) -> None:
    """Send `signum` to one thread of another process (glibc's tgkill; os.kill lets the kernel choose)."""
    if ctypes.CDLL(None, use_errno=True).tgkill(pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {signum})")


def test_a_streaming_aggregator_stops_on_a_sigterm_that_lands_on_one_of_its_lane_threads(
        redis_url, file_url, r, tmp_path):
    """The kernel may hand a process's signal to any of its threads. Python runs the handler in the main
    thread, which a streaming aggregator parks joining its lane threads: with an untimed join it never
    took the SIGTERM and ran until killed (CI's chaos run, agg0 exited with -9)."""
    harness.init(redis_url, file_url, sync_every=4, num_fragments=2, overlap_steps=1)
    log = tmp_path / "agg.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*DILOCO, "aggregator", "--run", "t", "--redis-url", redis_url, "--store", file_url,
                                 "--id", "a1", "--stop-grace-s", str(GRACE_S)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        for lane in ("t@f0", "t@f1"):   # both lane threads hold their fragment's lock: each waits for deltas
            harness.wait_for_key(r, keys.lock(lane))
        threads = sorted(int(t.name) for t in Path(f"/proc/{proc.pid}/task").iterdir() if int(t.name) != proc.pid)
        assert threads, "a streaming aggregator runs a thread a fragment"
        _tgkill(proc.pid, threads[-1], signal.SIGTERM)
        code = proc.wait(GRACE_S + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-2000:]
    assert "SIGTERM: stopping" in log.read_text()
    assert r.get(keys.lock("t@f0")) is None and r.get(keys.lock("t@f1")) is None, "both locks released"


class SignalOnThread:
    """SIGUSR1 sent to one thread, not the main one, while the main thread waits on that thread. The
    handler runs in the main thread and releases the wait; if it has not run within a minute, a failsafe
    releases it. `ended` says who released it first."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.ended: list[str] = []

    def __enter__(self) -> SignalOnThread:
        self.previous = signal.signal(signal.SIGUSR1, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGUSR1, self.previous)

    def _handler(self, _signum: int, _frame: object) -> None:
        self.ended.append("handler")
        self.release.set()

    def send_to(self, thread: threading.Thread) -> None:
        def send() -> None:
            signal.pthread_kill(thread.ident, signal.SIGUSR1)
            if not self.release.wait(60):
                self.ended.append("failsafe")
                self.release.set()
        threading.Thread(target=send, daemon=True).start()


def test_join_all_takes_a_signal_that_lands_on_the_thread_it_joins():
    with SignalOnThread() as sig:
        target = threading.Thread(target=sig.release.wait, daemon=True)
        target.start()
        sig.send_to(target)
        stopping.join_all([target])
    assert sig.ended[:1] == ["handler"], "the main thread took the signal while it joined, not after"


def test_result_of_takes_a_signal_that_lands_on_the_thread_it_waits_for():
    future: Future[int] = Future()
    with SignalOnThread() as sig:
        target = threading.Thread(target=lambda: sig.release.wait() and future.set_result(7), daemon=True)
        target.start()
        sig.send_to(target)
        assert stopping.result_of(future) == 7
    assert sig.ended[:1] == ["handler"], "the main thread took the signal while it waited, not after"


def test_evaluator_exits_0_on_sigterm(redis_url, file_url, r):
    harness.init(redis_url, file_url)
    ev = subprocess.Popen([*DILOCO, "eval", "--run", "t", "--redis-url", redis_url, "--store", file_url],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        harness.wait_for_key(r, keys.eval_losses("t"))  # the evaluator is in its loop
        ev.send_signal(signal.SIGTERM)
        out, _ = ev.communicate(timeout=60)
    finally:
        ev.kill()
        ev.wait()
    assert ev.returncode == 0, out
    assert "SIGTERM: stopping after the current step" in out


def _read_until(fd: int, marker: bytes, timeout_s: float = 60) -> bytes:
    """Bytes from a pty until `marker` has appeared or `timeout_s` passed; a deadline, not a sleep."""
    got, deadline = b"", time.monotonic() + timeout_s
    while marker not in got and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            got += os.read(fd, 65536)
    return got


def test_monitor_exits_0_on_sigterm_and_gives_the_terminal_back(redis_url, file_url):
    harness.init(redis_url, file_url)
    master, slave = pty.openpty()  # a terminal, so the dashboard takes the full screen as it would for a person
    mon = subprocess.Popen([*DILOCO, "monitor", "--run", "t", "--redis-url", redis_url, "--refresh-s", "0.2"],
                           stdin=slave, stdout=slave, stderr=slave, cwd=ROOT)
    try:  # the slave stays open here too: once no process holds it, Linux drops what the master has not read
        screen = _read_until(master, b"diloco monitor")
        assert ALT_SCREEN_ON in screen, screen[-500:]
        mon.send_signal(signal.SIGTERM)
        rest = _read_until(master, ALT_SCREEN_OFF)
        rc = mon.wait(60)
    finally:
        mon.kill()
        mon.wait()
        os.close(master)
        os.close(slave)
    assert rc == 0 and ALT_SCREEN_OFF in rest, rest[-500:]


# A service that ignores its stop request: only the grace (or a second signal) ends it.
STUCK = textwrap.dedent("""
    import sys, threading
    from diloco.stopping import GracefulStop
    GracefulStop(lambda s: print("stopping", flush=True), grace_s=float(sys.argv[1])).install()
    print("ready", flush=True)
    threading.Event().wait()
""")


def _stuck(grace_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STUCK, str(grace_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    return proc


def test_a_service_that_outlasts_its_grace_exits_with_128_plus_the_signal():
    proc = _stuck(grace_s=0.5)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 143
    finally:
        proc.kill()
    assert "not stopped within the grace of 0.5s" in proc.stderr.read()


def test_a_second_signal_exits_at_once():
    proc = _stuck(grace_s=3600)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline() == "stopping\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130, "the second signal's code, long before the grace"
    finally:
        proc.kill()
    assert "second signal" in proc.stderr.read()


def test_a_data_dir_serves_one_run_and_a_dead_runs_leftovers_are_killed_after_the_grace(tmp_path):
    first = DataDir(tmp_path)
    first.lock()
    with pytest.raises(ConfigError, match=f"in use by another diloco run \\(pid {os.getpid()}\\)"):
        DataDir(tmp_path).lock()
    # A process of a dead run that ignores SIGTERM and never notices its parent died.
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); sys.stdin.read()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout.readline() == "ready\n"
        first.record("w0", stubborn.pid)
        said: list[str] = []
        DataDir(tmp_path).clear_left_over(0.5, say=said.append)
        assert stubborn.wait(30) == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()
    assert "w0 (pid" in said[0] and "killing w0" in said[1], said
    assert not (tmp_path / "processes.json").exists()


def _systemd_entries(path: Path) -> list[tuple[str, str]]:
    """(key, value) of a unit file in order; keys repeat (Environment=), so no configparser."""
    entries = []
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.append((key, value))
    return entries


def test_the_systemd_worker_unit_parses_and_stops_within_its_timeout(monkeypatch):
    from diloco.cli import _grace, build_parser

    unit = _systemd_entries(ROOT / "deploy" / "systemd" / "diloco-worker@.service")
    settings = dict(unit)
    env = dict(v.replace("%i", "0").replace("%H", "gpu-07").split("=", 1) for k, v in unit if k == "Environment")
    env_file = dict(line.split("=", 1) for line in (ROOT / "deploy" / "systemd" / "worker.env.example")
                    .read_text().splitlines() if line and not line.startswith("#"))
    assert not {"DILOCO_WORKER_ID", "DILOCO_CHECKPOINT_DIR", "CUDA_VISIBLE_DEVICES"} & env_file.keys(), \
        "the env file is shared by every GPU's instance"
    for name, value in {**env, **env_file}.items():  # systemd: the EnvironmentFile wins
        monkeypatch.setenv(name, value)
    argv = settings["ExecStart"].split()
    assert argv[0].endswith("/diloco")
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.device, args.worker_id) == ("worker", "cuda", "gpu-07-gpu0")
    assert args.checkpoint_dir == "/var/lib/diloco/worker-0" and args.redis_url.startswith("redis://worker:")
    # The worker's own grace ends before systemd's SIGKILL, so a stop is the worker's, not the kernel's.
    assert _grace(args) < float(settings["TimeoutStopSec"])
    assert settings["KillSignal"] == "SIGTERM" and settings["Restart"] == "on-failure"
