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
from diloco import control, keys, model, retention, runs, schedule, snapshot, units
from diloco.codecs import get_codec
from diloco.config import AggregatorSettings
from diloco.connect import OUTAGE_ERRORS, Outage, connect_redis, server_time_ms
from diloco.errors import DilocoError, LockLost, ObjectExists, RunNotFound, UnitConflict
from diloco.faults import crash_point
from diloco.outer import outer_step
from diloco.reduce import reduce_round
from diloco.scripts import Scripts
from diloco.store import open_store, put_idempotent

log = logging.getLogger(__name__)


class Aggregator:
    def __init__(self, settings: AggregatorSettings) -> None:
        self.s = settings
        self.stop_event = threading.Event()
        self.r = connect_redis(settings.redis_url)
        self.raw = connect_redis(settings.redis_url, decode=False)  # for snapshots: bitmaps are bytes
        self.cfg = runs.load_config(self.r, settings.run)
        self.store = open_store(settings.store_url, concurrency=settings.concurrency)
        self.store.check()
        self.lock = RoundLock(self.r, settings.run, settings.aggregator_id, settings.lock_ttl_s)
        self.scripts = Scripts(self.r)
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="fetch")

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, max_rounds: int | None = None) -> int:
        """Serve rounds until stopped (or `max_rounds` committed); returns versions committed."""
        committed = 0
        outage = Outage(self.s.outage_limit_s, self.stop_event)
        try:
            while not self.stop_event.is_set() and (max_rounds is None or committed < max_rounds):
                try:
                    if control.state(self.r, self.s.run) == control.STOPPED:
                        log.info("run %s is stopped; the aggregator exits", self.s.run)
                        break
                    outage.ok()  # Redis answered: an outage, if any, is over (a standby commits nothing)
                    if not self.lock.held and not self._acquire():
                        continue
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

    def _acquire(self) -> bool:
        if self.lock.try_acquire():
            crash_point("after_lock")
            return True
        self.stop_event.wait(self.s.standby_poll_s)  # standby: the holder is alive
        return False

    def _round(self) -> bool:
        """Run one round; True if it committed a version."""
        self.cfg = runs.load_config(self.r, self.s.run)   # settings changed by control take effect now
        plan = units.plan_for(self.r, self.cfg)
        head = runs.read_head(self.r, self.s.run)
        rnd = Round(head=head, last_id=head.deltas_since)
        t0 = time.perf_counter()
        weights = runs.load_weights(self.store, head)
        momentum = runs.load_momentum(self.store, head)
        floats = {n: t for n, t in weights.items() if t.is_floating_point()}
        codec = get_codec(self.cfg.codec, self.cfg.codec_options)
        while True:
            closed = collect(self.r, self.cfg, plan, rnd, block_ms=self.s.block_ms, stop=self.stop_event,
                             lost=self.lock.lost)
            if self.lock.lost.is_set():
                raise LockLost(f"lock lost while collecting version {head.version}")
            if not closed:
                return False
            t_reduce = time.perf_counter()
            red = reduce_round(self.store, codec, floats, list(rnd.accepted.values()),
                               self.cfg.shard_bytes, self.pool)
            for _, ann, reason in red.rejected:
                self._drop(rnd, ann.worker, reason)
            # The outlier rule looks only at deltas the reduce verified (norm included), so broken
            # announcements cannot drag the median; dropping one means reducing again without it.
            dropped = outliers(rnd, self.cfg.outlier_factor)
            for worker, reason in dropped:
                self._drop(rnd, worker, reason)
            if dropped or len(red.included) < self.cfg.min_workers:
                continue
            try:
                self._step_and_commit(rnd, red, weights, momentum, plan, reduce_s=time.perf_counter() - t_reduce,
                                      t0=t0)
                return True
            except UnitConflict as e:  # a lease ended while we reduced: that delta cannot count
                self._drop(rnd, e.worker, f"work units: {e.reason}")

    def _drop(self, rnd: Round, worker: str, reason: str) -> None:
        entry_id, ann = rnd.accepted.pop(worker)
        reject(self.r, self.s.run, worker, reason, entry_id, ann.version)
        rnd.rejected += 1

    def _step_and_commit(self, rnd: Round, red, weights, momentum, plan, *, reduce_s: float, t0: float) -> None:
        head = rnd.head
        mu = schedule.outer_momentum(self.cfg, head.version)
        new_w, new_m = outer_step(weights, momentum, red.mean, lr=self.cfg.outer_lr, mu=mu, nesterov=self.cfg.nesterov)
        version = head.version + 1
        token = self.lock.token
        w_key, m_key = keys.weights_object(self.s.run, version, token), keys.momentum_object(self.s.run, version, token)
        # Idempotent: a round redone under the same token (its commit hit an outage) writes the same bytes.
        w_sha = put_idempotent(self.store, w_key, model.to_bytes(new_w, run=self.s.run, version=str(version)))
        m_sha = put_idempotent(self.store, m_key, model.to_bytes(new_m, run=self.s.run, version=str(version)))
        crash_point("after_write")
        inc = red.included
        trained: dict[int, list[tuple[int, str]]] = {}
        for ann in inc:
            for epoch, bit in ann.units:
                trained.setdefault(epoch, []).append((bit, ann.worker))
        stats = {
            "aggregator": self.s.aggregator_id, "participants": ",".join(a.worker for a in inc),
            "n": str(len(inc)), "bytes": str(red.nbytes), "rejected": str(rnd.rejected),
            "loss": f"{sum(a.loss for a in inc) / len(inc):.6f}",
            "samples": str(sum(a.samples for a in inc)), "tokens": str(sum(a.tokens for a in inc)),
            "duration_s": f"{(server_time_ms(self.r) - head.committed_ms) / 1000:.3f}",
            "reduce_s": f"{reduce_s:.3f}", "aggregate_s": f"{time.perf_counter() - t0:.3f}",
            "units": str(sum(len(a.units) for a in inc)),
            "outer_lr": repr(self.cfg.outer_lr), "outer_momentum": repr(mu),
            "entries": ",".join(rnd.accepted[a.worker][0] for a in inc),
        }
        try:
            self.scripts.commit(self.s.run, lock_value=self.lock.value, base_version=head.version, token=token,
                                weights=(w_key, w_sha), momentum=(m_key, m_sha), stats=stats,
                                dataset=plan.dataset, units=trained, deltas_read=rnd.last_id)
        except UnitConflict:
            for key in (w_key, m_key):  # ours, never committed: the retry writes them again
                self.store.delete(key)
            raise
        crash_point("after_commit")
        log.info("committed version %d: %d workers, loss %s, %s bytes, round %ss",
                 version, len(inc), stats["loss"], stats["bytes"], stats["duration_s"])
        self._snapshot(version)
        self._retention(version)
        self._check_budget(version)

    def _check_budget(self, version: int) -> None:
        tokens = 0
        if self.cfg.max_tokens:  # only then is the versions stream worth reading every round
            tokens = sum(int(f.get("tokens", 0)) for _, f in self.r.xrange(keys.versions(self.s.run)))
        reason = control.budget_reached(self.cfg, version, tokens)
        if reason:
            log.info("%s: stopping the run", reason)
            control.set_state(self.r, self.s.run, control.STOPPED, f"aggregator {self.s.aggregator_id}", reason)

    def _snapshot(self, version: int) -> None:
        """Best effort: a missing snapshot only means `recover` restores the version before."""
        try:
            snapshot.write(self.store, self.raw, self.s.run)
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
            doomed = retention.plan(self.r, self.store, self.s.run)
            if doomed:
                summary = retention.apply(self.store, doomed, sizes=False, pool=self.pool)
                log.info("retention after version %d deleted %s", version, summary.describe())
        except Exception as e:  # housekeeping must never stop the run
            log.warning("retention after version %d failed (the next pass retries): %s", version, e)
