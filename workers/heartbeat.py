"""The worker's heartbeat: a thread that keeps the alive key's TTL fresh and publishes stats.

The alive key holds the worker's session nonce; registration refuses an id whose key holds another
nonce, which is how a second live worker with the same id is caught.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import redis

from diloco import keys
from diloco.connect import server_time_ms
from diloco.errors import DuplicateWorker
from diloco.scripts import Scripts

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, r: redis.Redis, run: str, worker: str, nonce: str, *, timeout_s: float,
                 interval_s: float, on_beat: Callable[[], None] | None = None) -> None:
        self.r, self.run, self.worker, self.nonce = r, run, worker, nonce
        self.ttl_ms = int(timeout_s * 1000)
        self.interval_s = interval_s
        self.scripts = Scripts(r)
        self.on_beat = on_beat          # e.g. renew the worker's work-unit leases
        self.stats: dict[str, Any] = {}
        self.lost = threading.Event()     # set when another session took our id, or we were kicked
        self.lost_reason = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{worker}", daemon=True)

    def register(self) -> None:
        kicked_by = self.r.get(keys.worker_kicked(self.run, self.worker))
        if kicked_by:
            ttl = self.r.ttl(keys.worker_kicked(self.run, self.worker))
            raise DuplicateWorker(f"worker {self.worker!r} was kicked from run {self.run!r} by {kicked_by}; "
                                  f"it may rejoin in {ttl}s")
        ok = self.scripts.register_worker(self.run, self.worker, self.nonce, self.ttl_ms, socket.gethostname())
        if not ok:
            raise DuplicateWorker(
                f"worker id {self.worker!r} is already used by a live worker of run {self.run!r} "
                f"(key {keys.worker_alive(self.run, self.worker)} holds another session): give this "
                "worker another --worker-id, or stop the other one"
            )

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def update(self, **stats: Any) -> None:
        self.stats.update(stats)

    def beat(self) -> None:
        if self.r.exists(keys.worker_kicked(self.run, self.worker)):
            self._lose(f"worker {self.worker!r} was kicked from run {self.run!r} by an operator")
            return
        alive = keys.worker_alive(self.run, self.worker)
        # A renewal fails when the key expired (we were paused longer than the timeout): register
        # again, unless another session took the id meanwhile.
        renewed = self.scripts.renew_if_owner(alive, self.nonce, self.ttl_ms)
        if not renewed and not self.scripts.register_worker(self.run, self.worker, self.nonce, self.ttl_ms,
                                                            socket.gethostname()):
            self._lose(f"worker id {self.worker!r} was taken over by another session")
            return
        if self.on_beat is not None:
            self.on_beat()
        fields = {k: str(v) for k, v in self.stats.items()}
        fields["heartbeat_ms"] = str(server_time_ms(self.r))
        self.r.hset(keys.worker_stats(self.run, self.worker), mapping=fields)

    def _lose(self, reason: str) -> None:
        log.error("%s; stopping", reason)
        self.lost_reason = reason
        self.lost.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError as e:  # Redis restarting: keep trying, the TTL gives us time
                log.warning("heartbeat failed: %s", e)

    def stop(self, state: str = "stopped") -> None:
        """Stop beating and deregister: the alive key goes now, not at TTL expiry."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.scripts.release_if_owner(keys.worker_alive(self.run, self.worker), self.nonce)
            # the last stats too: what the worker did since its last beat (its final version) stays readable
            fields = {**{k: str(v) for k, v in self.stats.items()}, "state": state}
            self.r.hset(keys.worker_stats(self.run, self.worker), mapping=fields)
        except redis.RedisError as e:
            log.warning("could not deregister: %s", e)
