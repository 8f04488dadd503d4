"""Connections to Redis, with errors that name the URL (never the password)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from diloco.errors import Unreachable

log = logging.getLogger(__name__)
T = TypeVar("T")


def redact(url: str) -> str:
    """The URL with any password replaced by '***', safe to log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect_redis(url: str, *, check: bool = True, decode: bool = True) -> redis.Redis:
    """A client with bounded retries; Unreachable (naming the URL) if the first PING fails."""
    try:
        client = redis.Redis.from_url(
            url, decode_responses=decode, socket_connect_timeout=5, socket_keepalive=True,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
    except ValueError as e:
        raise Unreachable(f"invalid Redis URL {redact(url)!r}: {e}") from None
    if check:
        try:
            client.ping()
        except redis.RedisError as e:
            raise Unreachable(f"cannot reach Redis at {redact(url)}: {e}") from None
    return client


def server_time_ms(client: redis.Redis) -> int:
    """Redis server clock: deadlines never depend on a worker's clock."""
    sec, usec = client.time()
    return sec * 1000 + usec // 1000


OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, Unreachable)


class Outage:
    """Bounded exponential backoff across an outage of Redis or the object store.

    `failed()` logs what the service waits for and sleeps (interruptibly); once the outage has
    lasted longer than `limit_s` it raises Unreachable, so a service gives up only after the limit.
    `ok()` ends the outage.
    """

    def __init__(self, limit_s: float, stop: threading.Event | None = None) -> None:
        self.limit_s = limit_s
        self.stop = stop or threading.Event()
        self.since: float | None = None
        self.delay = 0.2

    def failed(self, what: str, err: BaseException) -> None:
        now = time.monotonic()
        self.since = self.since or now
        lasted = now - self.since
        if lasted > self.limit_s:
            raise Unreachable(f"gave up after {lasted:.0f}s waiting for {what}: {err}") from None
        log.warning("waiting for %s (%.0fs so far, limit %.0fs): %s; retrying in %.1fs",
                    what, lasted, self.limit_s, err, self.delay)
        self.stop.wait(self.delay)
        self.delay = min(self.delay * 2, 5.0)

    def ok(self) -> None:
        if self.since is not None:
            log.info("service back after %.0fs", time.monotonic() - self.since)
        self.since, self.delay = None, 0.2

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """fn(), retried through outages (not through other errors) until it succeeds or the limit."""
        while True:
            try:
                result = fn()
            except OUTAGE_ERRORS as e:
                if self.stop.is_set():
                    raise
                self.failed(what, e)
                continue
            self.ok()
            return result
