"""The aggregator lock with a fencing token, renewed by a thread while held.

Acquire = one Lua script (EXISTS, INCR the token counter, SET PX): the token orders holders, and
the commit script accepts only the current holder's token, so a holder that stalled past its TTL
cannot commit after another took over.
"""

from __future__ import annotations

import logging
import threading

import redis

from diloco import keys
from diloco.scripts import Scripts

log = logging.getLogger(__name__)


class RoundLock:
    def __init__(self, r: redis.Redis, run: str, holder: str, ttl_s: float) -> None:
        self.r, self.run, self.holder = r, run, holder
        self.ttl_ms = int(ttl_s * 1000)
        self.scripts = Scripts(r)
        self.token = 0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def value(self) -> str:
        return f"{self.token}:{self.holder}"

    @property
    def held(self) -> bool:
        return self.token > 0 and not self.lost.is_set()

    def try_acquire(self) -> bool:
        token = self.scripts.acquire_lock(self.run, self.holder, self.ttl_ms)
        if not token:
            return False
        self.token = token
        self.lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="lock-renew", daemon=True)
        self._thread.start()
        log.info("took the round lock with fencing token %d", token)
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.scripts.renew_if_owner(keys.lock(self.run), self.value, self.ttl_ms):
                    log.error("lost the round lock (token %d)", self.token)
                    self.lost.set()
                    return
            except redis.RedisError as e:  # keep trying: the TTL covers a short outage
                log.warning("lock renewal failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.token:
            try:
                self.scripts.release_if_owner(keys.lock(self.run), self.value)
            except redis.RedisError as e:
                log.warning("could not release the lock (it expires by itself): %s", e)
        self.token = 0

    def abandon(self, why: str) -> None:
        """Give the lock up while the holder's main loop is stuck: stop renewing, delete it if still ours.

        A standby takes it at its next poll; if the stuck round ever reaches its commit, the commit
        script refuses it (the lock value no longer matches).
        """
        log.error("giving up the round lock (token %d): %s", self.token, why)
        self.lost.set()
        self._stop.set()
        try:
            self.scripts.release_if_owner(keys.lock(self.run), self.value)
        except redis.RedisError as e:
            log.warning("could not delete the lock (it expires by itself): %s", e)
