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

from aggregator.collect import Round, collect, reject
from aggregator.lock import RoundLock
from aggregator.reduce import reduce_round
from diloco import keys, model, runs
from diloco.codecs import get_codec
from diloco.config import AggregatorSettings
from diloco.connect import connect_redis, server_time_ms
from diloco.errors import LockLost, Unreachable
from diloco.faults import crash_point
from diloco.outer import outer_step
from diloco.scripts import Scripts
from diloco.store import open_store

log = logging.getLogger(__name__)


class Aggregator:
    def __init__(self, settings: AggregatorSettings) -> None:
        self.s = settings
        self.stop_event = threading.Event()
        self.r = connect_redis(settings.redis_url)
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
        committed, backoff = 0, 0.5
        try:
            while not self.stop_event.is_set() and (max_rounds is None or committed < max_rounds):
                try:
                    if not self.lock.held and not self._acquire():
                        continue
                    if self._round():
                        committed += 1
                    backoff = 0.5
                except LockLost as e:
                    log.warning("%s; back to standby", e)
                    self.lock.release()
                except (Unreachable, redis.ConnectionError, redis.TimeoutError) as e:
                    log.warning("waiting for a service: %s; retrying in %.1fs", e, backoff)
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
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
        head = runs.read_head(self.r, self.s.run)
        rnd = Round(head=head, last_id=head.deltas_since)
        t0 = time.perf_counter()
        weights = runs.load_weights(self.store, head)
        momentum = runs.load_momentum(self.store, head)
        floats = {n: t for n, t in weights.items() if t.is_floating_point()}
        codec = get_codec(self.cfg.codec)
        while True:
            if not collect(self.r, self.cfg, rnd, block_ms=self.s.block_ms, stop=self.stop_event):
                return False
            if self.lock.lost.is_set():
                raise LockLost(f"lock lost while collecting version {head.version}")
            t_reduce = time.perf_counter()
            red = reduce_round(self.store, codec, floats, list(rnd.accepted.values()),
                               self.cfg.shard_bytes, self.pool)
            for entry_id, ann, reason in red.rejected:
                reject(self.r, self.s.run, ann.worker, reason, entry_id, ann.version)
                del rnd.accepted[ann.worker]
                rnd.rejected += 1
            if len(red.included) >= self.cfg.min_workers:
                break
        reduce_s = time.perf_counter() - t_reduce
        new_w, new_m = outer_step(weights, momentum, red.mean, lr=self.cfg.outer_lr,
                                  mu=self.cfg.outer_momentum, nesterov=self.cfg.nesterov)
        version = head.version + 1
        token = self.lock.token
        w_key, m_key = keys.weights_object(self.s.run, version, token), keys.momentum_object(self.s.run, version, token)
        w_sha = self.store.put(w_key, model.to_bytes(new_w, run=self.s.run, version=str(version)))
        m_sha = self.store.put(m_key, model.to_bytes(new_m, run=self.s.run, version=str(version)))
        crash_point("after_write")
        inc = red.included
        stats = {
            "aggregator": self.s.aggregator_id, "participants": ",".join(a.worker for a in inc),
            "n": str(len(inc)), "bytes": str(red.nbytes), "rejected": str(rnd.rejected),
            "loss": f"{sum(a.loss for a in inc) / len(inc):.6f}",
            "samples": str(sum(a.samples for a in inc)), "tokens": str(sum(a.tokens for a in inc)),
            "duration_s": f"{(server_time_ms(self.r) - head.committed_ms) / 1000:.3f}",
            "reduce_s": f"{reduce_s:.3f}", "aggregate_s": f"{time.perf_counter() - t0:.3f}",
        }
        self.scripts.commit(self.s.run, lock_value=self.lock.value, base_version=head.version,
                            token=token, weights=(w_key, w_sha), momentum=(m_key, m_sha), stats=stats)
        crash_point("after_commit")
        log.info("committed version %d: %d workers, loss %s, %s bytes, round %ss",
                 version, len(inc), stats["loss"], stats["bytes"], stats["duration_s"])
        return True
