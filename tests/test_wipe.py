"""A Redis wiped under running services, then `diloco recover`: the run carries on by itself.

Work that was in flight at the wipe is either accepted (a delta whose units nobody else holds: see
the COMMIT script) or redone (a worker whose announcement vanished or was rejected trains again),
never left waiting; the aggregator that lost its lock in the wipe takes it again. Also: a worker
whose delta is rejected for any reason (here as an outlier) learns of it and trains again.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import redis

from diloco import keys, snapshot
from diloco.messages import Announcement
from diloco.store import open_store
from tests import harness
from tests.harness import wait_until
from tests.test_units import RUN, SMALL, Epoch, _committed_units


def _history_then_wipe(r: redis.Redis) -> tuple[int, dict[int, list]]:
    """FLUSHALL, with the committed history read in the same transaction: (head version, units per version)."""
    pipe = r.pipeline(transaction=True)
    pipe.xrange(keys.versions(RUN))
    pipe.xrange(keys.deltas(RUN))
    pipe.hget(keys.head(RUN), "version")
    pipe.flushall()
    versions, deltas, head, _ = pipe.execute()
    by_id = dict(deltas)
    units = {}
    for _, v in versions:
        anns = [Announcement.from_fields(by_id[e]) for e in filter(None, v.get("entries", "").split(","))]
        units[int(v["version"])] = [u for a in anns for u in a.units]
    return int(head), units


def test_a_wipe_under_running_services_then_recover_carries_on_without_restarts(redis_url, file_url, r, caplog):
    caplog.set_level(logging.WARNING, logger="diloco.connect")
    cfg = harness.init(redis_url, file_url, **SMALL)
    ep = Epoch(r, 0)
    agg = harness.aggregator(redis_url, file_url, "a1")
    ws = [harness.worker(redis_url, file_url, f"w{i}") for i in range(2)]
    try:
        harness.wait_for_version(r, RUN, 3)
        head, history = _history_then_wipe(r)
        wait_until(lambda: all(w.service.outage.since is not None for w in ws), "the workers noticed the wipe")
        recovered = snapshot.recover(r, open_store(file_url), RUN)
        assert 1 <= recovered <= head
        # Nobody is restarted: the aggregator takes the lock again and versions follow the recovered one.
        entries = harness.wait_for_version(r, RUN, recovered + 3, timeout_s=90)
        assert [int(e["version"]) for e in entries][-3:] == [recovered + 1, recovered + 2, recovered + 3]
        lock = r.get(keys.lock(RUN))
        assert lock is not None and lock.endswith(":a1"), lock
        assert all(w.is_alive() for w in [*ws, agg])
        wait_until(ep.complete, "epoch 0 done")
        # the aggregator said what it waited for and why (kills Aggregator.run 47, 48, 51-53)
        waits = [rec.getMessage() for rec in caplog.records if rec.threadName == "Aggregator"
                 and rec.getMessage().startswith("waiting for the run to reappear in Redis (diloco recover)")]
        assert waits and all("does not exist in this Redis" in m or "no version pointer" in m for m in waits), waits
    finally:
        for s in (*ws, agg):
            s.service.stop()
    # Units of versions up to the recovered one stand; later pre-wipe commits were lost with the wipe
    # (their weights are not restored) and their units were trained again, never twice.
    kept = Counter(u for v, us in history.items() if v <= recovered for u in us)
    overall = kept + _committed_units(r, after=recovered)
    assert [u for u, c in overall.items() if c > 1] == [], "a unit committed twice across the wipe"
    assert {b for e, b in overall if e == 0} == set(range(ep.plan.num_units)), "a unit of epoch 0 was lost"
    assert {(0, b) for b in ep.done_bits()} == {u for u in overall if u[0] == 0}
    assert cfg.run == RUN


def test_a_worker_whose_delta_is_rejected_as_an_outlier_trains_again(redis_url, file_url, r, monkeypatch):
    import workers.worker as worker_module

    harness.init(redis_url, file_url, min_workers=3, **SMALL)
    real, blown = worker_module.Worker._encode_with_feedback, []

    def blow_up_once(self, delta, version):
        if self.s.worker_id == "w2" and not blown:  # w2's first delta is 1000x too large
            blown.append(version)
            delta = {n: t * 1000 for n, t in delta.items()}
        return real(self, delta, version)

    monkeypatch.setattr(worker_module.Worker, "_encode_with_feedback", blow_up_once)
    agg = harness.aggregator(redis_url, file_url)
    ws = [harness.worker(redis_url, file_url, f"w{i}") for i in range(4)]
    try:
        entries = harness.wait_for_version(r, RUN, 3)
        ((_, rej),) = r.xrange(keys.rejections(RUN))
        assert rej["worker"] == "w2" and rej["reason"].startswith("outlier"), rej
        # w2 learned of it and trained again: it announced a second time for the same version or a
        # later one, and a later version counts it.
        w2 = [f for _, f in r.xrange(keys.deltas(RUN)) if f["worker"] == "w2"]
        assert len(w2) >= 2 and int(w2[1]["version"]) >= blown[0]
        assert any("w2" in e["participants"].split(",") for e in entries if int(e["version"]) > blown[0])
        wait_until(lambda: "outlier" in (r.hget(keys.worker_stats(RUN, "w2"), "last_rejection") or ""),
                   "w2's stats to name its rejection")
    finally:
        for s in (*ws, agg):
            s.service.stop()


def test_a_holder_whose_round_loop_hangs_gives_the_lock_up_and_a_standby_commits(redis_url, file_url, r,
                                                                                  monkeypatch):
    """A zombie holder: its renewal thread would keep the lock forever while its round never ends."""
    from diloco.reduce import Reducer

    harness.init(redis_url, file_url, **SMALL)
    real, hung, release = Reducer.add, [], threading.Event()

    def hang_first(*args, **kw):
        if not hung:  # the first holder's first reduce never returns (until the test ends)
            hung.append(threading.current_thread().name)
            release.wait(120)
        return real(*args, **kw)

    monkeypatch.setattr(Reducer, "add", hang_first)
    zombie = harness.aggregator(redis_url, file_url, "zombie", stall_limit_s=1.0, lock_ttl_s=30)
    harness.wait_for_key(r, keys.lock(RUN))
    standby = harness.aggregator(redis_url, file_url, "standby", lock_ttl_s=30)
    w0 = harness.worker(redis_url, file_url, "w0")
    try:
        entries = harness.wait_for_version(r, RUN, 2, timeout_s=60)  # well within the 30 s lock TTL
        assert {e["aggregator"] for e in entries} == {"standby"}
        assert hung, "the zombie never reached its reduce"
    finally:
        release.set()
        for s in (w0, standby, zombie):
            s.service.stop()
    assert zombie.error is None and standby.error is None
