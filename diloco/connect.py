"""Connections to Redis, with errors that name the URL (never the password)."""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from diloco.errors import Unreachable

log = logging.getLogger(__name__)


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


def retrying(what: str, fn, *, max_wait_s: float = 60.0, stop=None):
    """Call fn, retrying connection errors with bounded exponential backoff for up to max_wait_s."""
    delay, waited = 0.1, 0.0
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if waited >= max_wait_s or (stop is not None and stop.is_set()):
                raise Unreachable(f"{what}: Redis unreachable for {waited:.0f}s: {e}") from None
            log.warning("%s: Redis unreachable (%s); retrying in %.1fs", what, e, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)
