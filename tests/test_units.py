"""Work units against a real redis-server: claims under contention, leases across kills and stalls,
restarts of every service, a Redis crash and a wiped Redis, bad unit ids, the `units` command and
init's checks.

The exactly-once invariant is checked with `diloco.audit` (or, across a wipe, from the committed
history captured in the same transaction as the wipe): at the end of an epoch every unit is in
exactly one committed announcement and the done bitmap is exactly that set. Processes are real
where a kill or a concurrent claim has to be real; the rest run in threads (tests.harness).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from diloco import keys, runs, snapshot
from diloco.audit import audit
from diloco.cli import main as cli_main
from diloco.config import RunConfig, WorkerSettings
from diloco.connect import server_time_ms
from diloco.errors import ConfigError, RunNotFound
from diloco.messages import Announcement
from diloco.scripts import Scripts
from diloco.store import open_store
from diloco.tasks.tiny import TensorDataset
from diloco.tasks.tiny import make_task as make_tiny
from diloco.units import Leases, UnitPlan, _units_per_second, plan_for, units_per_round
from diloco.units import report as units_report
from tests import harness
from tests.harness import wait_until
from workers.worker import Worker

RUN = "t"
ROOT = Path(__file__).resolve().parent.parent
DILOCO = [sys.executable, "-m", "diloco"]
SMALL = {"task_options": {"num_samples": 400}}   # 50 units of 8 samples; a round trains on 5
NUM_UNITS = 50
THIS_TASK = "tests.test_units:make_task"
HANG_ENV = "UNITS_TEST_HANG"            # the worker stalls in its first training step, after claiming
TRUNCATE_ENV = "UNITS_TEST_TRUNCATE"    # the worker's copy of the data is cut short, under the same id
SAMPLES_ENV = "UNITS_TEST_NUM_SAMPLES"  # the worker's task builds a different dataset


def make_task(**options):
    """The tiny task, changed on one "machine" by environment variables (see the *_ENV names)."""
    if os.environ.get(SAMPLES_ENV):
        options = {**options, "num_samples": int(os.environ[SAMPLES_ENV])}
    task = make_tiny(**options)
    if os.environ.get(HANG_ENV):
        def hang(model, batch):
            threading.Event().wait()  # forever: only a kill ends this worker

        task.loss = hang
    if os.environ.get(TRUNCATE_ENV):
        full = task.train_data()
        n = int(os.environ[TRUNCATE_ENV])
        short = TensorDataset(full.x[:n], full.y[:n], full.dataset_id)
        task.train_data = lambda: short
    return task


# --- helpers -----------------------------------------------------------------------------------




class Epoch:
    """The four keys of one epoch of the run's dataset, and reads of them."""

    def __init__(self, r: redis.Redis, epoch: int, run: str = RUN) -> None:
        self.r = r
        self.plan = plan_for(r, runs.load_config(r, run))
        self.claimed, self.done, self.leases, self.owners = keys.epoch_keys(run, self.plan.dataset, epoch)

    def bits(self, key: str) -> set[int]:
        pipe = self.r.pipeline(transaction=False)
        for b in range(self.plan.num_units):
            pipe.getbit(key, b)
        return {b for b, bit in enumerate(pipe.execute()) if bit}

    def done_bits(self) -> set[int]:
        return self.bits(self.done)

    def claimed_bits(self) -> set[int]:
        return self.bits(self.claimed)

    def held_by(self, worker: str) -> list[int]:
        return sorted(int(b) for b, w in self.r.hgetall(self.owners).items() if w == worker)

    def complete(self) -> bool:
        return self.r.bitcount(self.done) == self.plan.num_units


def committed_announcements(r: redis.Redis, run: str = RUN, after: int = 0) -> list[tuple[dict, Announcement]]:
    """(version entry, announcement) for every announcement a committed version after `after` included."""
    out = []
    for _, fields in r.xrange(keys.versions(run)):
        if int(fields["version"]) <= after:
            continue
        for entry_id in filter(None, fields.get("entries", "").split(",")):
            (_, ann), = r.xrange(keys.deltas(run), entry_id, entry_id)
            out.append((fields, Announcement.from_fields(ann)))
    return out


def assert_exactly_once(r: redis.Redis, cfg: RunConfig, finished_epochs: int = 1) -> None:
    a = audit(r, cfg)
    assert a.twice == [], f"units committed twice: {a.twice}"
    assert a.mismatched == [], f"done bits disagree with the committed announcements: {a.mismatched}"
    for e in range(finished_epochs):
        assert a.lost(e) == [], f"units of finished epoch {e} never committed: {a.lost(e)}"


def stop_all(*services: harness.Service) -> list[int | None]:
    for s in services:
        s.service.stop()
    return [s.result() for s in services]


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([*DILOCO, *args], stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env={**os.environ, **(env or {})})


def spawn_worker(redis_url: str, store_url: str, worker_id: str, log_dir: Path,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    return spawn(["worker", "--run", RUN, "--redis-url", redis_url, "--store", store_url, "--worker-id", worker_id,
                  "--heartbeat-interval-s", "0.5", "--threads", "1"], log_dir / f"{worker_id}.log", env)


# --- 1. concurrent claims ----------------------------------------------------------------------

CLAIMER = r"""
import json, sys
import redis
from diloco import keys
from diloco.scripts import Scripts

url, run, ds, worker, want = sys.argv[1:6]
r = redis.Redis.from_url(url, decode_responses=True)
scripts = Scripts(r)
r.incr("test:ready")
assert r.blpop(["test:go"], timeout=60), "no start signal"
got, sizes, calls = [], [], 0
while not any(e >= 2 for e, _ in got):  # claims never run dry: stop once this claimer reached epoch 2
    lo, hi = (int(x) for x in r.hmget(keys.units_meta(run, ds), "epoch_lo", "epoch_hi"))
    new = scripts.claim_units(run, ds, lo, hi, int(want), worker, 600_000)
    calls += 1
    if new is None:
        continue
    got += new
    sizes.append(len(new))
print(json.dumps({"units": got, "sizes": sizes, "calls": calls}))
"""


def test_concurrent_claimers_never_get_the_same_unit_and_together_claim_everything(r, redis_url):
    n, ds = 3000, "ds-concurrent"
    r.hset(keys.units_meta(RUN, ds), mapping=UnitPlan(ds, 4 * n, 4, 0).meta())
    wants = [1, 2, 3, 4, 5, 7, 8, 16]
    claimers = [subprocess.Popen([sys.executable, "-c", CLAIMER, redis_url, RUN, ds, f"c{i}", str(want)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
                for i, want in enumerate(wants)]
    try:
        wait_until(lambda: r.get("test:ready") == str(len(claimers)), "claimers ready")
        r.rpush("test:go", *range(len(claimers)))  # all start at once
        outs = [p.communicate(timeout=120) for p in claimers]
    finally:
        for p in claimers:
            p.kill()
    results = []
    for p, (out, err) in zip(claimers, outs, strict=True):
        assert p.returncode == 0, err
        results.append(json.loads(out))
    every = [tuple(u) for res in results for u in res["units"]]
    twice = [u for u, c in Counter(every).items() if c > 1]
    assert twice == [], f"units handed out twice: {twice[:10]}"
    for want, res in zip(wants, results, strict=True):
        assert set(res["sizes"]) == {want}, "a claim is all or nothing: exactly the units asked for"
    # Nothing is done, so the claims run through epoch 0, then 1, and open the next epochs only
    # once the ones before are all claimed: epochs 0 and 1 are claimed in full, and what lies beyond
    # is a prefix of each later epoch's order.
    assert {(e, b) for e in (0, 1) for b in range(n)} <= set(every)
    lo, hi = (int(x) for x in r.hmget(keys.units_meta(RUN, ds), "epoch_lo", "epoch_hi"))
    assert lo == 0 and hi >= 2
    later = sorted(b for e, b in every if e == 2)
    assert later == list(range(len(later))) and all(e <= 2 for e, _ in every)
    assert sum(1 for res in results if res["calls"] > 1) >= 2, "the claimers did not overlap"
    for e in (0, 1):
        owners = r.hgetall(keys.units_owners(RUN, ds, e))
        for i, res in enumerate(results):
            mine = {b for ee, b in res["units"] if ee == e}
            assert {int(b) for b, w in owners.items() if w == f"c{i}"} == mine
        assert r.zcard(keys.units_leases(RUN, ds, e)) == n
        assert r.bitcount(keys.units_claimed(RUN, ds, e)) == n


# --- 2. a killed worker's units come back after its lease --------------------------------------

def test_units_of_a_killed_worker_are_reissued_after_the_lease_and_done_exactly_once(
        redis_url, file_url, r, tmp_path, procs):
    cfg = harness.init(redis_url, file_url, task=THIS_TASK, heartbeat_timeout_s=3.0, round_timeout_s=1.0, **SMALL)
    ep = Epoch(r, 0)
    victim = spawn_worker(redis_url, file_url, "victim", tmp_path, env={HANG_ENV: "1"})
    procs.append(victim)
    harness.wait_for_field(r, keys.worker_stats(RUN, "victim"), "state", "training")
    held = ep.held_by("victim")
    assert held == [0, 1, 2, 3, 4], "a round claims the first free units in the epoch's order"
    agg = harness.aggregator(redis_url, file_url)
    w1 = harness.worker(redis_url, file_url, "w1")
    try:
        harness.wait_for_version(r, RUN, 1)
        assert ep.held_by("victim") == held, "a live worker's units are not given to others"
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        expiry_ms = dict(zip(held, r.zmscore(ep.leases, held), strict=True))  # fixed now: nobody renews them
        changed_at = None
        deadline = time.monotonic() + 60
        while changed_at is None:
            owners = r.hmget(ep.owners, held)
            now = server_time_ms(r)
            if any(o != "victim" for o in owners):
                changed_at = now
            assert time.monotonic() < deadline, "the dead worker's units were never re-issued"
            time.sleep(0.02)
        assert changed_at >= min(expiry_ms.values()), "units were re-issued before the dead worker's lease ended"
        wait_until(ep.complete, "epoch 0 done")
    finally:
        stop_all(w1, agg)
    by_unit = {u: (v, ann) for v, ann in committed_announcements(r) for u in ann.units}
    for b in held:
        version, ann = by_unit[(0, b)]
        assert ann.worker == "w1" and int(version["committed_ms"]) >= expiry_ms[b]
    assert not [f for _, f in r.xrange(keys.deltas(RUN)) if f["worker"] == "victim"]
    assert_exactly_once(r, cfg)


# --- 3. stalled and late workers ---------------------------------------------------------------

def test_stalled_worker_keeps_its_lease_then_its_late_delta_is_dropped_and_its_units_reissued(
        redis_url, file_url, r):
    timeout_s = 2.0
    cfg = harness.init(redis_url, file_url, heartbeat_timeout_s=timeout_s, round_timeout_s=0.5, **SMALL)
    ep = Epoch(r, 0)
    entered, gate = threading.Event(), threading.Event()

    def stall(info) -> None:  # after training, before the upload: the worker is alive but slow
        entered.set()
        gate.wait(120)

    slow = harness.worker(redis_url, file_url, "slow", max_rounds=1, observer=stall)
    agg = fast = None
    try:
        assert entered.wait(60)
        held = ep.held_by("slow")
        assert len(held) == 5
        t_claim = server_time_ms(r)
        agg = harness.aggregator(redis_url, file_url)
        fast = harness.worker(redis_url, file_url, "fast")
        # Others commit for more than twice the lease time while the slow worker holds its units.
        v = 1
        while int(harness.wait_for_version(r, RUN, v)[-1]["committed_ms"]) < t_claim + 2.5 * timeout_s * 1000:
            v += 1
        assert ep.held_by("slow") == held, "a renewing worker was robbed of its units"
        assert min(r.zmscore(ep.leases, held)) > server_time_ms(r), "the heartbeat renews the leases"
        taken = {u for _, ann in committed_announcements(r) for u in ann.units}
        assert taken.isdisjoint((0, b) for b in held)
        # The aggregator pauses while the late delta lands, so a round reads it (see the test below).
        assert agg.stop() >= 1
        late_version = runs.read_head(r, RUN).version
        gate.set()
        assert slow.result() == 1  # announced, saw the head past version 0, released its units
        agg = harness.aggregator(redis_url, file_url, "agg2")

        def slow_rejections() -> list[dict[str, str]]:
            return [f for _, f in r.xrange(keys.rejections(RUN)) if f["worker"] == "slow"]

        wait_until(slow_rejections, "the late delta rejected")
        (rej,) = slow_rejections()
        assert rej["reason"] == f"late: trained on version 0, the round is for version {late_version}", rej
        assert "slow" not in r.hgetall(ep.owners).values(), "a dropped delta's units are released"
        wait_until(ep.complete, "epoch 0 done")
    finally:
        gate.set()
        stop_all(*(s for s in (fast, agg, slow) if s is not None))
    by_unit = {u: ann.worker for _, ann in committed_announcements(r) for u in ann.units}
    assert {by_unit[(0, b)] for b in held} == {"fast"}
    assert_exactly_once(r, cfg)


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_commit_refused_for_a_unit_whose_lease_moved_drops_that_worker_and_commits_the_rest(
        redis_url, file_url, r, monkeypatch, codec):
    """The retry steps from the head's weights again (the refused attempt stepped the holder's copy in
    place): the committed version equals a replay of w1's delta alone (fails if the retry reuses it)."""
    from diloco.reduce import Reducer
    from diloco.replay import replay

    cfg = harness.init(redis_url, file_url, **{**SMALL, "codec": codec})
    ep = Epoch(r, 0)
    real_add, stolen = Reducer.add, []

    def reduce_then_move_a_lease(self, entry_id, ann, *args, **kw):
        # As if w0's lease on one unit ended during the reduce and another worker claimed it.
        if ann.worker == "w0" and not stolen:
            epoch, bit = ann.units[2]
            r.hset(ep.owners, bit, "thief")
            stolen.append((epoch, bit, ann.units))
        return real_add(self, entry_id, ann, *args, **kw)

    monkeypatch.setattr(Reducer, "add", reduce_then_move_a_lease)
    agg = harness.aggregator(redis_url, file_url, max_rounds=1)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=1) for i in range(2)]
    assert agg.result() == 1 and [w.result() for w in ws] == [1, 1]
    (entry,) = harness.wait_for_version(r, RUN, 1)
    assert entry["participants"] == "w1"
    (_, rej), = r.xrange(keys.rejections(RUN))
    assert rej["worker"] == "w0" and "leased to thief" in rej["reason"], rej
    _, bit, w0_units = stolen[0]
    (_, w1_ann), = [(v, a) for v, a in committed_announcements(r) if a.worker == "w1"]
    assert ep.done_bits() == {b for _, b in w1_ann.units}
    # w0 gave back what it still held; the moved unit stays with its new holder.
    assert ep.claimed_bits() == ep.done_bits() | {bit}
    assert r.hgetall(ep.owners) == {str(bit): "thief"}
    head = runs.read_head(r, RUN)
    open_store(file_url).get(head.weights, digest=head.weights_digest)  # the retried commit's objects
    a = audit(r, cfg)
    assert a.twice == [] and a.mismatched == [] and not set(w0_units) & set(a.committed)
    assert replay(r, open_store(file_url), RUN).mismatched == []


def test_a_late_delta_landing_during_the_reduce_is_still_rejected_with_a_reason(redis_url, file_url, r, monkeypatch):
    from diloco.reduce import Reducer

    harness.init(redis_url, file_url, **SMALL)
    real_add, ghost = Reducer.add, []

    def reduce_while_a_late_delta_lands(self, entry_id, ann, *args, **kw):
        if ann.version == 1 and not ghost:
            late = Announcement(run=RUN, worker="ghost", nonce="n1", version=0, codec="fp32",
                                shards=(keys.delta_shard(RUN, 0, "ghost", "n1", 0),), sizes=(100,),
                                digest=("0" * 64,), samples=40, tokens=40, inner_steps=5, loss=0.5,
                                units=((0, 40), (0, 41), (0, 42), (0, 43), (0, 44)))
            ghost.append(r.xadd(keys.deltas(RUN), late.to_fields()))
        return real_add(self, entry_id, ann, *args, **kw)

    monkeypatch.setattr(Reducer, "add", reduce_while_a_late_delta_lands)
    agg = harness.aggregator(redis_url, file_url, max_rounds=3)
    w0 = harness.worker(redis_url, file_url, "w0", max_rounds=3)
    assert agg.result() == 3 and w0.result() == 3 and ghost
    # The round for version 2 read the ghost's entry (after the deltas_read of version 2's commit) and
    # rejected it before committing version 3, so the rejection is there now: no wait.
    [rejection] = [f for _, f in r.xrange(keys.rejections(RUN)) if f["entry"] == ghost[0]]
    assert rejection["worker"] == "ghost" and rejection["reason"].startswith("late: "), rejection


# --- 4. restarting every service mid-epoch -------------------------------------------------------

def test_restart_of_aggregator_and_workers_mid_epoch_resumes_at_the_next_unclaimed_unit(
        redis_url, file_url, r, tmp_path, procs):
    cfg = harness.init(redis_url, file_url, min_workers=2, **SMALL)
    ep = Epoch(r, 0)
    procs.append(spawn(["aggregator", "--run", RUN, "--redis-url", redis_url, "--store", file_url, "--id", "a1"],
                       tmp_path / "a1.log"))
    procs += [spawn_worker(redis_url, file_url, f"w{i}", tmp_path) for i in range(2)]
    harness.wait_for_version(r, RUN, 2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        assert p.wait(60) == 0, (tmp_path / "a1.log").read_text()[-3000:]
    done = ep.done_bits()
    version = runs.read_head(r, RUN).version
    assert len(done) == 10 * version and 20 <= len(done) < NUM_UNITS
    assert done == set(range(len(done))), "progress reads as a prefix of the epoch's order"
    assert ep.claimed_bits() == done, "a graceful stop gives back every unit it did not commit"
    assert r.zcard(ep.leases) == 0 and r.hlen(ep.owners) == 0

    agg = harness.aggregator(redis_url, file_url, "a2")
    ws = [harness.worker(redis_url, file_url, f"w{i}") for i in range(2)]
    try:
        entries = harness.wait_for_version(r, RUN, version + 1)
        first = {u for v, ann in committed_announcements(r) if int(v["version"]) == version + 1 for u in ann.units}
        assert entries[-1]["participants"] == "w0,w1"
        assert first == {(0, b) for b in range(len(done), len(done) + 10)}
        wait_until(ep.complete, "epoch 0 done")
    finally:
        stop_all(*ws, agg)
    assert_exactly_once(r, cfg)


# --- 5. Redis crash (AOF) and Redis wipe (recover) ----------------------------------------------

def _committed_state(r: redis.Redis, ep: Epoch) -> tuple:
    return (r.hgetall(keys.head(RUN)), r.xrange(keys.versions(RUN)), sorted(ep.done_bits()),
            r.hgetall(keys.units_meta(RUN, ep.plan.dataset)), r.get(keys.lock_token(RUN)))


def test_redis_crash_loses_nothing_committed_and_the_epoch_completes(redis_server, redis_url, file_url, r):
    cfg = harness.init(redis_url, file_url, min_workers=2, heartbeat_timeout_s=3.0, **SMALL)
    ep = Epoch(r, 0)
    agg = harness.aggregator(redis_url, file_url, "a1")
    ws = [harness.worker(redis_url, file_url, f"w{i}") for i in range(2)]
    try:
        harness.wait_for_version(r, RUN, 2)
        assert agg.stop() >= 2  # commits stop here: the committed state can be compared exactly
        before = _committed_state(r, ep)
        redis_server.kill()  # SIGKILL: only what the AOF fsynced survives
        redis_server.start()
        after = _committed_state(r, ep)
        assert after == before
        assert len(before[2]) == 10 * int(before[0]["version"])
        # The workers ride out the outage; a new aggregator takes their pending deltas and finishes the epoch.
        agg = harness.aggregator(redis_url, file_url, "a2")
        wait_until(ep.complete, "epoch 0 done")
    finally:
        if redis_server.proc is None or redis_server.proc.poll() is not None:
            redis_server.start()
        stop_all(*ws, agg)
    assert_exactly_once(r, cfg)


def _committed_units(r: redis.Redis, after: int) -> Counter:
    """Units per committed announcement of the versions after `after` (those the deltas stream still has)."""
    out: Counter = Counter()
    for _, ann in committed_announcements(r, after=after):
        out.update(ann.units)
    return out


def test_wiped_redis_is_recovered_from_the_snapshot_and_no_unit_is_committed_twice(redis_url, file_url, r):
    cfg = harness.init(redis_url, file_url, min_workers=2, **SMALL)
    ep = Epoch(r, 0)
    agg = harness.aggregator(redis_url, file_url, "a1", max_rounds=3)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=3) for i in range(2)]
    assert agg.result() == 3 and [w.result() for w in ws] == [3, 3]
    pre = audit(r, cfg)  # the deltas stream does not survive a wipe: audit the history before it
    assert pre.versions == 3 and pre.twice == [] and pre.mismatched == [] and len(pre.committed) == 30
    done, token = ep.done_bits(), int(r.get(keys.lock_token(RUN)))
    assert open_store(file_url).list(keys.snapshot_prefix(RUN))[-1] == keys.snapshot_object(RUN, 3)
    r.flushall()

    out = subprocess.run([*DILOCO, "recover", "--run", RUN, "--redis-url", redis_url, "--store", file_url],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "run t recovered at version 3" in out.stdout
    assert runs.read_head(r, RUN).version == 3 and runs.load_config(r, RUN) == cfg
    assert ep.done_bits() == done == {b for _, b in pre.committed}
    assert ep.claimed_bits() == done, "leases died with Redis: only done units stay claimed"
    assert r.zcard(ep.leases) == 0 and r.hlen(ep.owners) == 0
    assert int(r.get(keys.lock_token(RUN))) >= token, "fencing tokens never go back"

    agg = harness.aggregator(redis_url, file_url, "a2")
    ws = [harness.worker(redis_url, file_url, f"w{i}") for i in range(2)]
    try:
        entries = harness.wait_for_version(r, RUN, 4)
        assert [int(e["version"]) for e in entries] == [1, 2, 3, 4], "the run continues from version 3"
        wait_until(ep.complete, "epoch 0 done")
    finally:
        stop_all(*ws, agg)
    overall = pre.committed + _committed_units(r, after=3)
    assert [u for u, c in overall.items() if c > 1] == [], "a unit committed twice across the wipe"
    assert {b for e, b in overall if e == 0} == set(range(NUM_UNITS)), "a unit of the finished epoch was lost"
    assert {(0, b) for b in ep.done_bits()} == {u for u in overall if u[0] == 0}


def _announced(r: redis.Redis, worker: str, version: int) -> list[dict[str, str]]:
    return [f for _, f in r.xrange(keys.deltas(RUN)) if f["worker"] == worker and f["version"] == str(version)]


def test_worker_that_rides_out_a_wipe_announces_again_for_the_recovered_version(redis_url, file_url, r):
    harness.init(redis_url, file_url, **SMALL)
    agg = harness.aggregator(redis_url, file_url, max_rounds=1)
    w0 = harness.worker(redis_url, file_url, "w0")
    try:
        assert agg.result() == 1  # version 1 and its snapshot; nobody commits w0's next delta
        wait_until(lambda: _announced(r, "w0", 1), "w0 announced for version 1")
        r.flushall()
        wait_until(lambda: w0.service.outage.since is not None, "w0 noticed the wipe")
        assert snapshot.recover(r, open_store(file_url), RUN) == 1
        # Its first announcement went with the wipe: it trains on version 1 again and announces again.
        wait_until(lambda: _announced(r, "w0", 1) or not w0.is_alive(), "w0 announced again or died")
    finally:
        w0.service.stop()
        w0.join(30)
    assert w0.error is None
    assert len(_announced(r, "w0", 1)) == 1


def test_worker_blocked_while_redis_is_wiped_and_recovered_announces_again(redis_url, file_url, r):
    """Kills the mutant that ends the worker when its announcement vanished (`_wait_for_version_after`
    setting its stop event): it exits cleanly, which this test used to accept in place of announcing."""
    harness.init(redis_url, file_url, **SMALL)
    agg = harness.aggregator(redis_url, file_url, max_rounds=1)
    w0 = harness.Service(Worker(WorkerSettings(redis_url, file_url, RUN, "w0", heartbeat_interval_s=0.5,
                                               block_ms=2500)), None)
    w0.start()
    try:
        assert agg.result() == 1
        wait_until(lambda: _announced(r, "w0", 1), "w0 announced for version 1")
        wait_until(lambda: any(c["cmd"] == "xread" and "b" in c["flags"] for c in r.client_list()),
                   "w0 blocked waiting for version 2")
        r.flushall()
        assert snapshot.recover(r, open_store(file_url), RUN) == 1
        wait_until(lambda: _announced(r, "w0", 1) or not w0.is_alive(), "w0 announced again or died")
        assert w0.is_alive(), f"w0 died instead of announcing again: {w0.error!r}"
    finally:
        w0.service.stop()
        w0.join(30)
    assert w0.error is None
    assert len(_announced(r, "w0", 1)) == 1, "w0 announced again for the recovered version"


def test_aggregator_survives_a_wipe_between_commit_and_snapshot(redis_url, file_url, r, monkeypatch):
    import aggregator.aggregator as agg_module

    harness.init(redis_url, file_url, **SMALL)
    real = agg_module.crash_point

    def wipe_after_commit(name: str) -> None:
        if name == "after_commit":
            r.flushall()
        real(name)

    monkeypatch.setattr(agg_module, "crash_point", wipe_after_commit)
    agg = harness.aggregator(redis_url, file_url, max_rounds=1)
    w0 = harness.worker(redis_url, file_url, "w0", max_rounds=1)  # one round: it never claims in the wiped Redis
    try:
        assert agg.result() == 1
    finally:
        w0.service.stop()
        w0.join(30)
        assert not w0.is_alive()


def test_claim_neither_spins_nor_ignores_stop_while_the_units_meta_is_gone(redis_url, file_url, r):
    """Kills the mutant that raises another error (KeyError) for the missing units meta, which this
    test used to accept: the worker waits out only RunNotFound, any other error ends it."""
    cfg = harness.init(redis_url, file_url, **SMALL)
    leases = Leases(r, RUN, plan_for(r, cfg), "w0", lease_ms=10_000)
    real, calls = leases.scripts.claim_units, []

    def counted(*args, **kw):
        calls.append(1)
        if len(calls) > 200:
            raise RuntimeError("claim_units called 200 times: spinning")
        return real(*args, **kw)

    leases.scripts.claim_units = counted
    r.delete(keys.units_meta(RUN, cfg.dataset_id))  # as after a wipe
    stop, outcome = threading.Event(), {}

    def claim() -> None:
        try:
            outcome["value"] = leases.claim(5, stop)
        except Exception as e:
            outcome["error"] = e

    t = threading.Thread(target=claim, daemon=True)
    t.start()
    wait_until(lambda: len(calls) >= 3 or not t.is_alive(), "claim tried")
    stop.set()
    t.join(10)
    assert not t.is_alive()
    # RunNotFound, which the worker waits out like an outage (for `diloco recover`); never a spin
    # (the RuntimeError above), never another error, never units from a run that is gone.
    assert list(outcome) == ["error"] and type(outcome["error"]) is RunNotFound, outcome
    assert str(outcome["error"]) == "run 't' has no work units in Redis (was it wiped?)"   # `claim` 20


# --- 6. dataset length, malformed unit ids -------------------------------------------------------

def test_dataset_length_mismatch_is_a_clear_error_naming_both_lengths(redis_url, file_url, r, tmp_path,
                                                                       monkeypatch):
    cfg = harness.init(redis_url, file_url, task=THIS_TASK, **SMALL)
    out = subprocess.run([*DILOCO, "worker", "--run", RUN, "--redis-url", redis_url, "--store", file_url,
                          "--worker-id", "w0"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, TRUNCATE_ENV: "360"})
    assert out.returncode == 2, out.stderr
    assert f"dataset {cfg.dataset_id} has 360 samples here, but the run registered 400" in out.stderr
    assert "Traceback" not in out.stderr

    r.hset(keys.datasets(RUN), cfg.dataset_id, "401")
    with pytest.raises(ConfigError, match="has 400 samples here, but the run registered 401"):
        Worker(WorkerSettings(redis_url, file_url, RUN, "w0"))
    r.hset(keys.datasets(RUN), cfg.dataset_id, "400")

    monkeypatch.setenv(SAMPLES_ENV, "399")  # other data: another dataset id, named with the run's
    with pytest.raises(ConfigError, match=f"is not the run's dataset {cfg.dataset_id}"):
        Worker(WorkerSettings(redis_url, file_url, RUN, "w0"))


def test_malformed_or_foreign_unit_ids_are_rejected_with_a_reason_and_change_no_bitmap(redis_url, file_url, r):
    harness.init(redis_url, file_url, **SMALL)
    first = harness.aggregator(redis_url, file_url, max_rounds=1)
    assert harness.worker(redis_url, file_url, "w1", max_rounds=1).result() == 1 and first.result() == 1
    ep = Epoch(r, 0)
    assert ep.done_bits() == {0, 1, 2, 3, 4}
    lo, hi = (int(x) for x in r.hmget(keys.units_meta(RUN, ep.plan.dataset), "epoch_lo", "epoch_hi"))
    assert Scripts(r).claim_units(RUN, ep.plan.dataset, lo, hi, 5, "w1", 600_000) == [(0, b) for b in range(5, 10)]
    raw = redis.Redis.from_url(redis_url)

    def bitmaps() -> list:
        state = [raw.hgetall(keys.units_meta(RUN, ep.plan.dataset)), raw.hgetall(keys.head(RUN))]
        for e in (0, 1):
            c, d, leases, owners = keys.epoch_keys(RUN, ep.plan.dataset, e)
            state += [raw.get(c), raw.get(d), raw.zrange(leases, 0, -1, withscores=True), raw.hgetall(owners)]
        return state

    free = "0:10,0:11,0:12,0:13"
    cases = {
        f"{free},0:999999": "work unit 0:999999 is out of range (epochs 0..0, 50 units)",
        f"9:1,{free}": "work unit 9:1 is out of range",
        f"{free},0:10": "malformed announcement: field 'units' lists a unit twice",
        f"a:b,{free}": "malformed announcement: field 'units' holds 'a:b', not 'epoch:bit'",
        f"0:-1,{free}": "malformed announcement: field 'units' holds '0:-1'",
        "0:10": "lists 1 work units, a round trains on 5",
        "": "lists 0 work units, a round trains on 5",
        "0:0,0:1,0:2,0:3,0:4": "work unit 0:0 is already done",
        "0:5,0:6,0:7,0:8,0:9": "work unit 0:5 is leased to w1, not to evil (its lease ended)",
        # Units leased to nobody pass the unit check (a lease that ended keeps the work, see COMMIT);
        # the delta is still rejected, at its first missing shard, and no bitmap changes.
        f"{free},0:14": "ObjectMissing: no object",
    }
    before = bitmaps()
    base = Announcement(run=RUN, worker="evil", nonce="n1", version=1, codec="fp32",
                        shards=(keys.delta_shard(RUN, 1, "evil", "n1", 0),), sizes=(100,), digest=("0" * 64,),
                        samples=40, tokens=40, inner_steps=5, loss=0.5).to_fields()
    ids = {r.xadd(keys.deltas(RUN), {**base, "units": units}): reason for units, reason in cases.items()}
    agg = harness.aggregator(redis_url, file_url)
    try:
        wait_until(lambda: r.xlen(keys.rejections(RUN)) >= len(cases), "every crafted announcement rejected")
    finally:
        assert agg.stop() == 0
    got = {f["entry"]: f for _, f in r.xrange(keys.rejections(RUN))}
    assert set(got) == set(ids)
    for entry_id, reason in ids.items():
        assert got[entry_id]["worker"] == "evil" and reason in got[entry_id]["reason"], got[entry_id]
    assert bitmaps() == before, "a rejected announcement changed the unit bitmaps"


# --- 7. the `units` command ----------------------------------------------------------------------

def test_units_command_reports_each_epoch_consistently_with_the_bitmaps(redis_url, file_url, r, capsys):
    harness.init(redis_url, file_url, **SMALL)
    agg = harness.aggregator(redis_url, file_url, max_rounds=2)
    assert harness.worker(redis_url, file_url, "w1", max_rounds=2).result() == 2 and agg.result() == 2
    e0, scripts = Epoch(r, 0), Scripts(r)
    ds = e0.plan.dataset
    claimed_from_ms = server_time_ms(r)
    assert len(scripts.claim_units(RUN, ds, 0, 0, 40, "wx", 60_000)) == 40   # the rest of epoch 0
    assert scripts.claim_units(RUN, ds, 0, 0, 2, "wy", 60_000) == [(1, 0), (1, 1)]   # opens epoch 1
    e1 = Epoch(r, 1)

    assert cli_main(["units", "--run", RUN, "--redis-url", redis_url, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    # Leases of 60 s, claimed and read back within `elapsed_s` on the Redis clock: bounds that hold
    # however slowly a loaded machine runs the lines in between.
    elapsed_s = (server_time_ms(r) - claimed_from_ms) / 1000
    assert (rep["run"], rep["dataset"], rep["num_units"], rep["samples"], rep["unit_samples"]) == \
        (RUN, ds, NUM_UNITS, 400, 8)
    assert (rep["epoch_lo"], rep["epoch_hi"]) == (0, 1)
    versions = r.xrevrange(keys.versions(RUN))
    span_ms = int(versions[0][1]["committed_ms"]) - int(versions[-1][1]["committed_ms"])
    rate = round(int(versions[0][1]["units"]) * 1000 / span_ms, 3)
    assert rep["units_per_s"] == rate
    for ep, got in zip((e0, e1), rep["epochs"], strict=True):
        done, claimed = ep.done_bits(), ep.claimed_bits()
        assert got["total"] == NUM_UNITS and got["done"] == len(done) and got["claimed"] == len(claimed)
        owners = r.hgetall(ep.owners)
        assert {(lease["unit"], lease["worker"]) for lease in got["leased"]} == {(int(b), w) for b, w in owners.items()}
        assert all(60 - elapsed_s - 0.1 <= lease["expires_in_s"] <= 60 for lease in got["leased"]), elapsed_s
        assert got["eta_s"] == round((NUM_UNITS - len(done)) / rate, 1)
    assert [(e["epoch"], e["done"], e["claimed"], len(e["leased"])) for e in rep["epochs"]] == \
        [(0, 10, 50, 40), (1, 0, 2, 2)]

    assert cli_main(["units", "--run", RUN, "--redis-url", redis_url]) == 0
    table = capsys.readouterr().out
    assert "10/50" in table and "0/50" in table and "wx" in table and "wy" in table


def test_units_report_covers_the_open_epochs_only_counts_the_last_bit_and_leases_to_a_tenth_of_a_second(
        redis_url, file_url, r):
    """Kills `report` 34 (epochs listed from 0, not from epoch_lo), 76 (the done count stops before
    the last unit) and 115, 117, 120, 121 (a lease's seconds left rounded to whole seconds or to
    hundredths, or divided by 1001): the lease below ends 10000.75 s after `before`, so a report
    read within 0.6 s says between 10000.1 and 10000.8, to one decimal."""
    cfg = harness.init(redis_url, file_url, **SMALL)
    ds, scripts = cfg.dataset_id, Scripts(r)
    meta = keys.units_meta(RUN, ds)
    r.hset(meta, mapping={"epoch_lo": "1", "epoch_hi": "2"})        # as once epoch 0 is all done
    r.setbit(keys.units_done(RUN, ds, 0), 3, 1)                      # an old epoch's bits are not reported
    assert scripts.claim_units(RUN, ds, 1, 2, 2, "wz", 60_000) == [(1, 0), (1, 1)]
    r.setbit(keys.units_done(RUN, ds, 1), NUM_UNITS - 1, 1)          # the last unit of epoch 1 is done
    r.setbit(keys.units_done(RUN, ds, 1), 7, 1)
    before = server_time_ms(r)
    r.zadd(keys.units_leases(RUN, ds, 2), {"4": before + 10_000_750})
    r.hset(keys.units_owners(RUN, ds, 2), "4", "wq")
    rep = units_report(r, cfg)
    after = server_time_ms(r)
    assert (rep["epoch_lo"], rep["epoch_hi"]) == (1, 2)
    assert [(e["epoch"], e["total"], e["claimed"], e["done"]) for e in rep["epochs"]] == \
        [(1, NUM_UNITS, 2, 2), (2, NUM_UNITS, 0, 0)]
    assert {(lease["unit"], lease["worker"]) for lease in rep["epochs"][0]["leased"]} == {(0, "wz"), (1, "wz")}
    (lease,) = rep["epochs"][1]["leased"]
    allowed = {round((before + 10_000_750 - now) / 1000, 1) for now in range(before, after + 1)}
    assert (lease["unit"], lease["worker"]) == (4, "wq") and lease["expires_in_s"] in allowed, (lease, allowed)
    if after - before < 600:   # the report ran within 0.6 s: whole seconds would say 10001
        assert 10000.1 <= lease["expires_in_s"] <= 10000.8 and lease["expires_in_s"] != round(lease["expires_in_s"])


def test_units_per_second_is_measured_over_the_last_ten_versions(r):
    """Kills `_units_per_second` 1, 4, 6 (the rate over the last 11 versions, or over all), 14, 16, 19
    (a version without a `units` field, as old runs have, counted as an error or as 1 unit), 20, 30
    (the wrong end of the window), 36, 45, 46 (no time between the ends: no rate; 1 ms: a rate)."""
    stream = keys.versions("rate")
    assert _units_per_second(r, ["rate"]) is None
    r.xadd(stream, {"version": "1", "units": "5", "committed_ms": "0"})
    assert _units_per_second(r, ["rate"]) is None, "one version is no rate"
    r.xadd(stream, {"version": "2", "units": "5", "committed_ms": "0"})
    assert _units_per_second(r, ["rate"]) is None, "no time between them is no rate"
    r.xadd(stream, {"version": "3", "units": "5", "committed_ms": "1"})
    assert _units_per_second(r, ["rate"]) == round(10 * 1000 / 1, 3)
    r.delete(stream)
    # two slow early versions, then ten 1 s apart with 5 units each but v5, which predates units
    r.xadd(stream, {"version": "1", "units": "5", "committed_ms": "0"})
    r.xadd(stream, {"version": "2", "units": "5", "committed_ms": "50000"})
    for v in range(3, 13):
        r.xadd(stream, {"version": str(v), "committed_ms": str(101_000 + 1000 * (v - 3)),
                        **({"units": "5"} if v != 5 else {})})
    assert _units_per_second(r, ["rate"]) == round(40 * 1000 / 9000, 3)       # v4..v12 over v3..v12
    assert _units_per_second(r, ["rate"], last=11) == round(45 * 1000 / 60_000, 3)


def test_renew_extends_every_held_lease_in_each_epoch_and_release_gives_them_back(redis_url, file_url, r):
    """Kills `Leases.renew` 4-15 (an argument of the renewal dropped or None): the slow lease tests
    that exercise renewal end to end are not in the mutation group, and the worker's heartbeat
    thread logs a failed renewal instead of failing. A claim across the end of epoch 0 holds units
    of two epochs; renewed with a 600 s lease, each of their leases ends at least 500 s from now."""
    cfg = harness.init(redis_url, file_url, **SMALL)
    plan = plan_for(r, cfg)
    assert len(Scripts(r).claim_units(RUN, plan.dataset, 0, 0, NUM_UNITS - 2, "other", 600_000)) == NUM_UNITS - 2
    leases = Leases(r, RUN, plan, "w0", lease_ms=1_000)
    got = leases.claim(5, threading.Event())
    assert [e for e, _ in got] == [0, 0, 1, 1, 1]
    leases.lease_ms = 600_000
    leases.renew()
    now = server_time_ms(r)
    for epoch, bits in ((0, [b for e, b in got if e == 0]), (1, [b for e, b in got if e == 1])):
        ep = Epoch(r, epoch)
        assert ep.held_by("w0") == sorted(bits)
        assert all(r.zscore(ep.leases, b) > now + 500_000 for b in bits), r.zrange(ep.leases, 0, -1, withscores=True)
    assert leases.release() == 5 and leases.held == []
    assert Epoch(r, 0).held_by("w0") == [] and Epoch(r, 1).held_by("w0") == []


def test_plan_for_reads_the_run_seed_and_says_which_run_has_no_units(redis_url, file_url, r):
    """Kills `plan_for` 12 (the run's seed not passed: another order of units), 8 (RunNotFound
    without its message) and `UnitPlan.samples` 7 (a strided unit's samples stepping backwards)."""
    cfg = harness.init(redis_url, file_url, seed=17, **SMALL)
    assert plan_for(r, cfg) == UnitPlan(cfg.dataset_id, 400, 8, 17, "strided")
    plan = UnitPlan("d", 100, 4, seed=0)
    u = int(plan.order(0)[0])
    assert plan.samples((0, 0)) == [u, u + 25, u + 50, u + 75]
    r.delete(keys.units_meta(RUN, cfg.dataset_id))
    with pytest.raises(RunNotFound, match=f"run 't' has no work units for dataset {cfg.dataset_id}"):
        plan_for(r, cfg)


# --- 8. init's checks ----------------------------------------------------------------------------

def test_init_refuses_a_round_larger_than_the_dataset_or_units_that_do_not_divide_it(redis_url, file_url, r):
    with pytest.raises(ConfigError, match=r"a round trains on 5 work units of 8 samples, but the dataset has only "
                                          r"4 units \(32 samples\)"):
        harness.init(redis_url, file_url, task_options={"num_samples": 32})
    with pytest.raises(ConfigError, match=r"unit_samples \(7\) must divide the samples of one round "
                                          r"\(sync_every \* grad_accum \* batch_size = 40\)"):
        harness.init(redis_url, file_url, unit_samples=7, **SMALL)
    assert not r.exists(keys.config(RUN)) and not r.keys("diloco:*"), "a refused init creates nothing"
    cfg = harness.init(redis_url, file_url, task_options={"num_samples": 33})  # 5 units, the last one wraps
    assert units_per_round(cfg) == 5 == plan_for(r, cfg).num_units
    cfg = harness.init(redis_url, file_url, run="t2", unit_samples=20, **SMALL)
    assert units_per_round(cfg) == 2 and plan_for(r, cfg).num_units == 20
    # DyLU's shorter rounds claim fewer units (kills units.x_units_per_round__mutmut_3: H ignored)
    assert units_per_round(cfg.replace(unit_samples=8), inner_steps=2) == 2   # 2 steps x batch 8 / 8


@pytest.mark.parametrize("length,unit_samples", [(400, 8), (33, 8), (7, 7), (1, 1), (1000, 1), (101, 10)])
@pytest.mark.parametrize("layout", ["strided", "contiguous"])
def test_every_sample_is_in_some_unit_and_only_wrapped_ones_twice(length, unit_samples, layout):
    plan = UnitPlan("d", length, unit_samples, seed=3, layout=layout)
    seen = Counter(i for bit in range(plan.num_units) for i in plan.samples((0, bit)))
    assert set(seen) == set(range(length)), "an epoch visits every sample"
    assert all(len(plan.samples((0, b))) == unit_samples for b in range(plan.num_units))
    wrapped = plan.num_units * unit_samples - length
    assert sum(seen.values()) - length == wrapped and max(seen.values()) <= 2


def test_strided_units_spread_over_the_dataset_and_old_runs_keep_contiguous_units(redis_url, file_url, r):
    plan = UnitPlan("d", 4000, 16, seed=0)
    spread = plan.samples((0, 0))
    ordered = sorted(spread)
    assert min(b - a for a, b in itertools.pairwise(ordered)) >= 4000 // 16 - 1, spread
    cfg = harness.init(redis_url, file_url, **SMALL)
    assert r.hget(keys.units_meta(RUN, cfg.dataset_id), "layout") == "strided"
    assert plan_for(r, cfg).layout == "strided"
    r.hdel(keys.units_meta(RUN, cfg.dataset_id), "layout")  # a run created before layouts existed
    old = plan_for(r, cfg)
    assert old.layout == "contiguous" and old.samples((0, 0)) == list(range(int(old.order(0)[0]) * 8,
                                                                               int(old.order(0)[0]) * 8 + 8))
    with pytest.raises(ValueError, match=r"unknown work unit layout 'diagonal' \(known: strided, contiguous\)"):
        UnitPlan("d", 10, 2, 0, layout="diagonal")
