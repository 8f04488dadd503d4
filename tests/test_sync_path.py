"""The sync round's critical path: the pipelined reduce and the holder's cached weights.

The aggregator sums each delta as soon as it is accepted, in the order of the deltas stream, and
records that order in the version's `entries`; summing the same deltas after the round closes, in
that order (what `diloco.replay` does), must give the committed weights bit for bit. The lock
holder keeps the weights and momentum it committed and reads them from the store only when the
head is not its own last commit.
"""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest

from diloco import keys, runs
from diloco.messages import Announcement
from diloco.replay import replay
from diloco.store import open_store
from tests import harness

RUN = "t"


def _ids(entries: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in e.split("-")) for e in entries.split(",")]


# topk at a density of its own: the aggregator decodes with the run's codec options (kills
# Aggregator._round 31, 33: the codec built with the defaults, whose k does not match the shards)
@pytest.mark.parametrize(("codec", "options"), [("fp32", {}), ("topk", {"density": 0.05})])
def test_pipelined_reduce_equals_a_reduce_after_the_round_in_stream_order(redis_url, file_url, r, codec, options):
    harness.init(redis_url, file_url, codec=codec, codec_options=options, min_workers=3,
                 task_options={"num_samples": 400})
    agg = harness.aggregator(redis_url, file_url, max_rounds=3)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=3) for i in range(3)]
    assert agg.result() == 3 and [w.result() for w in ws] == [3, 3, 3]
    versions = [f for _, f in r.xrange(keys.versions(RUN))]
    for v in versions:
        ids = _ids(v["entries"])
        assert len(ids) == 3 and ids == sorted(ids), "summed in the order of the deltas stream"
        assert v["participants"] == "w0,w1,w2"  # a display field: sorted by worker id
        # the published update's objects are named for this run, version and fencing token (kills
        # Aggregator._publish_update 15, 17); fp32 publishes none
        names = v["update"].split(",") if v["update"] else []
        assert names == [keys.update_shard(RUN, int(v["version"]), int(v["token"]), i) for i in range(len(names))]
        assert bool(names) == (codec == "topk")
    rep = replay(r, open_store(file_url), RUN)
    assert rep.versions == 3 and rep.mismatched == []


def test_the_holder_reads_the_weights_from_the_store_only_when_the_head_is_not_its_own(redis_url, file_url, r,
                                                                                        monkeypatch):
    import aggregator.aggregator as agg_module

    harness.init(redis_url, file_url, task_options={"num_samples": 400})
    loads: list[int] = []
    real = runs.load_weights

    def counted(store, head):
        if threading.current_thread().name == "Aggregator":  # workers download every version, as they must
            loads.append(head.version)
        return real(store, head)

    monkeypatch.setattr(agg_module.runs, "load_weights", counted)
    agg = harness.aggregator(redis_url, file_url, max_rounds=4)
    w0 = harness.worker(redis_url, file_url, "w0", max_rounds=4)
    assert agg.result() == 4 and w0.result() == 4
    assert loads.count(0) == 1 and set(loads) == {0}, loads  # only version 0, written by init
    assert replay(r, open_store(file_url), RUN).mismatched == []
    # A head this holder did not commit (as after another aggregator's commit) is read from the store.
    agg2 = harness.aggregator(redis_url, file_url, "agg2", max_rounds=1)
    w1 = harness.worker(redis_url, file_url, "w1", max_rounds=1)
    assert agg2.result() == 1 and w1.result() == 1
    assert loads[-1] == 4


def test_the_outer_momentum_cools_down_with_the_base_version(redis_url, file_url, r):
    """The aggregator's momentum follows the run's cooldown at the round's base version: 0.9 up to
    version 1, then linear to 0 at version 3 (kills Aggregator._step_and_commit 5: the schedule read
    at no version)."""
    harness.init(redis_url, file_url, cooldown_from=1, cooldown_to=3, task_options={"num_samples": 400})
    agg = harness.aggregator(redis_url, file_url, max_rounds=3)
    w = harness.worker(redis_url, file_url, "w0", max_rounds=3)
    assert agg.result() == 3 and w.result() == 3
    momenta = [float(f["outer_momentum"]) for _, f in r.xrange(keys.versions(RUN))]
    assert momenta == pytest.approx([0.9, 0.9, 0.45])


def test_each_version_records_its_loss_units_and_timings(redis_url, file_url, r, caplog):
    """The versions stream's stats, as status, the monitor and the benchmarks read them (kills
    Aggregator._step_and_commit 135, 147, 148, 151-158: the mean loss, the durations and the units
    count miscomputed or filed under other names)."""
    caplog.set_level(logging.INFO, logger="aggregator.aggregator")
    harness.init(redis_url, file_url, min_workers=2, task_options={"num_samples": 400})
    agg = harness.aggregator(redis_url, file_url, max_rounds=2)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=2) for i in range(2)]
    assert agg.result() == 2 and [w.result() for w in ws] == [2, 2]
    said = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("committed version")]
    assert len(said) == 2 and all(   # and the log line (kills _step_and_commit 207-209, 216)
        re.fullmatch(rf"committed version {i}: 2 workers, loss \d+\.\d+, \d+ bytes, round \d+\.\d+s", m)
        for i, m in enumerate(said, 1)), said
    for _, v in r.xrange(keys.versions(RUN)):
        anns = [Announcement.from_fields(f)
                for e in v["entries"].split(",") for _, f in r.xrange(keys.deltas(RUN), e, e)]
        assert float(v["loss"]) == pytest.approx(sum(a.loss for a in anns) / 2, abs=1e-6)
        assert v["units"] == str(sum(len(a.units) for a in anns)) == "10"
        for name in ("duration_s", "reduce_s", "aggregate_s"):
            assert 0 <= float(v[name]) < 60, (name, v[name])


def test_a_holder_whose_lock_is_taken_while_it_collects_goes_back_to_standby_saying_why(redis_url, file_url, r,
                                                                                       caplog):
    """The round waits for a second worker; meanwhile another aggregator's token replaces ours. The
    holder notices at its next poll of the collect (a 200 ms block here), long before its next renewal
    (a third of the 60 s TTL), leaves the round and says so (a wiped lock was once noticed only at the
    renewal: a round sat on a run that was gone, or already recovered, for up to 10 s)."""
    caplog.set_level(logging.WARNING, logger="aggregator.aggregator")
    harness.init(redis_url, file_url, min_workers=2, task_options={"num_samples": 400})
    agg = harness.aggregator(redis_url, file_url, lock_ttl_s=60)
    w0 = harness.worker(redis_url, file_url, "w0")
    try:
        harness.wait_for_field(r, keys.round_state(RUN), "accepted", "1")
        r.set(keys.lock(RUN), "999:thief", px=600_000)
        want = "the round lock is no longer ours (token 1); back to standby"
        deadline = time.monotonic() + 15   # the renewal comes at 20 s: only the poll can pass this
        while want not in [rec.getMessage() for rec in caplog.records] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert want in [rec.getMessage() for rec in caplog.records]
        assert agg.is_alive() and r.get(keys.lock(RUN)) == "999:thief", "a standby now, not the holder"
    finally:
        w0.service.stop()
        agg.service.stop()


def test_a_token_budget_stops_the_run_once_the_committed_tokens_reach_it(redis_url, file_url, r):
    """Kills Aggregator._check_budget 1-8: the committed tokens not summed from the versions stream.
    The tiny task's rounds train 5 steps x 8 samples of 1 token: 40 tokens a version."""
    harness.init(redis_url, file_url, max_tokens=100, task_options={"num_samples": 400})
    agg = harness.aggregator(redis_url, file_url)
    w0 = harness.worker(redis_url, file_url, "w0")
    assert agg.result() == 3, "40, 80, then 120 >= 100 tokens: the run stops"
    assert w0.result() in (3, 4), "the worker exits too (after a round it began before the stop, if any)"
    assert [f["tokens"] for _, f in r.xrange(keys.versions(RUN))] == ["40", "40", "40"]
    assert r.hget(keys.control(RUN), "reason") == "token budget reached: 120 tokens of max_tokens 100"
