"""Fault tolerance with real processes: crashes at named points, SIGKILLed workers, Redis and store outages.

Services that die run as `python -m diloco ...` processes (SIGKILL, or DILOCO_CRASH_AT for an exit
at an exact protocol step); the survivors run in threads or processes beside them. Every wait is on a
Redis condition, a stream, a process exit or a log line, with a deadline. After each fault the run is
checked with `diloco.replay`: every committed version must equal, bit for bit, a fault-free
recomputation from the deltas it included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import redis
from safetensors.torch import load_file

import aggregator.aggregator as aggregator_module
import workers.worker as worker_module
from diloco import keys, runs, units
from diloco.audit import audit
from diloco.cli import main as cli_main
from diloco.config import ENV_CRASH_AT
from diloco.connect import server_time_ms
from diloco.faults import AGGREGATOR_POINTS, CRASH_EXIT_CODE
from diloco.localserver import free_port
from diloco.messages import Head
from diloco.replay import replay
from diloco.store import digest_of, open_store
from tests import harness
from tests.harness import wait_until

ROOT = Path(__file__).resolve().parent.parent
DILOCO = [sys.executable, "-m", "diloco"]
H = 5  # sync_every of harness.TINY
# Short heartbeats so a dead worker is noticed in seconds; a deadline far away, so a round that
# closes soon after a death was closed by the heartbeat expiry and not by the deadline.
FAST = {"heartbeat_timeout_s": 3.0, "round_timeout_s": 600.0}


# --- helpers ------------------------------------------------------------------------------------




def wait_for_entry(r, stream: str, pred: Callable[[dict[str, str]], bool], timeout_s: float = 60,
                   after: str = "0-0") -> tuple[str, dict[str, str]]:
    """Block on `stream` until an entry after `after` satisfies `pred`; returns (id, fields)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        harness.check_services()
        for _, batch in r.xread({stream: after}, block=500) or []:
            for entry_id, fields in batch:
                after = entry_id
                if pred(fields):
                    return entry_id, fields
    raise TimeoutError(f"no matching entry in {stream} within {timeout_s}s")


@contextlib.contextmanager
def renewing(leases: units.Leases, interval_s: float = 0.5) -> Iterator[threading.Event]:
    """Renew `leases` in a thread, as a live worker's heartbeat would, until the event it yields is
    set (the worker "dies") or the block ends, however it ends: a heartbeat left running would renew
    leases of the same run name in the tests after this one."""
    dead = threading.Event()

    def heartbeat() -> None:
        while not dead.wait(interval_s):
            with contextlib.suppress(redis.RedisError):  # a test may kill Redis; the ghost keeps trying
                leases.renew()

    thread = threading.Thread(target=heartbeat, name="ghost-heartbeat", daemon=True)
    thread.start()
    try:
        yield dead
    finally:
        dead.set()
        thread.join(30)
        assert not thread.is_alive(), "the ghost heartbeat did not stop"


def versions(r) -> list[int]:
    return [int(f["version"]) for _, f in r.xrange(keys.versions("t"))]


def committed(r) -> tuple[list, Head]:
    """The versions stream and the head, read in one transaction: the services go on committing."""
    pipe = r.pipeline(transaction=True)
    pipe.xrange(keys.versions("t"))
    pipe.hgetall(keys.head("t"))
    entries, head = pipe.execute()
    return entries, runs.parse_head("t", head)


def assert_replays(r, store_url: str) -> int:
    """Every committed version equals a fault-free replay of its deltas; returns how many there are."""
    result = replay(r, open_store(store_url), "t")
    assert result.mismatched == [], f"versions {result.mismatched} differ from a fault-free replay"
    assert result.versions == len(versions(r))
    return result.versions


class Procs:
    """The service processes of one test: each logs to its own file; leftovers are killed at teardown."""

    def __init__(self, log_dir: Path, redis_url: str, store_url: str) -> None:
        self.log_dir, self.redis_url, self.store_url = log_dir, redis_url, store_url
        log_dir.mkdir(parents=True, exist_ok=True)
        self.started: list[subprocess.Popen] = []

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None) -> subprocess.Popen:
        full_env = {k: v for k, v in os.environ.items() if k != ENV_CRASH_AT}
        full_env.update(env or {})
        with open(self.log_dir / f"{name}.log", "ab") as log:  # a restarted service appends to its log
            proc = subprocess.Popen([*DILOCO, *argv], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    env=full_env, cwd=ROOT)
        self.started.append(proc)
        return proc

    def worker(self, worker_id: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self._start(worker_id, ["worker", "--run", "t", "--redis-url", self.redis_url, "--store",
                                       self.store_url, "--worker-id", worker_id, "--heartbeat-interval-s", "0.5",
                                       "--threads", "1", "--device", "cpu", *extra], env)

    def aggregator(self, agg_id: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self._start(agg_id, ["aggregator", "--run", "t", "--redis-url", self.redis_url, "--store",
                                    self.store_url, "--id", agg_id, "--lock-ttl-s", "2", *extra], env)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, proc: subprocess.Popen, timeout_s: float = 60) -> int:
        """SIGTERM (graceful) and the exit status."""
        proc.terminate()
        return proc.wait(timeout_s)

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs_for(tmp_path):
    made: list[Procs] = []

    def make(redis_url: str, store_url: str) -> Procs:
        made.append(Procs(tmp_path / "logs", redis_url, store_url))
        return made[-1]

    yield make
    for p in made:
        p.close()


def read_checkpoint(directory: Path) -> tuple[int, int]:
    """(steps_done, AdamW step count) from a worker's checkpoint files (workers/checkpoint.py)."""
    meta = msgpack.unpackb((directory / "state.msgpack").read_bytes(), raw=False, strict_map_key=False)
    tensors = load_file(str(directory / "state.safetensors"))
    steps = {int(t.item()) for name, t in tensors.items() if name.startswith("opt.") and name.endswith(".step")}
    assert len(steps) == 1, f"every parameter's AdamW state has the same step count, got {steps}"
    return int(meta["steps_done"]), steps.pop()


# --- 1. the aggregator crashes at each named point; the standby takes over ------------------------

@pytest.mark.parametrize("point", AGGREGATOR_POINTS)
def test_aggregator_crash_at_each_point_standby_commits_identical_versions(point, redis_url, file_url, r, procs_for):
    n = 3
    harness.init(redis_url, file_url, min_workers=2, **FAST)
    procs = procs_for(redis_url, file_url)
    a = procs.aggregator("aggA", env={ENV_CRASH_AT: point})
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=n) for i in range(2)]
    harness.wait_for_key(r, keys.lock_token("t"))  # A holds token 1; B can only be standby now
    assert r.get(keys.lock_token("t")) == "1"
    b = harness.aggregator(redis_url, file_url, "aggB", lock_ttl_s=2)
    try:
        assert a.wait(timeout=60) == CRASH_EXIT_CODE
        assert f"crash point {point} reached" in procs.log("aggA")
        for w in ws:
            assert w.result() == n
        entries = harness.wait_for_version(r, "t", n)
    finally:
        committed_by_b = b.stop()

    assert versions(r) == list(range(1, n + 1)), "every version committed exactly once"
    by = [(e["aggregator"], e["token"]) for e in entries]
    if point == "after_commit":
        assert by == [("aggA", "1")] + [("aggB", "2")] * (n - 1), "A's commit stands; B commits the next ones"
        assert committed_by_b == n - 1
    else:
        assert by == [("aggB", "2")] * n
        assert committed_by_b == n
    assert all(e["participants"] == "w0,w1" for e in entries)

    store = open_store(file_url)
    a_objects = [k for k in store.list("runs/t/") if re.search(r"/v\d{8}-t1\.safetensors$", k)]
    if point in ("after_lock", "during_download"):
        assert a_objects == [], "A wrote nothing before it died"
    elif point == "after_write":
        orphans = [keys.momentum_object("t", 1, 1), keys.weights_object("t", 1, 1)]
        assert a_objects == orphans, "A's objects for version 1 exist, under its own token"
        assert entries[0]["weights"] == keys.weights_object("t", 1, 2) != orphans[1], "orphans are not committed"
        # The redone round is bit-identical: same deltas, same order, same bytes.
        assert digest_of(store.get(orphans[1])) == entries[0]["weights_digest"]
    else:
        assert a_objects == [keys.momentum_object("t", 1, 1), keys.weights_object("t", 1, 1)]
    assert assert_replays(r, file_url) == n


def test_a_round_redone_after_a_crash_publishes_the_same_update_and_residual(redis_url, file_url, r, procs_for):
    """The aggregator dies after writing version 1 (update shards, weights, momentum with the download's
    residual) but before committing; the standby's redo writes the same bytes under its own token."""
    harness.init(redis_url, file_url, codec="int8", min_workers=2, **FAST)
    procs = procs_for(redis_url, file_url)
    a = procs.aggregator("aggA", env={ENV_CRASH_AT: "after_write"})
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=2) for i in range(2)]
    harness.wait_for_key(r, keys.lock_token("t"))
    b = harness.aggregator(redis_url, file_url, "aggB", lock_ttl_s=2)
    try:
        assert a.wait(timeout=60) == CRASH_EXIT_CODE
        assert [w.result() for w in ws] == [2, 2]
        entries = harness.wait_for_version(r, "t", 2)
    finally:
        b.stop()
    store = open_store(file_url)
    first = entries[0]
    assert first["token"] == "2" and first["update"]
    for ours in first["update"].split(","):
        orphan = ours.replace("/t2-", "/t1-")
        assert orphan != ours and store.get(orphan) == store.get(ours), "the redo's update is A's, bit for bit"
    assert store.get(keys.momentum_object("t", 1, 1)) == store.get(first["momentum"]), "so is the residual"
    assert digest_of(store.get(keys.weights_object("t", 1, 1))) == first["weights_digest"]
    assert assert_replays(r, file_url) == 2


# --- 2. a worker is SIGKILLed mid-round ------------------------------------------------------------

def test_killed_worker_leaves_by_heartbeat_late_delta_is_dropped_restart_resumes(redis_url, file_url, r, procs_for,
                                                                                 tmp_path):
    harness.init(redis_url, file_url, **FAST)
    procs = procs_for(redis_url, file_url)
    ckpt = tmp_path / "checkpoints"
    agg = harness.aggregator(redis_url, file_url, lock_ttl_s=2)
    w0 = procs.worker("w0", "--checkpoint-dir", str(ckpt))
    w1 = procs.worker("w1", "--checkpoint-dir", str(ckpt))
    try:
        wait_for_entry(r, keys.versions("t"), lambda f: f["participants"] == "w0,w1")
        w1.kill()  # mid-round: the round now open expects w1, which will never answer
        assert w1.wait(10) == -9
        killed_ms = server_time_ms(r)
        steps_at_kill, adam_at_kill = read_checkpoint(ckpt / "w1")
        assert steps_at_kill >= H and steps_at_kill % H == 0

        # The heartbeat expires (3 s) and the round closes with the survivor, long before the deadline.
        _, alone = wait_for_entry(r, keys.versions("t"),
                                  lambda f: int(f["committed_ms"]) > killed_ms and f["participants"] == "w0")
        assert float(alone["duration_s"]) < 30, "closed by the heartbeat expiry, not by round_timeout_s (600 s)"
        assert not r.exists(keys.worker_alive("t", "w1"))

        # A late announcement (w1's last one, delivered again after its round closed) is dropped and counted.
        old = next(f for _, f in r.xrevrange(keys.deltas("t")) if f["worker"] == "w1")
        assert int(old["version"]) < runs.read_head(r, "t").version
        rejected_before = int(r.hget(keys.rejected_counts("t"), "w1") or 0)
        last_rejection = (r.xrevrange(keys.rejections("t"), count=1) or [("0-0", {})])[0][0]
        late_id = r.xadd(keys.deltas("t"), old)
        _, rej = wait_for_entry(r, keys.rejections("t"), lambda f: f["entry"] == late_id, after=last_rejection)
        assert rej["worker"] == "w1" and rej["reason"].startswith("late: trained on version"), rej
        assert int(r.hget(keys.rejected_counts("t"), "w1")) == rejected_before + 1

        # Restarted with its checkpoint: the current weights, and AdamW state continuing from the checkpoint.
        head_at_restart = runs.read_head(r, "t").version
        restarted_ms = server_time_ms(r)
        w1 = procs.worker("w1", "--checkpoint-dir", str(ckpt), "--max-rounds", "2")
        assert w1.wait(90) == 0, procs.log("w1")
        assert "resumed inner optimizer state" in procs.log("w1")
        assert read_checkpoint(ckpt / "w1") == (steps_at_kill + 2 * H, adam_at_kill + 2 * H), \
            "inner optimizer state continues from the checkpoint, not from zero"
        anns = {i: int(f["version"]) for i, f in r.xrange(keys.deltas("t"), min=str(restarted_ms))
                if f["worker"] == "w1" and i != late_id}
        assert len(anns) == 2 and min(anns.values()) >= head_at_restart, "it trained on the current weights"
        included = {i for _, f in r.xrange(keys.versions("t")) for i in f["entries"].split(",")}
        assert set(anns) & included, "the restarted worker's deltas count again"
        assert late_id not in included
        assert w0.poll() is None
        assert procs.stop(w0) == 0
    finally:
        agg.stop()
    assert assert_replays(r, file_url) >= 3


def test_a_redone_round_counts_a_rejection_once(redis_url, file_url, r, procs_for):
    harness.init(redis_url, file_url, **FAST)
    procs = procs_for(redis_url, file_url)
    bad = r.xadd(keys.deltas("t"), {"kind": "delta", "worker": "garbage"})
    a = procs.aggregator("aggA", env={ENV_CRASH_AT: "during_download"})
    w = harness.worker(redis_url, file_url, "w0", max_rounds=1)
    try:
        assert a.wait(60) == CRASH_EXIT_CODE  # rejected the bad entry, then died reducing w0's delta
        assert r.hgetall(keys.rejected_counts("t")) == {"garbage": "1"}
        b = harness.aggregator(redis_url, file_url, "aggB", lock_ttl_s=2)
        try:
            assert w.result() == 1
            assert harness.wait_for_version(r, "t", 1)[0]["aggregator"] == "aggB"
        finally:
            b.stop()
    finally:
        w.service.stop()
    assert [f["entry"] for _, f in r.xrange(keys.rejections("t"))] == [bad], "one rejection per announcement"
    assert r.hgetall(keys.rejected_counts("t")) == {"garbage": "1"}


def test_units_of_a_dead_worker_do_not_stall_the_next_rounds(redis_url, file_url, r):
    # 10 units per epoch, 5 per round: three workers span two epochs each round.
    harness.init(redis_url, file_url, task_options={"num_samples": 80}, **FAST)
    cfg = runs.load_config(r, "t")
    assert units.units_per_round(cfg) == 5 and units.plan_for(r, cfg).num_units == 10
    # A worker that claimed its units and then died: its leases run on until it stops renewing them.
    ghost = units.Leases(r, "t", units.plan_for(r, cfg), "ghost", lease_ms=2000)
    assert ghost.claim(5, threading.Event()) == [(0, b) for b in range(5)]
    with renewing(ghost) as dead:
        agg = harness.aggregator(redis_url, file_url, lock_ttl_s=2)
        ws = [harness.worker(redis_url, file_url, f"w{i}") for i in range(3)]
        try:
            # A claim never waits for the ghost's units: it takes the next epoch's, so every worker trains.
            entries = harness.wait_for_version(r, "t", 2, timeout_s=30)
            assert [e["n"] for e in entries] == ["3", "3"], entries
            assert r.getbit(keys.units_done("t", cfg.dataset_id, 0), 0) == 0, "the ghost's units are its own"
            dead.set()  # the ghost's leases end 2 s from now; its units go back to the pool, oldest first
            deadline = time.monotonic() + 30
            while not all(r.getbit(keys.units_done("t", cfg.dataset_id, 0), b) for b in range(5)):
                assert time.monotonic() < deadline, "the dead worker's units were never trained again"
                time.sleep(0.05)
        finally:
            for w in ws:
                w.service.stop()
            agg.stop()
    a = audit(r, cfg)
    assert a.twice == [] and a.mismatched == [] and a.lost(0) == []


# --- 3. Redis killed and restarted; the object store unreachable ---------------------------------

def test_redis_restart_loses_no_commit_and_services_carry_on(redis_server, redis_url, file_url, r, procs_for):
    harness.init(redis_url, file_url, **FAST)
    procs = procs_for(redis_url, file_url)
    services = {"agg": procs.aggregator("agg"), "w0": procs.worker("w0"), "w1": procs.worker("w1")}
    try:
        harness.wait_for_version(r, "t", 3)
        # Both workers past their start (a busy machine can take longer than 3 versions to import torch):
        # a service that cannot reach Redis on its first PING exits (a wrong URL), which is not this test.
        wait_until(lambda: all(r.exists(keys.worker_alive("t", w)) for w in ("w0", "w1")), "both workers up", 60)
        before, head_before = committed(r)
        redis_server.kill()
        # Down until every service has noticed (past redis-py's own retries) and says what it waits for.
        wait_until(lambda: all("waiting for Redis" in procs.log(n) for n in services),
                   "every service to log that it waits for Redis", 60)
    finally:
        redis_server.start()  # same port, same data directory: the AOF is replayed
    after, head_after = committed(r)
    assert after[:len(before)] == before, "every commit acknowledged before the crash survives it, unchanged"
    assert head_after.version >= head_before.version
    assert head_after.version == int(after[-1][1]["version"]) and head_after.weights == after[-1][1]["weights"]
    assert [int(f["version"]) for _, f in after] == list(range(1, head_after.version + 1))

    harness.wait_for_version(r, "t", head_after.version + 2)
    assert all(p.poll() is None for p in services.values()), "no service exited during the outage"
    assert [procs.stop(p) for p in services.values()] == [0, 0, 0]
    assert assert_replays(r, file_url) >= head_after.version + 2


def test_redis_outage_between_write_and_commit_redoes_the_round(redis_server, redis_url, file_url, r, monkeypatch):
    harness.init(redis_url, file_url, **FAST)
    aggregator_waits = threading.Event()

    said: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.threadName == "Aggregator" and "waiting for" in record.getMessage():
                said.append(record.getMessage())
                aggregator_waits.set()

    seen = Seen()
    logging.getLogger("diloco.connect").addHandler(seen)
    fired: list[str] = []
    restarter: list[threading.Thread] = []  # joined at the end: it must not start Redis in a later test
    real_crash_point = aggregator_module.crash_point

    def redis_dies_after_write(name: str) -> None:
        if name == "after_write" and not fired:
            fired.append(name)
            redis_server.kill()  # SIGKILL between the object writes and the commit script

            def restart() -> None:  # back once the aggregator has given up retrying the commit
                aggregator_waits.wait(60)
                redis_server.start()
            restarter.append(threading.Thread(target=restart, daemon=True))
            restarter[0].start()
        real_crash_point(name)

    monkeypatch.setattr(aggregator_module, "crash_point", redis_dies_after_write)
    agg = harness.aggregator(redis_url, file_url, lock_ttl_s=30)  # the lock outlives the outage
    w = harness.worker(redis_url, file_url, "w0")
    try:
        def settled() -> bool:
            try:
                return not agg.is_alive() or len(versions(r)) >= 2
            except redis.RedisError:  # still down, or loading its AOF
                return False
        wait_until(settled, "version 2 to commit or the aggregator to exit", 90)
        assert fired and agg.is_alive(), f"the aggregator exited: {agg.error!r}"
        seen_versions = versions(r)  # read once: the worker and aggregator go on committing meanwhile
        assert seen_versions == list(range(1, len(seen_versions) + 1))
        # what it waits for and why, for an operator (kills Aggregator.run 54, 55, 58, 59)
        assert re.match(r"waiting for Redis and the object store \(\d+s so far, limit \d+s\): \S", said[0]), said[0]
        assert "Connection" in said[0] or "connect" in said[0], said[0]
    finally:
        logging.getLogger("diloco.connect").removeHandler(seen)
        w.service.stop()
        agg.service.stop()
        aggregator_waits.set()  # a restarter still waiting restarts Redis now, not in a later test
        for t in restarter:
            t.join(30)
        if redis_server.proc is None or redis_server.proc.poll() is not None:
            redis_server.start()


def test_a_worker_waits_out_an_outage_that_starts_while_it_builds_its_model(redis_server, redis_url, file_url, r,
                                                                           monkeypatch):
    """Redis answered the worker's first PING, then went down while it built its model (seconds on a busy
    machine): an outage like one mid-run, waited out, not a crash at start."""
    harness.init(redis_url, file_url, **FAST)
    said: list[str] = []
    waits = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for Redis" in record.getMessage():
                said.append(record.getMessage())
                waits.set()

    real_inner = worker_module.InnerLoop

    def inner_then_redis_dies(*args, **kw):
        built = real_inner(*args, **kw)
        redis_server.kill()
        threading.Thread(target=lambda: (waits.wait(60), redis_server.start()), daemon=True).start()
        return built

    seen = Seen()
    logging.getLogger("diloco.connect").addHandler(seen)
    monkeypatch.setattr(worker_module, "InnerLoop", inner_then_redis_dies)
    try:
        w = harness.worker(redis_url, file_url, "w0", max_rounds=1)
    finally:
        logging.getLogger("diloco.connect").removeHandler(seen)
        waits.set()
    assert said and said[0].startswith("waiting for Redis (the dataset's registration)"), said
    agg = harness.aggregator(redis_url, file_url)
    try:
        assert w.result() == 1, "the worker trains once Redis is back"
    finally:
        agg.service.stop()
    assert versions(r) == [1]


class ThreadLog(logging.Handler):
    """Counts log records whose message contains `text`, emitted by the thread `thread()` names."""

    def __init__(self, logger: str, text: str, thread: Callable[[], int | None]) -> None:
        super().__init__()
        self.logger, self.text, self.thread = logging.getLogger(logger), text, thread
        self.count = 0
        self.seen = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread() and self.text in record.getMessage():
            with self.seen:
                self.count += 1
                self.seen.notify_all()

    def wait_for(self, count: int, timeout_s: float = 60, also: Callable[[], bool] = lambda: False) -> None:
        """Until `count` records were seen, or `also()` (checked every 0.1 s: it has no event) holds."""
        deadline = time.monotonic() + timeout_s
        with self.seen:
            while not self.seen.wait_for(lambda: self.count >= count or also(), 0.1):
                assert time.monotonic() < deadline, \
                    f"{self.text!r} logged {self.count} times, not {count}, within {timeout_s}s"

    def __enter__(self) -> ThreadLog:
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)  # the records counted may be INFO, below the default WARNING
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


def test_two_short_outages_far_apart_do_not_exhaust_the_outage_limit(redis_server, redis_url, file_url, r):
    harness.init(redis_url, file_url, **FAST)
    active = harness.aggregator(redis_url, file_url, "active", lock_ttl_s=30)
    harness.wait_for_key(r, keys.lock("t"))
    standby = harness.aggregator(redis_url, file_url, "standby", outage_limit_s=2, start=False)
    with ThreadLog("diloco.connect", "waiting for Redis", lambda: standby.ident) as waits:
        standby.start()
        try:
            for outage in (1, 2):
                redis_server.kill()
                try:
                    waits.wait_for(outage, also=lambda: not standby.is_alive())
                finally:
                    redis_server.start()
                if outage == 1:  # Redis is back for longer than the standby's outage limit
                    back = time.monotonic()
                    while time.monotonic() - back < 3:
                        assert standby.is_alive()
                        time.sleep(0.1)  # a healthy period of a given length: nothing to wait on
            assert standby.is_alive(), f"the standby exited: {standby.error!r}"
            active.stop()  # the standby takes over and commits
            w = harness.worker(redis_url, file_url, "w0", max_rounds=1)
            assert w.result() == 1
            assert harness.wait_for_version(r, "t", 1)[0]["aggregator"] == "standby"
        finally:
            standby.service.stop()
            active.service.stop()


class Proxy:
    """A TCP proxy in front of the S3 server: `cut()` drops every connection and refuses new ones (an
    outage of the store as the services see it, with its data intact); `restore()` listens again on the
    same port."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        assert self.listener is not None
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
        self.listener.close()
        self.listener = None
        with self.lock:
            conns, self.conns = self.conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def close(self) -> None:
        if self.listener is not None:
            self.cut()


def test_object_store_outage_services_wait_then_resume_or_give_up_at_the_limit(redis_url, s3_server, s3_url, r,
                                                                              procs_for):
    harness.init(redis_url, s3_url, **FAST)
    procs = procs_for(redis_url, s3_url)
    # The aggregator and the workers reach the store through two proxies, so each side's outage is
    # placed exactly: the aggregator's while it must read shards, the workers' while they must download.
    to_agg, to_workers = Proxy(s3_server.endpoint), Proxy(s3_server.endpoint)
    try:
        agg = procs.aggregator("agg", "--outage-limit-s", "120", env={"DILOCO_S3_ENDPOINT": to_agg.endpoint})
        harness.wait_for_field(r, keys.round_state("t"), "version", "0")  # v0 loaded; collecting
        to_agg.cut()
        env = {"DILOCO_S3_ENDPOINT": to_workers.endpoint}
        patient = procs.worker("wA", "--outage-limit-s", "120", env=env)
        hasty = procs.worker("wB", "--outage-limit-s", "1", env=env)
        # Both deltas arrive; the aggregator cannot read them and waits, it does not exit or reject them.
        wait_for_entry(r, keys.deltas("t"), lambda f: f["worker"] == "wA")
        wait_for_entry(r, keys.deltas("t"), lambda f: f["worker"] == "wB")
        wait_until(lambda: "waiting for Redis and the object store" in procs.log("agg"), "the aggregator to wait", 60)
        to_workers.cut()
        to_agg.restore()
        harness.wait_for_version(r, "t", 1)  # the aggregator resumed on its own

        # The workers cannot download version 1: the one with a 1 s limit gives up, naming what it waited for.
        assert hasty.wait(60) == 1
        assert re.search(r"diloco worker: error: gave up after \d+s waiting for the object store: .*cannot be "
                         r"reached", procs.log("wB")), procs.log("wB")
        assert "Traceback" not in procs.log("wB")
        assert patient.poll() is None and agg.poll() is None
        wait_until(lambda: "waiting for the object store" in procs.log("wA"), "wA to wait for the store", 60)
        to_workers.restore()
        harness.wait_for_version(r, "t", 3)
        assert patient.poll() is None and agg.poll() is None, "no service with a long limit exited"
        assert r.xlen(keys.rejections("t")) == 0, "no delta was rejected because of the outage"
        assert procs.stop(patient) == 0 and procs.stop(agg) == 0
    finally:
        to_agg.close()
        to_workers.close()
    assert assert_replays(r, s3_url) >= 3


def test_file_store_outage_services_wait_then_resume(redis_url, file_url, r, procs_for):
    harness.init(redis_url, file_url, **FAST)
    procs = procs_for(redis_url, file_url)
    services = {"agg": procs.aggregator("agg"), "w0": procs.worker("w0")}
    root = Path(file_url.removeprefix("file://"))
    away = root.with_name("store-away")
    try:
        harness.wait_for_version(r, "t", 1)
        root.rename(away)
        root.write_text("unmounted\n")  # a plain file: nothing can silently re-create an empty store here
        # The holder keeps the head's weights in memory, so the worker (uploading or downloading) is
        # usually the first to meet the missing store.
        wait_until(lambda: any(p.poll() is not None for p in services.values()) or r.xlen(keys.rejections("t"))
                   or "waiting for Redis and the object store" in procs.log("agg")
                   or "waiting for the object store" in procs.log("w0"), "the outage to be noticed", 60)
        assert all(p.poll() is None for p in services.values()), {n: procs.log(n)[-600:] for n in services}
        assert r.xlen(keys.rejections("t")) == 0, r.xrange(keys.rejections("t"))
    finally:
        if root.is_file():
            root.unlink()
            away.rename(root)
    head = runs.read_head(r, "t").version
    harness.wait_for_version(r, "t", head + 2)
    assert all(p.poll() is None for p in services.values())


# --- 4. min_workers --------------------------------------------------------------------------------

def test_min_workers_holds_the_round_until_enough_workers(redis_url, file_url, r, capsys):
    harness.init(redis_url, file_url, min_workers=2, **FAST)
    agg = harness.aggregator(redis_url, file_url, lock_ttl_s=2)
    w0 = harness.worker(redis_url, file_url, "w0", max_rounds=2)
    try:
        harness.wait_for_field(r, keys.round_state("t"), "accepted", "1")
        assert cli_main(["status", "--run", "t", "--redis-url", redis_url, "--json"]) == 0
        snap = json.loads(capsys.readouterr().out)
        assert snap["version"] == 0 and snap["rounds"] == []
        assert snap["round"]["phase"] == "collecting" and snap["round"]["min_workers"] == 2
        assert snap["round"]["waiting"].startswith("1 more worker (min_workers 2, 1 live): start workers")
        assert r.xlen(keys.versions("t")) == 0, "one delta is not enough"
        w1 = harness.worker(redis_url, file_url, "w1", max_rounds=2)
        entries = harness.wait_for_version(r, "t", 2)
        assert [e["participants"] for e in entries] == ["w0,w1", "w0,w1"]
        assert w0.result() == 2 and w1.result() == 2
    finally:
        agg.stop()


# --- the chaos run, short (and full, with -m slow) ---------------------------------------------------

def _chaos(tmp_path: Path, timeout_s: float, *args: str) -> dict[str, str]:
    """Run bench/chaos.py; its figures table, after checking every invariant it reports held."""
    cmd = [sys.executable, str(ROOT / "bench" / "chaos.py"), *args, "--data-dir", str(tmp_path / "chaos")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    figures = dict(re.findall(r"^\| ([a-z][a-z0-9 ,()-]+?) +\| +(\S+) +\|$", out.stdout, re.M))
    streaming = "--fragments" in args   # no wipes: recover restores runs without fragments only
    kinds = ("worker killed", "aggregator killed", "redis restarted", "redis wiped and recovered")
    for kind in kinds[:3] if streaming else kinds:
        assert int(figures[kind]) >= 1, figures
    for check in ("version gaps or repeats", "replay mismatches", "units lost", "units committed twice",
                  "done bitmap mismatches", "units stuck", "unexpected exits", "unclean stops"):
        assert figures[check] == "0", (check, figures)
    return figures


def test_chaos_short(tmp_path):
    """bench/chaos.py, short: every kind of fault at least once, then every invariant holds."""
    figures = _chaos(tmp_path, 240, "--versions", "4", "--workers", "2", "--seed", "1", "--sync-every", "100",
                     "--unit-samples", "80", "--samples", "4000")
    assert int(figures["versions committed"]) >= 4 and int(figures["finished epochs"]) >= 1, figures


def test_chaos_short_streaming(tmp_path):
    """bench/chaos.py on a streaming run (4 fragments, two aggregators): each fragment's versions once,
    equal to a replay; no unit lost or committed twice."""
    figures = _chaos(tmp_path, 240, "--versions", "3", "--workers", "2", "--seed", "1", "--sync-every", "200",
                     "--unit-samples", "80", "--samples", "4000", "--fragments", "4")
    assert int(figures["versions committed (all 4 fragments)"]) >= 12, figures


@pytest.mark.slow
def test_chaos_full(tmp_path):
    """bench/chaos.py as docs/benchmarks.md runs it: 60 versions, 3 workers, about 30 faults."""
    figures = _chaos(tmp_path, 3600, "--versions", "60", "--workers", "3", "--seed", "0")
    assert int(figures["versions committed"]) >= 60 and int(figures["finished epochs"]) >= 10, figures
    assert int(figures["worker killed"]) + int(figures["aggregator killed"]) + int(figures["redis restarted"]) >= 25
