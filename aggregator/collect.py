"""Collect one round's announcements until the quorum rule closes it.

The round for version v closes when at least `min_workers` deltas are accepted and either every
live worker has answered or the deadline (commit time of v + round_timeout_s, on the Redis clock)
has passed. Every announcement that cannot count is rejected with a reason, in the rejections
stream and the per-worker counter, and never stops the service.

In asynchronous mode (`mode=async`) there is no quorum: the version closes on its first accepted
delta (`grace_s` 0), or `grace_s` after it, taking every delta announced in that window (by the
stream entry's Redis timestamp) and leaving later ones to the next version, or as soon as every live
worker has a delta in the window. A delta counts if its base version is at most `max_staleness`
behind the head.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from aggregator.units_check import units_problem
from diloco import control, dylu, keys, runs
from diloco.config import RunConfig
from diloco.connect import server_time_ms
from diloco.errors import BadMessage, LockLost
from diloco.messages import Announcement, Head
from diloco.scripts import Scripts
from diloco.shards import max_shard_object_bytes
from diloco.units import UnitPlan

log = logging.getLogger(__name__)


@dataclass
class Round:
    head: Head
    last_id: str
    accepted: dict[str, tuple[str, Announcement]] = field(default_factory=dict)  # worker -> (id, ann)
    answered: set[str] = field(default_factory=set)    # workers that announced, accepted or not
    rejected: int = 0
    waiting: str = ""    # why the round is still open, as last published
    lane: str = ""       # the lane whose round this is (diloco.keys.lane); "" = the run itself

    @property
    def version(self) -> int:
        return self.head.version


def reject(r: redis.Redis, run: str, worker: str, reason: str, entry_id: str, version: int | str) -> None:
    if Scripts(r).reject(run, entry_id, worker, {"worker": worker, "entry": entry_id, "version": str(version),
                                                 "reason": reason[:500]}):
        log.warning("rejected announcement %s from %s: %s", entry_id, worker, reason)


def check(ann: Announcement, cfg: RunConfig, rnd: Round) -> str | None:
    """The reason `ann` cannot count in this round, or None if it can."""
    if ann.run != cfg.run:
        return f"announcement is for run {ann.run!r}"
    if (reason := _fragment_problem(ann, cfg, rnd)) is not None:
        return reason
    if cfg.is_async:
        if rnd.version - ann.version > cfg.max_staleness:
            return (f"stale: trained on version {ann.version}, the head is version {rnd.version}: staleness "
                    f"{rnd.version - ann.version} exceeds max_staleness {cfg.max_staleness}")
    elif ann.version < rnd.version:
        return f"late: trained on version {ann.version}, the round is for version {rnd.version}"
    if ann.version > rnd.version:
        return f"base version {ann.version} is ahead of the committed version {rnd.version}"
    if ann.worker in rnd.accepted:
        return f"duplicate: worker already announced for version {ann.version} (the first counts)"
    if ann.codec != cfg.codec:
        return f"codec {ann.codec!r} is not the run's codec {cfg.codec!r}"
    if (reason := dylu.allowed_steps(cfg, ann.inner_steps)) is not None:
        return reason
    prefix = keys.delta_prefix(_lane(cfg, rnd), ann.version, ann.worker)
    outside = [s for s in ann.shards if not s.startswith(prefix) or ".." in s]
    if outside:
        return f"shard key {outside[0][:120]!r} is outside the worker's prefix {prefix!r}"
    limit = max_shard_object_bytes(cfg.shard_bytes)
    if any(size > limit for size in ann.sizes):
        return f"a shard of {max(ann.sizes)} bytes exceeds the run's limit of {limit} bytes"
    return None


def _lane(cfg: RunConfig, rnd: Round) -> str:
    return rnd.lane or cfg.run


def _fragment_problem(ann: Announcement, cfg: RunConfig, rnd: Round) -> str | None:
    fragment = keys.split_lane(_lane(cfg, rnd))[1] or 0
    if not 0 <= ann.fragment < cfg.num_fragments:
        return (f"fragment {ann.fragment} does not exist: run {cfg.run!r} has {cfg.num_fragments} "
                f"(0-{cfg.num_fragments - 1})")
    if ann.fragment != fragment:
        return f"announced for fragment {ann.fragment} on the deltas stream of fragment {fragment}"
    return None


def take(r: redis.Redis, cfg: RunConfig, plan: UnitPlan, rnd: Round, entry_id: str, fields: dict[str, str],
         on_accept: Callable[[str, Announcement], str | None] | None = None) -> None:
    """Accept or reject one stream entry into the round; `on_accept` (the reduce) may still reject it."""
    worker = str(fields.get("worker", "?"))[:64]
    try:
        ann = Announcement.from_fields(fields)
    except BadMessage as e:
        reject(r, _lane(cfg, rnd), worker, f"malformed announcement: {e}", entry_id, fields.get("version", "?"))
        rnd.rejected += 1
        return
    if ann.worker in rnd.accepted and rnd.accepted[ann.worker][1] == ann:
        return  # the same announcement again (a retried XADD that had landed): nothing to count
    reason = check(ann, cfg, rnd)
    if reason is None and r.exists(keys.worker_kicked(cfg.run, ann.worker)):
        reason = "the worker was kicked by an operator"
    if reason is None:
        reason = units_problem(r, cfg, plan, ann)
    if reason is not None:
        reject(r, _lane(cfg, rnd), ann.worker, reason, entry_id, ann.version)
        rnd.rejected += 1
        if ann.version == rnd.version:
            rnd.answered.add(ann.worker)
        return
    rnd.answered.add(ann.worker)
    reason = on_accept(entry_id, ann) if on_accept is not None else None
    if reason is not None:
        reject(r, _lane(cfg, rnd), ann.worker, reason, entry_id, ann.version)
        rnd.rejected += 1
        return
    rnd.accepted[ann.worker] = (entry_id, ann)


def _alive(rnd: Round, lock_lost: threading.Event | None, on_poll: Callable[[], None] | None) -> None:
    """Each poll of a collect: a sign of life for the stall watchdog, and LockLost as soon as the lock is gone."""
    if on_poll is not None:
        on_poll()
    if lock_lost is not None and lock_lost.is_set():
        raise LockLost(f"lock lost while collecting version {rnd.version}")


def live_workers(r: redis.Redis, run: str) -> dict[str, str | None]:
    """Each live worker's heartbeat state, in one pipelined read."""
    return runs.live_worker_stat(r, run, "state")


def waiting_for(cfg: RunConfig, rnd: Round, live: dict[str, str | None], now_ms: int,
                paused: bool = False) -> str:
    """Why the round cannot close yet, as an operator reads it ("" once it can)."""
    deadline = rnd.head.committed_ms + int(cfg.round_timeout_s * 1000)
    missing = sorted(w for w in live if w not in rnd.answered)
    short = cfg.min_workers - len(rnd.accepted)
    if short > 0:
        # Workers that are live and have not answered yet can still fill the quorum; beyond them only
        # new workers (or a lower min_workers) can.
        more = short - len(missing)
        if more > 0:
            need = (f"{more} more worker{'s' * (more > 1)} (min_workers {cfg.min_workers}, {len(live)} live): "
                    f"start workers or lower it with `diloco control --run {cfg.run} set min_workers=N`")
        else:
            need = (f"{short} more delta{'s' * (short > 1)} (min_workers {cfg.min_workers}; "
                    f"from {', '.join(missing[:5])})")
        return f"{need}; the run is paused (diloco control --run {cfg.run} resume)" if paused else need
    if missing and now_ms < deadline:
        return f"{len(missing)} live workers ({', '.join(missing[:5])}) until the deadline"
    return ""


def is_closed(r: redis.Redis, cfg: RunConfig, rnd: Round, state: str) -> bool:
    """Apply the quorum rule, and publish why the round is still open (status and monitor read it)."""
    live = live_workers(r, cfg.run)
    now = server_time_ms(r)
    deadline = rnd.head.committed_ms + int(cfg.round_timeout_s * 1000)
    waiting = waiting_for(cfg, rnd, live, now, paused=state == control.PAUSED)  # `state`: the run's, this poll
    if waiting != rnd.waiting:  # said once when it changes, not at every poll
        if waiting:
            log.info("round for version %d waits for %s", rnd.version, waiting)
        rnd.waiting = waiting
    r.hset(keys.round_state(_lane(cfg, rnd)), mapping={
        "version": str(rnd.version), "phase": "collecting" if waiting else "reducing",
        "accepted": str(len(rnd.accepted)), "answered": str(len(rnd.answered)), "live": str(len(live)),
        "min_workers": str(cfg.min_workers), "deadline_ms": str(deadline), "waiting": waiting,
        "rejected": str(rnd.rejected),
    })
    return not waiting


def outliers(rnd: Round, factor: float) -> list[tuple[str, str]]:
    """(worker, reason) for each delta whose announced norm is `factor` times the round's median or more.

    A robust rule needs a majority to define normal, so it applies from three deltas on. The norm
    each worker announces is checked against the decoded delta during the reduce.
    """
    if factor <= 0 or len(rnd.accepted) < 3:
        return []
    norms = sorted(ann.norm for _, ann in rnd.accepted.values())
    median = norms[len(norms) // 2] if len(norms) % 2 else (norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2
    if median <= 0:
        return []
    return [(w, f"outlier: delta norm {ann.norm:.4g} is {ann.norm / median:.1f}x the round's median {median:.4g} "
                f"(limit {factor}x)")
            for w, (_, ann) in sorted(rnd.accepted.items()) if ann.norm > factor * median]


def _entry_ms(entry_id: str) -> int:
    """The Redis server time (ms) at which a stream entry was added: its id's first part."""
    return int(entry_id.split("-", 1)[0])


def window_end_ms(cfg: RunConfig, rnd: Round) -> int | None:
    """Async: the end of the grace window (the first accepted delta's time + grace_s), None before one."""
    if not rnd.accepted:
        return None
    first_id, _ = next(iter(rnd.accepted.values()))
    return _entry_ms(first_id) + int(cfg.grace_s * 1000)


def _closes_before(cfg: RunConfig, rnd: Round, entry_id: str) -> bool:
    """Async: whether the version closes before the unread entry `entry_id`."""
    end = window_end_ms(cfg, rnd)
    if end is None:
        return False
    # grace_s 0: one version per delta, even for deltas added in the same millisecond
    return cfg.grace_s == 0 or _entry_ms(entry_id) > end


def collect_async(r: redis.Redis, cfg: RunConfig, plan: UnitPlan, rnd: Round, *, block_ms: int,
                  stop: threading.Event, lock_lost: threading.Event | None = None,
                  on_poll: Callable[[], None] | None = None,
                  on_accept: Callable[[str, Announcement], str | None] | None = None) -> bool:
    """`collect` for mode=async: read announcements into `rnd` until its grace window closes (True).

    Entries are taken one at a time and an entry past the window is left unread (`rnd.last_id`
    stays before it), so the next version starts with it. XADD stamps ids with the server clock, so
    once the server time is past the window every entry inside it is in the stream: a last read then
    closes the version. The batch depends only on the stream, so a standby redoing it takes the same."""
    stream = keys.deltas(_lane(cfg, rnd))
    while not stop.is_set():
        _alive(rnd, lock_lost, on_poll)
        if control.state(r, cfg.run) == control.STOPPED:
            return False
        end = window_end_ms(cfg, rnd)
        if end is not None and cfg.grace_s == 0:
            return True
        now = server_time_ms(r)
        past = end is not None and now > end
        live = live_workers(r, cfg.run)   # one read a poll: the round state and the early close use it
        _publish_async(r, cfg, rnd, end, live)
        # Past the window: one read without blocking takes what is left in it.
        block = None if past else block_ms if end is None else max(1, min(block_ms, end - now + 1))
        reply = r.xread({stream: rnd.last_id}, block=block, count=100)
        read = 0
        for _, entries in reply or []:
            for entry_id, fields in entries:
                if _closes_before(cfg, rnd, entry_id):
                    return True
                rnd.last_id = entry_id
                read += 1
                take(r, cfg, plan, rnd, entry_id, fields, on_accept)
        if past and read < 100 and rnd.accepted:
            return True
        if rnd.accepted and everyone_answered(live, rnd):
            return True
    return False


def everyone_answered(live: dict[str, str | None], rnd: Round) -> bool:
    """Async: a grace window closes early once every live worker has a delta in it: none is left to
    wait for (equal workers then take sync rounds' steps without a window's wait)."""
    return bool(live) and set(live) <= rnd.answered   # no live worker: the window runs its time


def _publish_async(r: redis.Redis, cfg: RunConfig, rnd: Round, end: int | None,
                   live: dict[str, str | None]) -> None:
    waiting = "a delta" if end is None else f"the grace window (until {end} ms)"
    r.hset(keys.round_state(_lane(cfg, rnd)), mapping={
        "version": str(rnd.version), "phase": "collecting", "accepted": str(len(rnd.accepted)),
        "answered": str(len(rnd.answered)), "live": str(len(live)),
        "min_workers": "1", "deadline_ms": str(end or 0),
        "waiting": waiting, "rejected": str(rnd.rejected),
    })


def collect(r: redis.Redis, cfg: RunConfig, plan: UnitPlan, rnd: Round, *, block_ms: int,
            stop: threading.Event, lock_lost: threading.Event | None = None,
            on_poll: Callable[[], None] | None = None,
            on_accept: Callable[[str, Announcement], str | None] | None = None) -> bool:
    """Read announcements into `rnd` until the round closes (True), or stop is set or an operator
    stopped the run (False). Raises LockLost as soon as `lock_lost` is set: a holder that lost its
    lock (a wipe, a stall) must not sit on a round it can no longer commit."""
    if cfg.is_async:
        return collect_async(r, cfg, plan, rnd, block_ms=block_ms, stop=stop, lock_lost=lock_lost,
                             on_poll=on_poll, on_accept=on_accept)
    stream = keys.deltas(_lane(cfg, rnd))
    while not stop.is_set():
        _alive(rnd, lock_lost, on_poll)
        state = control.state(r, cfg.run)
        if state == control.STOPPED:
            return False
        if is_closed(r, cfg, rnd, state):
            return True
        reply = r.xread({stream: rnd.last_id}, block=block_ms, count=1000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                rnd.last_id = entry_id
                take(r, cfg, plan, rnd, entry_id, fields, on_accept)
    return False
