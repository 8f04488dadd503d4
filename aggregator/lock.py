"""The aggregator lock with a fencing token, renewed by a thread while held.

Acquire = one Lua script (EXISTS, INCR the token counter, SET PX): the token orders holders, and
the commit script accepts only the current holder's token, so a holder that stalled past its TTL
cannot commit after another took over.

The lock counts as lost (`lost` set, the renewal thread ends) when a renewal finds another value
in the key, or when renewals have failed (Redis unreachable) for a whole TTL since the last one
that succeeded: by then the key has certainly expired and a standby may hold the lock. A failure
within the TTL is only logged, so a short outage does not cost the round.
"""

from __future__ import annotations

import logging
import threading
import time

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
        # Taken after the reply: the server set the TTL before this moment, so the key expires
        # no later than ttl after it.
        renewed_at = time.monotonic()
        self.token = token
        self.lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, args=(renewed_at,), name="lock-renew",
                                        daemon=True)
        self._thread.start()
        log.info("took the round lock with fencing token %d", token)
        return True

    def _renew_loop(self, renewed_at: float) -> None:
        """Renew every third of the TTL until stopped or lost; `renewed_at` is when the TTL was last set."""
        ttl_s = self.ttl_ms / 1000
        while not self._stop.wait(ttl_s / 3):
            try:
                renewed = self.scripts.renew_if_owner(keys.lock(self.run), self.value, self.ttl_ms)
            except redis.RedisError as e:
                if time.monotonic() - renewed_at < ttl_s:  # the key still holds our TTL: keep trying
                    log.warning("lock renewal failed: %s", e)
                    continue
                log.error("lost the round lock (token %d): no renewal for the whole TTL (%s)", self.token, e)
                self.lost.set()
                return
            if not renewed:
                log.error("lost the round lock (token %d): it expired or another aggregator took it", self.token)
                self.lost.set()
                return
            renewed_at = time.monotonic()

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
