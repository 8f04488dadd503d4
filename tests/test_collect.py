"""The round's quorum rule, its operator text, the checks of one announcement and the outlier rule,
each called directly (against the real redis-server where they read or write Redis).

The end-to-end tests run these too, but assert little of their output: mutation testing
(docs/mutation.md) found the `waiting` text, the round state hash and the exact bounds of the
checks and of the outlier rule unpinned. Each test names the mutants of aggregator/collect.py it kills.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest

from aggregator.collect import Round, check, collect, is_closed, live_workers, outliers, reject, take, waiting_for
from diloco import control, keys, runs
from diloco.config import RunConfig
from diloco.errors import LockLost
from diloco.messages import Announcement, Head
from diloco.shards import max_shard_object_bytes
from diloco.units import Leases, UnitPlan, plan_for, units_per_round
from tests import harness

CFG = RunConfig(run="t", min_workers=2, round_timeout_s=10.5, codec="fp32", sync_every=5)
HEAD = Head(version=3, weights="w", weights_digest="a", momentum="m", momentum_digest="b", token=1,
            committed_ms=1000, deltas_since="0-0")
DEADLINE = 1000 + 10500
CTL = "`diloco control --run t set min_workers=N`"


def rnd(accepted: tuple[str, ...] = (), answered: tuple[str, ...] = (), norms: dict[str, float] | None = None) -> Round:
    out = Round(head=HEAD, last_id="0-0")
    for w in accepted:
        out.accepted[w] = (f"1-{len(out.accepted)}", ann(worker=w, norm=(norms or {}).get(w, 1.0)))
    out.answered = set(accepted) | set(answered)
    return out


def ann(**kw) -> Announcement:
    worker = kw.get("worker", "w0")
    fields = {"run": "t", "worker": worker, "nonce": "n", "version": 3, "codec": "fp32",
              "shards": (keys.delta_prefix("t", 3, worker) + "s0",), "sizes": (10,), "digest": ("0" * 64,),
              "samples": 40, "tokens": 40, "inner_steps": 5, "loss": 1.0, "norm": 1.0, **kw}
    return Announcement(**fields)


def live(*workers: str) -> dict[str, str | None]:
    return dict.fromkeys(workers, "training")


@pytest.mark.parametrize(("cfg", "r_", "live_", "now", "paused", "expected"), [
    # nobody live: only new workers can fill the quorum
    (CFG, rnd(), live(), 0, False,
     f"2 more workers (min_workers 2, 0 live): start workers or lower it with {CTL}"),
    (CFG, rnd(("w0",)), live("w0"), 0, False,
     f"1 more worker (min_workers 2, 1 live): start workers or lower it with {CTL}"),
    # live workers that have not answered can still fill it
    (CFG, rnd(), live("w0", "w1", "w2"), 0, False, "2 more deltas (min_workers 2; from w0, w1, w2)"),
    (CFG, rnd(("w0",)), live("w0", "w1"), 0, False, "1 more delta (min_workers 2; from w1)"),
    (dataclasses.replace(CFG, min_workers=1), rnd(), live(*(f"w{i}" for i in range(7))), 0, False,
     "1 more delta (min_workers 1; from w0, w1, w2, w3, w4)"),
    (CFG, rnd(("w0",)), live("w0"), 0, True,
     f"1 more worker (min_workers 2, 1 live): start workers or lower it with {CTL}; "
     "the run is paused (diloco control --run t resume)"),
    (CFG, rnd(), live("w0", "w1"), 0, True,
     "2 more deltas (min_workers 2; from w0, w1); the run is paused (diloco control --run t resume)"),
    # quorum reached: wait for the other live workers until the deadline, not at it
    (CFG, rnd(("w0", "w1")), live("w0", "w1", "w2"), DEADLINE - 1, False, "1 live workers (w2) until the deadline"),
    (CFG, rnd(("w0", "w1")), live(*(f"w{i}" for i in range(9))), 0, False,
     "7 live workers (w2, w3, w4, w5, w6) until the deadline"),
    (CFG, rnd(("w0", "w1")), live("w0", "w1", "w2"), DEADLINE, False, ""),
    (CFG, rnd(("w0", "w1"), answered=("w2",)), live("w0", "w1", "w2"), 0, False, ""),
    (CFG, rnd(("w0", "w1")), live("w0", "w1"), 0, True, ""),   # paused, but the round is complete
])
def test_waiting_for_says_exactly_what_keeps_the_round_open(cfg, r_, live_, now, paused, expected):
    """Kills the mutants of `waiting_for` that change its text, its plurals, the five names it
    lists, the deadline (`round_timeout_s` in ms, `<` at the deadline) or the paused suffix."""
    assert waiting_for(cfg, r_, live_, now, paused=paused) == expected


def test_is_closed_publishes_the_round_state_and_reads_only_live_workers(r, caplog):
    """Kills the mutants of `is_closed` and `live_workers` that change a field of the round state
    hash, the phase, the deadline, or count a registered worker whose heartbeat key is gone, and
    `is_closed` 26-33 (the log line saying what the round waits for, once per change)."""
    caplog.set_level(logging.INFO, logger="aggregator.collect")
    cfg = dataclasses.replace(CFG, min_workers=1)
    r.sadd(keys.workers("t"), "w0", "w1", "w2")
    r.set(keys.worker_alive("t", "w0"), "1")
    r.set(keys.worker_alive("t", "w1"), "1")
    r.hset(keys.worker_stats("t", "w1"), "state", "paused")
    assert live_workers(r, "t") == {"w0": None, "w1": "paused"}
    assert live_workers(r, "nobody") == {}
    head = dataclasses.replace(HEAD, committed_ms=int(r.time()[0]) * 1000)   # the deadline is far away
    open_round = Round(head=head, last_id="0-0")
    open_round.rejected = 4
    assert not is_closed(r, cfg, open_round, control.RUNNING)
    assert open_round.waiting == "1 more delta (min_workers 1; from w0, w1)"
    assert r.hgetall(keys.round_state("t")) == {
        "version": "3", "phase": "collecting", "accepted": "0", "answered": "0", "live": "2", "min_workers": "1",
        "deadline_ms": str(head.committed_ms + 10500), "waiting": open_round.waiting, "rejected": "4"}
    assert not is_closed(r, cfg, open_round, control.PAUSED)
    assert r.hget(keys.round_state("t"), "waiting").endswith("; the run is paused (diloco control --run t resume)")
    done = Round(head=head, last_id="0-0", accepted={"w0": ("1-0", ann())}, answered={"w0", "w1"})
    assert is_closed(r, cfg, done, control.RUNNING)
    assert done.waiting == ""
    state = r.hgetall(keys.round_state("t"))
    assert (state["phase"], state["accepted"], state["answered"], state["waiting"]) == ("reducing", "1", "2", "")
    assert caplog.messages == [
        "round for version 3 waits for 1 more delta (min_workers 1; from w0, w1)",
        "round for version 3 waits for 1 more delta (min_workers 1; from w0, w1); the run is paused "
        "(diloco control --run t resume)"], "said once per change, not at every poll"


def test_waiting_for_a_running_run_by_default():
    """Kills `waiting_for` 1 (`paused` True by default)."""
    assert waiting_for(CFG, rnd(("w0",)), live("w0"), 0) == (
        f"1 more worker (min_workers 2, 1 live): start workers or lower it with {CTL}")


def test_check_gives_each_reason_and_accepts_exactly_up_to_the_limits():
    """Kills the mutants of `check` that change a reason, the late/ahead comparisons, the prefix
    test (`..` in a key included) or the size limit (a shard of exactly the limit is accepted)."""
    r_ = rnd(("w9",))
    limit = max_shard_object_bytes(CFG.shard_bytes)
    prefix = keys.delta_prefix("t", 3, "w0")
    assert check(ann(sizes=(limit,)), CFG, r_) is None
    assert check(ann(run="u"), CFG, r_) == "announcement is for run 'u'"
    assert check(ann(version=2), CFG, r_) == "late: trained on version 2, the round is for version 3"
    assert check(ann(version=4), CFG, r_) == "base version 4 is ahead of the committed version 3"
    assert check(ann(worker="w9", shards=(keys.delta_prefix("t", 3, "w9") + "s",)), CFG, r_) == (
        "duplicate: worker already announced for version 3 (the first counts)")
    assert check(ann(codec="int8"), CFG, r_) == "codec 'int8' is not the run's codec 'fp32'"
    assert check(ann(inner_steps=4), CFG, r_) == "trained 4 inner steps, the run's sync_every is 5"
    other = keys.delta_prefix("t", 3, "w1") + "s0"
    assert check(ann(shards=(prefix + "s0", other), sizes=(1, 1), digest=("x", "y")), CFG, r_) == (
        f"shard key {other!r} is outside the worker's prefix {prefix!r}")
    assert check(ann(shards=(prefix + "../w1/s0",)), CFG, r_) == (
        f"shard key {prefix + '../w1/s0'!r} is outside the worker's prefix {prefix!r}")
    long = "x" * 300
    assert check(ann(shards=(long,)), CFG, r_) == f"shard key {long[:120]!r} is outside the worker's prefix {prefix!r}"
    assert check(ann(sizes=(limit + 1, 5), shards=(prefix + "a", prefix + "b"), digest=("x", "y")), CFG, r_) == (
        f"a shard of {limit + 1} bytes exceeds the run's limit of {limit} bytes")


@pytest.mark.parametrize(("factor", "norms", "expected"), [
    (3.0, {"a": 1.0, "b": 1.0}, []),                                   # two deltas: no majority
    (0.0, {"a": 1.0, "b": 1.0, "c": 100.0}, []),                       # rule off
    (-1.0, {"a": 1.0, "b": 1.0, "c": 100.0}, []),
    (3.0, {"a": 0.0, "b": 0.0, "c": 5.0}, []),                         # median 0: nothing is normal
    (3.0, {"c": 10.0, "a": 1.0, "b": 1.0},
     [("c", "outlier: delta norm 10 is 10.0x the round's median 1 (limit 3.0x)")]),
    (3.0, {"a": 1.0, "b": 2.0, "c": 4.0, "d": 9.0}, []),               # median (2 + 4) / 2; 9 = 3x is allowed
    (3.0, {"a": 1.0, "b": 2.0, "c": 4.0, "d": 9.5},
     [("d", "outlier: delta norm 9.5 is 3.2x the round's median 3 (limit 3.0x)")]),
    (1.0, {"a": 1.0, "b": 1.0, "c": 2.0},                               # a factor of 1 is allowed
     [("c", "outlier: delta norm 2 is 2.0x the round's median 1 (limit 1.0x)")]),
    (2.0, {"a": 1.0, "b": 2.0, "c": 10.0},                              # odd count: the middle one
     [("c", "outlier: delta norm 10 is 5.0x the round's median 2 (limit 2.0x)")]),
    (2.0, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 8.0, "e": 9.0},
     [("d", "outlier: delta norm 8 is 2.7x the round's median 3 (limit 2.0x)"),
      ("e", "outlier: delta norm 9 is 3.0x the round's median 3 (limit 2.0x)")]),
    (2.0, {"z": 9.0, "y": 8.0, "a": 1.0, "b": 1.0, "c": 1.0},
     [("y", "outlier: delta norm 8 is 8.0x the round's median 1 (limit 2.0x)"),
      ("z", "outlier: delta norm 9 is 9.0x the round's median 1 (limit 2.0x)")]),
])
def test_outliers_from_three_deltas_on_against_the_median(factor, norms, expected):
    """Kills the mutants of `outliers` that change the three-delta minimum, the median of an odd or
    even count (3, 9, 12: `factor <= 1` as off, the even formula for all, `// 3`), `>` against
    `factor` times it, the order of the result, or its reason."""
    assert outliers(rnd(tuple(norms), norms=norms), factor) == expected


def test_reject_records_the_reason_cut_at_500_characters_once_per_entry(r):
    """Kills `reject` 19 (a reason cut at 501 characters) and the mutants that change a field of the
    rejection (the entry, the worker, the version) or count one entry twice."""
    reason = "r" * 499 + "ab" + "c" * 100
    reject(r, "t", "w3", reason, "5-0", 7)
    reject(r, "t", "w3", reason, "5-0", 7)   # the same entry again: recorded once
    (_, fields), = r.xrange(keys.rejections("t"))
    assert fields == {"worker": "w3", "entry": "5-0", "version": "7", "reason": "r" * 499 + "a"}
    assert r.hget(keys.rejected_counts("t"), "w3") == "1"


def test_take_rejects_a_malformed_entry_under_its_name_cut_to_64_characters_and_its_raw_version(r):
    """Kills `take` 4, 6, 9 (an entry without a worker rejected under another name than "?"), 10 (a
    name cut at 65 characters) and 18 (the entry's own version left out of the rejection)."""
    r_ = rnd()
    plan = UnitPlan("d", 400, 8, 0)
    take(r, CFG, plan, r_, "2-0", {"version": "9", "run": "t"})
    take(r, CFG, plan, r_, "2-1", {"worker": "w" * 100})
    got = [fields for _, fields in r.xrange(keys.rejections("t"))]
    assert [(f["worker"], f["entry"], f["version"]) for f in got] == [("?", "2-0", "9"), ("w" * 64, "2-1", "?")]
    assert all(f["reason"].startswith("malformed announcement: ") for f in got)
    assert r_.rejected == 2 and r_.accepted == {} and r_.answered == set()
    assert r.hgetall(keys.rejected_counts("t")) == {"?": "1", "w" * 64: "1"}


def test_take_rejects_a_kicked_workers_delta_and_counts_only_this_rounds_rejections_as_answers(r):
    """Kills `take` 47, 53-55 (an announcement already on its way when its worker was kicked is
    accepted, or rejected with another reason), 72 (the rejection without its version), 79-81 (the
    round's count of rejections) and 82, 83 (a late delta counted as this round's answer)."""
    r_ = rnd()
    plan = UnitPlan("d", 400, 8, 0)
    r.set(keys.worker_kicked("t", "w5"), "1")
    take(r, CFG, plan, r_, "3-0", ann(worker="w5").to_fields())
    take(r, CFG, plan, r_, "3-1", ann(worker="w6", version=2,
                                      shards=(keys.delta_prefix("t", 2, "w6") + "s0",)).to_fields())
    got = [(f["worker"], f["entry"], f["version"], f["reason"]) for _, f in r.xrange(keys.rejections("t"))]
    assert got == [("w5", "3-0", "3", "the worker was kicked by an operator"),
                   ("w6", "3-1", "2", "late: trained on version 2, the round is for version 3")]
    assert r_.rejected == 2 and r_.accepted == {}
    assert r_.answered == {"w5"}, "a late delta is no answer to this round; a rejected one of this round is"


def _accepted_round(r, redis_url, file_url):
    """A real run (tests.harness), a round at its head and w0's announcement of units it holds."""
    cfg = harness.init(redis_url, file_url)
    plan = plan_for(r, cfg)
    held = Leases(r, "t", plan, "w0", lease_ms=60_000).claim(units_per_round(cfg), threading.Event())
    head = runs.read_head(r, "t")
    good = Announcement(run="t", worker="w0", nonce="n", version=head.version, codec=cfg.codec,
                        shards=(keys.delta_shard("t", head.version, "w0", "n", 0),), sizes=(10,),
                        digest=("0" * 64,), samples=40, tokens=40, inner_steps=cfg.sync_every, loss=1.0,
                        units=tuple(held))
    return cfg, plan, Round(head=head, last_id="0-0"), good


def test_take_accepts_a_good_delta_without_a_reduce_and_rejects_it_when_the_reduce_does(redis_url, file_url, r):
    """Kills `take` 87 (the reduce called when there is none) and 106 (a rejection by the reduce
    setting the round's count to 1 instead of adding one)."""
    cfg, plan, rnd_, good = _accepted_round(r, redis_url, file_url)
    take(r, cfg, plan, rnd_, "4-0", good.to_fields())
    assert rnd_.accepted == {"w0": ("4-0", good)} and rnd_.answered == {"w0"} and rnd_.rejected == 0
    again = Round(head=rnd_.head, last_id="0-0", rejected=5)
    take(r, cfg, plan, again, "4-0", good.to_fields(), on_accept=lambda entry_id, ann: "BadShard: torn")
    assert again.accepted == {} and again.answered == {"w0"} and again.rejected == 6
    (_, fields), = r.xrange(keys.rejections("t"))
    assert (fields["worker"], fields["entry"], fields["reason"]) == ("w0", "4-0", "BadShard: torn")


def test_collect_polls_then_stops_for_a_lost_lock_or_a_stopped_run_before_closing_the_round(
        redis_url, file_url, r):
    """Kills `collect` 4 (`on_poll` not called), 6, 7 (a lost lock ignored, or LockLost without its
    message) and 8, 14 (a stopped run's round closed and committed instead of given up). The round
    here could close at once: min_workers 1, w0's delta accepted, nobody else live."""
    cfg, plan, rnd_, good = _accepted_round(r, redis_url, file_url)
    cfg = dataclasses.replace(cfg, min_workers=1)
    rnd_.accepted["w0"] = ("4-0", good)
    rnd_.answered.add("w0")
    stop, lost, polls = threading.Event(), threading.Event(), []

    def go() -> bool:
        return collect(r, cfg, plan, rnd_, block_ms=50, stop=stop, lock_lost=lost, on_poll=lambda: polls.append(1))

    lost.set()
    with pytest.raises(LockLost, match=r"^lock lost while collecting version 0$"):
        go()
    assert polls == [1]
    lost.clear()
    control.set_state(r, "t", control.STOPPED, "tester")
    assert go() is False
    control.set_state(r, "t", control.RUNNING, "tester")
    assert go() is True and polls == [1, 1, 1]
    stop.set()
    assert go() is False and polls == [1, 1, 1], "a stopped service does not poll"


def test_collect_publishes_that_the_run_is_paused(redis_url, file_url, r):
    """Kills `collect` 18 (the round state written without the run's state: no paused suffix)."""
    cfg, plan, rnd_, _ = _accepted_round(r, redis_url, file_url)
    cfg = dataclasses.replace(cfg, min_workers=2)   # one more delta needed: the round stays open
    control.set_state(r, "t", control.PAUSED, "tester")
    lost, polls = threading.Event(), []

    def poll() -> None:   # the second poll ends the collection, after the first one published the state
        polls.append(1)
        if len(polls) == 2:
            lost.set()

    with pytest.raises(LockLost):
        collect(r, cfg, plan, rnd_, block_ms=20, stop=threading.Event(), lock_lost=lost, on_poll=poll)
    assert r.hget(keys.round_state("t"), "waiting") == (
        "2 more workers (min_workers 2, 0 live): start workers or lower it with "
        "`diloco control --run t set min_workers=N`; the run is paused (diloco control --run t resume)")


def test_collect_blocks_on_the_stream_between_polls_instead_of_spinning(redis_url, file_url, r):
    """Kills `collect` 26, 29 (XREAD without `block`: an open round polls Redis in a busy loop).
    With 100 ms blocks, 0.5 s of an open round is at most about 6 polls; a spin makes hundreds."""
    cfg, plan, rnd_, _ = _accepted_round(r, redis_url, file_url)
    lost, polls, t0 = threading.Event(), [], time.monotonic()

    def poll() -> None:
        polls.append(1)
        if time.monotonic() - t0 > 0.5:
            lost.set()

    with pytest.raises(LockLost):
        collect(r, dataclasses.replace(cfg, min_workers=2), plan, rnd_, block_ms=100, stop=threading.Event(),
                lock_lost=lost, on_poll=poll)
    assert 2 <= len(polls) <= 10, len(polls)


# --- asynchronous mode ---------------------------------------------------------------------------

def _async_round(r, redis_url, file_url, grace_s: float):
    cfg = harness.init(redis_url, file_url, mode="async", grace_s=grace_s, task_options={"num_samples": 400})
    plan = plan_for(r, cfg)
    epoch = int(r.hget(keys.units_meta("t", plan.dataset), "epoch_lo") or 0)
    want = units_per_round(cfg)

    def good(i: int) -> dict:
        return Announcement(run="t", worker=f"w{i}", nonce="n", version=0, codec=cfg.codec,
                            shards=(keys.delta_shard("t", 0, f"w{i}", "n", 0),), sizes=(10,), digest=("0" * 64,),
                            samples=40, tokens=40, inner_steps=cfg.sync_every, loss=1.0,
                            units=tuple((epoch, b) for b in range(i * want, (i + 1) * want))).to_fields()
    return cfg, plan, good


def test_a_grace_window_takes_its_edge_leaves_the_next_ms_and_reads_past_a_full_reply(redis_url, file_url, r):
    """Window [1000, 2000] ms: an entry at 2000 is in it, one at 2001 opens the next version, and a
    delta after 100 other entries (one XREAD's worth) is still taken. Kills `window_end_ms` 9 (the
    window 1 ms longer per second), `_closes_before` 12 (the edge left out), `collect_async` 24 (a
    1 s window closed after its first read), 77, 78, 96, 97 (closed after a full reply of 100)."""
    cfg, plan, good = _async_round(r, redis_url, file_url, grace_s=1.0)
    stream = keys.deltas("t")
    r.xadd(stream, good(0), id="1000-0")
    for i in range(100):   # malformed: rejected, but they fill the first reply
        r.xadd(stream, {"kind": "delta", "worker": f"m{i}"}, id=f"{1001 + i}-0")
    r.xadd(stream, good(1), id="1500-0")
    r.xadd(stream, good(2), id="2000-0")
    r.xadd(stream, good(3), id="2001-0")
    # w0 was read in an earlier poll: the window is open (and, by the clock, past) when a full reply
    # of 100 entries comes, which must not end it
    first = Round(head=runs.read_head(r, "t"), last_id="1000-0")
    take(r, cfg, plan, first, "1000-0", good(0))
    assert collect(r, cfg, plan, first, block_ms=50, stop=threading.Event())
    assert list(first.accepted) == ["w0", "w1", "w2"] and first.last_id == "2000-0" and first.rejected == 100
    second = Round(head=runs.read_head(r, "t"), last_id=first.last_id)
    assert collect(r, cfg, plan, second, block_ms=50, stop=threading.Event())
    assert list(second.accepted) == ["w3"] and second.last_id == "2001-0"


def test_an_open_grace_window_polls_publishes_its_end_blocks_and_gives_up_for_a_lost_lock_or_a_stopped_run(
        redis_url, file_url, r):
    """Kills `collect_async` 4, 5, 6 (the poll's sign of life or the lost lock dropped), 15 (a stopped
    run's version closed instead of given up), 35 and `_publish_async` 2-40 (the round state's fields,
    before a delta and in a window) and
    40, 42, 60, 63 (XREAD without a block while the window is open: a busy loop)."""
    cfg, plan, good = _async_round(r, redis_url, file_url, grace_s=600.0)
    gone = threading.Event()   # before any delta: it waits for one, with no window end yet
    with pytest.raises(LockLost):
        collect(r, cfg, plan, Round(head=runs.read_head(r, "t"), last_id="0-0"), block_ms=20, stop=threading.Event(),
                lock_lost=gone, on_poll=lambda: gone.set() if r.exists(keys.round_state("t")) else None)
    assert (r.hget(keys.round_state("t"), "waiting"), r.hget(keys.round_state("t"), "deadline_ms")) == ("a delta", "0")
    entry = r.xadd(keys.deltas("t"), good(0))
    end = int(entry.split("-")[0]) + 600_000
    r.sadd(keys.workers("t"), "w1")   # a live worker not in the window: it stays open
    r.set(keys.worker_alive("t", "w1"), "1", ex=600)
    lost, polls, t0 = threading.Event(), [], time.monotonic()

    def go(on_poll) -> bool:
        rnd_ = Round(head=runs.read_head(r, "t"), last_id="0-0")
        return collect(r, cfg, plan, rnd_, block_ms=100, stop=threading.Event(), lock_lost=lost, on_poll=on_poll)

    def poll() -> None:
        polls.append(1)
        if time.monotonic() - t0 > 0.5:
            lost.set()

    with pytest.raises(LockLost, match=r"^lock lost while collecting version 0$"):
        go(poll)
    assert 2 <= len(polls) <= 10, len(polls)
    assert r.hgetall(keys.round_state("t")) == {
        "version": "0", "phase": "collecting", "accepted": "1", "answered": "1", "live": "1", "min_workers": "1",
        "deadline_ms": str(end), "waiting": f"the grace window (until {end} ms)", "rejected": "0"}
    lost.clear()
    control.set_state(r, "t", control.STOPPED, "tester")
    assert go(None) is False
