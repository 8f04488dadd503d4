"""The round lock at the service level: renewal keeps a long round's token, a stalled holder loses
the lock and goes back to standby, and renewals that fail for a whole TTL (Redis unreachable) count
as a lost lock while a shorter failure does not.

Each test names the hand-made mutant of `aggregator/lock.py` or `aggregator/aggregator.py` it kills;
each was applied, seen to fail the test, and reverted.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aggregator.lock import RoundLock
from diloco import keys
from diloco.connect import connect_redis
from diloco.localserver import RedisServer
from diloco.store import open_store
from tests import harness
from tests.harness import wait_until

ROOT = Path(__file__).resolve().parent.parent
RUN = "t"  # harness's default run name
FAST = {"heartbeat_timeout_s": 3.0, "round_timeout_s": 600.0}





def test_a_round_longer_than_the_ttl_commits_under_the_token_it_began_with(redis_url, file_url, r):
    """A waits for its only worker for more than two TTLs, with a standby polling for the lock.

    Kills the mutant `_renew_loop` returns at once (no renewal): the lock expires after one TTL,
    the standby takes it (token 2) and commits, and the first holder's commit is refused."""
    ttl_s = 1.0
    harness.init(redis_url, file_url, **FAST)
    a = harness.aggregator(redis_url, file_url, "aggA", lock_ttl_s=ttl_s)
    harness.wait_for_field(r, keys.round_state(RUN), "version", "0")  # A holds the lock and collects
    assert r.get(keys.lock(RUN)) == "1:aggA"
    b = harness.aggregator(redis_url, file_url, "aggB", lock_ttl_s=ttl_s)  # a standby, ready to take over
    try:
        time.sleep(2.5 * ttl_s)  # what is waited for is time itself: the round must outlast the TTL
        w = harness.worker(redis_url, file_url, "w0", max_rounds=1)
        [entry] = harness.wait_for_version(r, RUN, 1)
        assert w.result() == 1
    finally:
        committed_by_b = b.stop()
        a.stop()
    assert (entry["aggregator"], entry["token"]) == ("aggA", "1")
    assert float(entry["duration_s"]) > 2 * ttl_s, "the round lasted longer than the lock's TTL"
    assert committed_by_b == 0
    assert r.get(keys.lock_token(RUN)) == "1", "nobody else ever took the lock"


def _spawn_aggregator(redis_url: str, store_url: str, agg_id: str, log: Path, ttl_s: float) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "diloco", "aggregator", "--run", RUN, "--redis-url", redis_url,
                                 "--store", store_url, "--id", agg_id, "--lock-ttl-s", str(ttl_s)],
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=ROOT)


def test_a_stalled_holder_loses_the_lock_and_goes_back_to_standby(redis_url, file_url, r, tmp_path, procs):
    """A real aggregator process is frozen (SIGSTOP) for longer than its TTL while collecting; the
    standby takes the lock. Thawed, the old holder must notice at once, leave the round and stand by,
    then take the lock again when the other releases it.

    Kills the mutants: the renewal ignores a reply showing another owner (`if not renewed` never sets
    `lost`), and `collect` ignores a lost lock (`lost` not passed or not checked): either way the old
    holder keeps collecting a round it can no longer commit and never says `back to standby`."""
    harness.init(redis_url, file_url, **FAST)
    log = tmp_path / "aggA.log"
    a = _spawn_aggregator(redis_url, file_url, "aggA", log, ttl_s=2.0)
    procs.append(a)
    wait_until(lambda: r.get(keys.lock(RUN)) == "1:aggA", "A took the lock")
    harness.wait_for_field(r, keys.round_state(RUN), "version", "0")  # A collects version 0's round
    b = harness.aggregator(redis_url, file_url, "aggB", lock_ttl_s=2.0)
    try:
        os.kill(a.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: r.get(keys.lock(RUN)) == "2:aggB", "B took the lock after A's TTL")
        finally:
            os.kill(a.pid, signal.SIGCONT)
        wait_until(lambda: "back to standby" in log.read_text(errors="replace"), "A went back to standby")
        text = log.read_text(errors="replace")
        assert re.search(r" ERROR aggregator\.lock: lost the round lock \(token 1\): it expired or another "
                         r"aggregator took it$", text, re.M), text
        w = harness.worker(redis_url, file_url, "w0", max_rounds=2)
        harness.wait_for_version(r, RUN, 1)
        assert b.stop() == 1   # a graceful stop releases the lock: A, standing by, takes it
        entries = harness.wait_for_version(r, RUN, 2)
        assert w.result() == 2
        assert a.poll() is None, log.read_text(errors="replace")
        a.terminate()
        assert a.wait(60) == 0, log.read_text(errors="replace")
    finally:
        b.service.stop()
    assert [(e["aggregator"], e["token"]) for e in entries] == [("aggB", "2"), ("aggA", "3")]
    store = open_store(file_url)
    assert not [k for k in store.list("runs/t/") if k.endswith("-t1.safetensors")], \
        "A wrote nothing for the round it lost"


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own, to kill and restart without touching the session's."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.kill()


def test_renewals_failing_for_a_whole_ttl_mark_the_lock_lost(own_redis, caplog):
    """Redis is killed under a holder that has held the lock for longer than its TTL, and stays
    down: once the TTL has certainly run out since the last renewal the lock may be another's, and
    the holder must say it lost it; not before, since until then the key is still its own.

    Kills the mutant that only logs a failed renewal (the code before this test): `lost` is never
    set, and a holder cut off from Redis believes it still holds the lock. Kills the mutant that
    counts the TTL from the acquire instead of the last renewal (`renewed_at` not updated): it says
    lost at the first failure, while the key still had most of its TTL."""
    ttl_s = 4.0  # renewed every 1.3 s; a failed call takes about 1.4 s of client retries
    r = connect_redis(own_redis.url)
    lock = RoundLock(connect_redis(own_redis.url), RUN, "agg", ttl_s)
    assert lock.try_acquire() and lock.held
    try:
        time.sleep(ttl_s)  # held for longer than one TTL: what is waited for is time itself
        wait_until(lambda: r.pttl(keys.lock(RUN)) >= ttl_s * 1000 - 50, "a renewal")  # kill just after one
        before = time.monotonic()
        expires_in_s = r.pttl(keys.lock(RUN)) / 1000
        own_redis.kill()
        assert lock.lost.wait(60), "renewals failed for 60 s and the lock still counts as held"
        assert time.monotonic() >= before + expires_in_s - 0.01, "lost while the key still held its TTL"
        assert not lock.held
        why = rf"Error \d+ connecting to 127\.0\.0\.1:{own_redis.port}\..*"
        assert any(re.fullmatch(rf"lost the round lock \(token 1\): no renewal for the whole TTL \({why}\)", m)
                   for m in caplog.messages), caplog.messages
        lock.release()   # Redis is still down: the key expires by itself, and the lock is not ours any more
        assert (lock.token, lock.held) == (0, False)
        assert any(re.fullmatch(f"could not release the lock \\(it expires by itself\\): {why}", m)
                   for m in caplog.messages), caplog.messages
    finally:
        lock.release()
        r.close()


def test_a_renewal_failure_shorter_than_the_ttl_keeps_the_lock(own_redis, caplog):
    """Redis is down for one failed renewal and back well within the TTL (its AOF keeps the lock):
    the next renewal succeeds and the lock is still held.

    Kills the mutant that marks the lock lost on any failed renewal (what docs/architecture.md used
    to say): a one-second outage would throw away every round in progress. (And the mutants of the
    log lines that say which token was taken and why a renewal failed.)"""
    ttl_s = 8.0
    caplog.set_level(logging.INFO, logger="aggregator.lock")
    lock = RoundLock(connect_redis(own_redis.url), RUN, "agg", ttl_s)
    assert lock.try_acquire()
    assert caplog.messages == ["took the round lock with fencing token 1"]
    r = connect_redis(own_redis.url)
    try:
        own_redis.kill()
        try:
            wait_until(lambda: lock.lost.is_set() or "lock renewal failed" in caplog.text, "a renewal failed")
        finally:
            own_redis.start()
        assert not lock.lost.is_set(), caplog.text
        why = rf"Error \d+ connecting to 127\.0\.0\.1:{own_redis.port}\..*"
        assert any(re.fullmatch(f"lock renewal failed: {why}", m) for m in caplog.messages), "the warning says why"
        after_restart = r.pttl(keys.lock(RUN))
        assert after_restart > 0, "the lock survived the restart (AOF)"
        wait_until(lambda: lock.lost.is_set() or r.pttl(keys.lock(RUN)) > after_restart + 500, "a renewal after")
        assert lock.held, caplog.text
        assert r.get(keys.lock(RUN)) == "1:agg"
        lock.release()
        assert not lock.held and r.get(keys.lock(RUN)) is None, "released: deleted, and no longer held"
    finally:
        lock.release()
        r.close()
