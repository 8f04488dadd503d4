"""The aggregator: take the round lock, then for each version collect, reduce, step and commit.

Stateless: everything it needs (config, head, announcements, weights, momentum) is read from
Redis and the object store each round, so a standby or restarted aggregator carries on where a
dead one stopped. New objects carry the fencing token in their key; the commit script is the only
writer of the version pointer.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis

from aggregator.collect import Round, collect, outliers, reject
from aggregator.lock import RoundLock
from diloco import control, keys, model, outer, retention, runs, schedule, snapshot, stopping, units, update, weighting
from diloco.codecs import Codec, get_codec
from diloco.config import AggregatorSettings, RunConfig
from diloco.connect import OUTAGE_ERRORS, Outage, connect_redis, server_time_ms
from diloco.errors import ConfigError, DilocoError, LockLost, ObjectExists, RunNotFound, UnitConflict
from diloco.faults import crash_point
from diloco.messages import Announcement
from diloco.outer import outer_step_
from diloco.reduce import Reducer
from diloco.scripts import Scripts
from diloco.store import open_store, put_idempotent

log = logging.getLogger(__name__)


class Aggregator:
    """Serves one lane (diloco.keys): the run, or with streaming one fragment of it (`fragment`)."""

    def __init__(self, settings: AggregatorSettings, fragment: int | None = None) -> None:
        self.s = settings
        self.stop_event = threading.Event()
        self.r = connect_redis(settings.redis_url)
        self.raw = connect_redis(settings.redis_url, decode=False)  # for snapshots: bitmaps are bytes
        self.cfg = runs.load_config(self.r, settings.run)
        self.lane = lane_of(self.cfg, fragment)
        self.store = open_store(settings.store_url, concurrency=settings.concurrency)
        self.store.check()
        self.lock = RoundLock(self.r, self.lane, settings.aggregator_id, settings.lock_ttl_s)
        self.scripts = Scripts(self.r)
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="fetch")
        self.progress_at = time.monotonic()   # the round loop's last sign of life (see _watch)
        # (version, weights digest, momentum digest, weights, momentum, download residual)
        self._cache: tuple | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, max_rounds: int | None = None) -> int:
        """Serve rounds until stopped (or `max_rounds` committed); returns versions committed."""
        committed = 0
        outage = Outage(self.s.outage_limit_s, self.stop_event)
        threading.Thread(target=self._watch, name="stall-watch", daemon=True).start()
        try:
            while not self.stop_event.is_set() and (max_rounds is None or committed < max_rounds):
                try:
                    if control.state(self.r, self.s.run) == control.STOPPED:
                        log.info("run %s is stopped; the aggregator exits", self.s.run)
                        break
                    outage.ok()  # Redis answered: an outage, if any, is over (a standby commits nothing)
                    self._touch()
                    if not self.lock.held and not self._acquire():
                        continue
                    if self.stop_event.is_set():  # told to stop while taking the lock: start no round
                        break
                    if self._round():
                        committed += 1
                    outage.ok()
                except LockLost as e:
                    log.warning("%s; back to standby", e)
                    self.lock.release()
                except RunNotFound as e:  # Redis wiped: wait (within the limit) for `diloco recover`
                    outage.failed("the run to reappear in Redis (diloco recover)", e)
                except OUTAGE_ERRORS as e:  # the round is redone from Redis and the store once back
                    outage.failed("Redis and the object store", e)
        finally:
            self.lock.release()
            self.pool.shutdown(wait=False, cancel_futures=True)
        return committed

    def _touch(self) -> None:
        self.progress_at = time.monotonic()

    def _check_lock(self) -> None:
        if self.r.get(keys.lock(self.lane)) != self.lock.value:  # a wipe, or `diloco recover` replaced every key
            raise LockLost(f"the round lock is no longer ours (token {self.lock.token})")

    def _poll(self) -> None:
        """Each poll of a round's collect: a sign of life, and the lock checked. The renewal thread sees a
        lock wiped with Redis only at its next renewal, a third of the TTL later: a round that waits for
        deltas sat that long on a run that was gone, or on one `diloco recover` had already restored."""
        self._touch()
        self._check_lock()

    def _watch(self) -> None:
        """A holder whose round loop is stuck (a hung call, a deadlock) would renew its lock forever from
        the renewal thread and stall the run: past `stall_limit_s` without progress it gives the lock up."""
        check_s = min(5.0, self.s.stall_limit_s / 4)
        while not self.stop_event.wait(check_s):
            idle = time.monotonic() - self.progress_at
            if self.lock.held and idle > self.s.stall_limit_s:
                self.lock.abandon(f"the round loop made no progress for {idle:.0f}s (stall limit "
                                  f"{self.s.stall_limit_s:g}s)")

    def _acquire(self) -> bool:
        if self.lock.try_acquire():
            crash_point("after_lock")
            return True
        self.stop_event.wait(self.s.standby_poll_s)  # standby: the holder is alive
        return False

    def _round(self) -> bool:
        """Run one round; True if it committed a version.

        Each accepted delta is reduced as soon as it is read (the pipelined reduce), in the order of
        the deltas stream, while the other workers still train; when the round closes only the outer
        step, the writes and the commit remain. Dropping a delta already summed (an outlier, a unit
        conflict at commit) means summing the rest again from the start, in the same order.
        """
        self.cfg = runs.load_config(self.r, self.s.run)   # settings changed by control take effect now
        self._check_lock()
        plan = units.plan_for(self.r, self.cfg)
        head = runs.read_head(self.r, self.lane)
        rnd = Round(head=head, last_id=head.deltas_since, lane=self.lane)
        t0 = time.perf_counter()
        weights, momentum, residual = self._base(head)
        floats = {n: t for n, t in weights.items() if t.is_floating_point()}
        codec = get_codec(self.cfg.codec, self.cfg.codec_options)
        red = Reducer(self.store, codec, floats, self.cfg.shard_bytes, self.pool)
        reduce_s = 0.0

        def factors(ann: Announcement) -> tuple[float, float]:
            return weighting.factors(self.cfg.aggregation, self.cfg.staleness_weight, head.version, ann)

        def reduce_one(entry_id: str, ann: Announcement) -> str | None:
            nonlocal reduce_s
            t, known = time.perf_counter(), len(red.rejected)
            reason = red.add(entry_id, ann, factors=factors(ann))
            reduce_s += time.perf_counter() - t
            for other, dropped, why in red.rejected[known:]:   # kept before, failed when summed again
                if other != entry_id and dropped.worker in rnd.accepted:
                    self._drop(rnd, dropped.worker, why)
            self._touch()
            return reason

        def again() -> Reducer:  # every accepted delta but the dropped, from the start, in stream order
            fresh = Reducer(self.store, codec, floats, self.cfg.shard_bytes, self.pool)
            for entry_id, ann in list(rnd.accepted.values()):
                # cannot fail: verified before
                if (reason := fresh.add(entry_id, ann, factors=factors(ann))) is not None:
                    self._drop(rnd, ann.worker, reason)
            return fresh

        while True:
            if not collect(self.r, self.cfg, plan, rnd, block_ms=self.s.block_ms, stop=self.stop_event,
                           lock_lost=self.lock.lost, on_poll=self._poll, on_accept=reduce_one):
                return False
            if self.lock.lost.is_set():
                raise LockLost(f"lock lost while collecting version {head.version}")
            # The outlier rule looks only at deltas the reduce verified (norm included), so broken
            # announcements cannot drag the median.
            dropped = outliers(rnd, self.cfg.outlier_factor)
            for worker, reason in dropped:
                self._drop(rnd, worker, reason)
            if dropped:
                red = again()
            # Async: any one delta makes a version (min_workers is the sync quorum's).
            if dropped or len(red.included) < (1 if self.cfg.is_async else self.cfg.min_workers):
                continue
            try:
                self._step_and_commit(rnd, red, (weights, momentum, residual), plan, reduce_s=reduce_s, t0=t0)
                return True
            except UnitConflict as e:  # a lease moved to another worker while we reduced: that delta cannot count
                self._drop(rnd, e.worker, f"work units: {e.reason}")
                weights, momentum, residual = self._base(head)  # the step changed ours in place: read the head's
                red = again()

    def _base(self, head) -> tuple[dict, dict, dict]:
        """The weights, momentum and download residual of `head`: kept from our own last commit when its
        checksums match the head's (the holder usually committed it), else read from the store."""
        if self._cache is not None:
            version, w_sha, m_sha, *state = self._cache
            if (version, w_sha, m_sha) == (head.version, head.weights_digest, head.momentum_digest):
                return tuple(state)
        self._cache = None  # stale (another holder committed since): free it before loading
        return runs.load_weights(self.store, head), *runs.load_outer_state(self.store, head)

    def _drop(self, rnd: Round, worker: str, reason: str) -> None:
        entry_id, ann = rnd.accepted.pop(worker)
        reject(self.r, self.lane, worker, reason, entry_id, ann.version)
        rnd.rejected += 1

    def _step_and_commit(self, rnd: Round, reducer: Reducer, base: tuple[dict, dict, dict], plan, *,
                         reduce_s: float, t0: float) -> None:
        head = rnd.head
        red = reducer.result()
        mu = schedule.outer_momentum(self.cfg, head.version)
        weights, momentum, residual = base
        download = update.download_codec(self.cfg)
        old = {n: t.clone() for n, t in weights.items()} if download is not None else weights  # the update's base
        # In place: the base is the head's no longer, so until this commit succeeds nothing is cached.
        self._cache = None
        if self.cfg.dn_buffer > 1:
            outer.delayed_nesterov_step_(weights, momentum, red.mean, lr=self.cfg.outer_lr, mu=mu,
                                         n=self.cfg.dn_buffer, arrivals=len(red.included))
        else:
            outer_step_(weights, momentum, red.mean, lr=self.cfg.outer_lr, mu=mu, nesterov=self.cfg.nesterov)
        new_w, new_m = weights, momentum
        version = head.version + 1
        token = self.lock.token
        w_key, m_key = keys.weights_object(self.lane, version, token), keys.momentum_object(self.lane, version, token)
        # Idempotent: a round redone under the same token (its commit hit an outage) writes the same bytes.
        def write_state(key: str, state: dict) -> str:
            return put_idempotent(self.store, key, model.to_parts(state, run=self.s.run, version=str(version)))

        try:
            new_w, residual, upd = self._publish_update(old, new_w, residual, version, token, download)
            # weights and momentum hashed and written side by side from their own memory (no copy)
            w_future = self.pool.submit(write_state, w_key, new_w)
            m_sha = write_state(m_key, update.join_momentum(new_m, residual))
            w_sha = w_future.result()
        except ObjectExists as e:
            # Other bytes under our token: the token was handed out again, which only a Redis that lost
            # its counter does (a wipe before `diloco recover`). A fresh lock gets a token above the store's.
            raise LockLost(f"fencing token {token} was used before ({e}); taking the lock again") from None
        crash_point("after_write")
        inc = red.included
        trained: dict[int, list[tuple[int, str]]] = {}
        for ann in inc:
            for epoch, bit in ann.units:
                trained.setdefault(epoch, []).append((bit, ann.worker))
        stats = {
            "aggregator": self.s.aggregator_id, "participants": ",".join(sorted(a.worker for a in inc)),
            "n": str(len(inc)), "bytes": str(red.nbytes), "rejected": str(rnd.rejected),
            "loss": f"{sum(a.loss for a in inc) / len(inc):.6f}",
            "samples": str(sum(a.samples for a in inc)), "tokens": str(sum(a.tokens for a in inc)),
            "duration_s": f"{(server_time_ms(self.r) - head.committed_ms) / 1000:.3f}",
            "reduce_s": f"{reduce_s:.3f}", "aggregate_s": f"{time.perf_counter() - t0:.3f}",
            "units": str(sum(len(a.units) for a in inc)),
            "outer_lr": repr(self.cfg.outer_lr), "outer_momentum": repr(mu),
            "entries": ",".join(reducer.entries),  # in the order they were summed: replay sums them so
            **weighting.stats(self.cfg, head.version, inc),   # the mean's weights (not for sync + uniform)
        }
        try:
            self.scripts.commit(self.lane, lock_value=self.lock.value, base_version=head.version, token=token,
                                weights=(w_key, w_sha), momentum=(m_key, m_sha), stats=stats,
                                dataset=plan.dataset, units=trained, deltas_read=rnd.last_id, update=upd)
        except UnitConflict:
            for key in (w_key, m_key, *upd[0]):  # ours, never committed: the retry writes them again
                self.store.delete(key)
            raise
        self._cache = (version, w_sha, m_sha, new_w, new_m, residual)
        crash_point("after_commit")
        log.info("committed version %d: %d workers, loss %s, %s bytes, round %ss",
                 version, len(inc), stats["loss"], stats["bytes"], stats["duration_s"])
        self._snapshot(version)
        self._retention(version)
        self._check_budget(version)

    def _publish_update(self, weights: dict, stepped: dict, residual: dict, version: int, token: int,
                        codec: Codec | None) -> tuple[dict, dict, tuple[tuple[str, ...], tuple[str, ...]]]:
        """Encode and write the update from `weights` to the outer step's result `stepped`.

        Returns the version's weights (the base plus the decoded update, bit for bit what a worker
        applying it holds), the new residual, and the update's (shard keys, digests). Without a
        download codec: `stepped` itself, the residual unchanged (empty) and no update."""
        if codec is None:
            return stepped, residual, ((), ())
        shards, residual = update.encode(weights, stepped, residual, codec, self.cfg.shard_bytes)
        names = tuple(keys.update_shard(self.lane, version, token, i) for i in range(len(shards)))
        # Not durable: read with its digest checked, and a worker that finds one torn reads the full weights.
        shas = tuple(self.pool.map(lambda k, d: put_idempotent(self.store, k, d, durable=False), names, shards))
        return update.apply(weights, update.decode(shards, weights, codec)), residual, (names, shas)

    def _check_budget(self, version: int) -> None:
        tokens = 0
        if self.cfg.is_streaming and self.cfg.max_versions:   # the run's version: its least advanced fragment's
            version = min(h.version for h in runs.read_heads(self.r, self.cfg))
        if self.cfg.max_tokens:  # only then is the versions stream worth reading every round
            # with fragments, each commit counts the tokens trained since the fragment before synced
            tokens = sum(int(f.get("tokens", 0))
                         for lane in self.cfg.lanes for _, f in self.r.xrange(keys.versions(lane)))
        reason = control.budget_reached(self.cfg, version, tokens)
        if reason:
            log.info("%s: stopping the run", reason)
            control.set_state(self.r, self.s.run, control.STOPPED, f"aggregator {self.s.aggregator_id}", reason)

    def _snapshot(self, version: int) -> None:
        """Best effort: a missing snapshot only means `recover` restores the version before."""
        try:
            snapshot.write(self.store, self.raw, self.lane)
        except ObjectExists:
            pass
        except (DilocoError, redis.RedisError, OSError) as e:
            log.warning("could not write the snapshot of version %d: %s", version, e)

    def _retention(self, version: int) -> None:
        """Best effort, after every `retention_every`-th version: a failure leaves work for the next pass."""
        every = self.cfg.retention_every
        if not every or version % every:
            return
        try:
            doomed = retention.plan(self.r, self.store, self.lane)
            if doomed:
                summary = retention.apply(self.store, doomed, sizes=False, pool=self.pool)
                log.info("retention after version %d deleted %s", version, summary.describe())
        except Exception as e:  # housekeeping must never stop the run
            log.warning("retention after version %d failed (the next pass retries): %s", version, e)


def lane_of(cfg: RunConfig, fragment: int | None) -> str:
    """The lane an aggregator of `fragment` serves; ConfigError for a fragment the run does not have."""
    if not cfg.is_streaming:
        if fragment not in (None, 0):
            raise ConfigError(f"run {cfg.run!r} has no fragments (num_fragments 1): leave --fragments out")
        return cfg.run
    if fragment is None or not 0 <= fragment < cfg.num_fragments:
        raise ConfigError(f"run {cfg.run!r} has fragments 0-{cfg.num_fragments - 1}, not {fragment!r}")
    return keys.lane(cfg.run, fragment)


class Lanes:
    """One Aggregator per lane, each in its own thread, for a run with fragments: every fragment has its
    own lock, so several such processes (each given some `fragments`) share the work, and a lane whose
    holder died is taken over by a standby thread of another process."""

    def __init__(self, settings: AggregatorSettings, fragments: list[int] | None = None) -> None:
        cfg = runs.load_config(connect_redis(settings.redis_url), settings.run)
        wanted = list(range(cfg.num_fragments)) if fragments is None else fragments
        self.aggregators = [Aggregator(settings, f) for f in wanted]
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()
        for agg in self.aggregators:
            agg.stop()

    def run(self, max_rounds: int | None = None) -> int:
        """Serve every lane until stopped (or each lane committed `max_rounds`); the versions committed.
        A lane that fails stops the others: the process exits with its error."""
        errors: list[BaseException] = []
        counts = [0] * len(self.aggregators)

        def serve(i: int, agg: Aggregator) -> None:
            try:
                counts[i] = agg.run(max_rounds=max_rounds)
            except BaseException as e:
                errors.append(e)
                self.stop()

        threads = [threading.Thread(target=serve, args=(i, agg), name=f"lane-{agg.lane}")
                   for i, agg in enumerate(self.aggregators)]
        for t in threads:
            t.start()
        stopping.join_all(threads)   # not t.join(): a SIGTERM that lands on a lane thread must still stop us
        if errors:
            raise errors[0]
        return sum(counts)
