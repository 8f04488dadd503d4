"""Helpers that drive real services in-process: init a run, run workers and aggregators in threads."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

import redis

from aggregator.aggregator import Aggregator
from diloco import keys, runs
from diloco.config import AggregatorSettings, RunConfig, WorkerSettings
from diloco.connect import connect_redis
from diloco.inprocess import ServiceThread
from diloco.store import open_store
from workers.worker import RoundInfo, Worker

TINY = {"task": "tiny", "sync_every": 5, "inner_lr": 0.01, "inner_warmup_steps": 0, "codec": "fp32",
        "batch_size": 8, "heartbeat_timeout_s": 10.0}


def init(redis_url: str, store_url: str, run: str = "t", **settings: Any) -> RunConfig:
    given = {**TINY, **settings}
    return runs.init_run(connect_redis(redis_url), open_store(store_url), run, given).config


class ServiceDied(AssertionError):
    """A service a test started ended with an error while the test was waiting for something."""


class Service(ServiceThread):
    """A service in a thread, with the tests' default wait of two minutes.

    Every one started is remembered until `stop_leftovers` (conftest, after each test) stops and joins
    it: the tests share one redis-server, and a thread outliving its test (say, a worker finishing a
    round it began before its stop) would announce into the next test's run of the same name.
    """

    started: ClassVar[list[Service]] = []

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.reported = False   # its error was raised to the test by `result` (or `check_services`)

    def start(self) -> None:
        Service.started.append(self)
        super().start()

    def result(self, timeout: float | None = 120) -> int | None:
        """Join, but fail at once when another service of the test died first: a worker waiting for a
        version that a crashed aggregator will never commit would otherwise hold the test for `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_alive() and (deadline is None or time.monotonic() < deadline):
            self.join(POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic())))
            if self.is_alive():
                check_services()
        if self.is_alive():
            raise TimeoutError(f"{self.name} still running after {timeout}s")
        self.reported = self.reported or self.error is not None
        return super().result(0)

    def stop(self, timeout: float | None = 120) -> int | None:
        return super().stop(timeout)


POLL_S = 0.2


def check_services() -> None:
    """Raise `ServiceDied` if a service this test started has ended with an error nobody has seen yet.

    Every wait of the harness (and the tests' own polling loops) calls this, so a test whose aggregator
    or worker crashed fails within a poll instead of waiting out its deadline. A service that ended
    normally (its `max_rounds`, or a stop) is not an error; an error is reported once.
    """
    for svc in Service.started:
        if not svc.reported and svc.error is not None and not svc.is_alive():
            svc.reported = True
            raise ServiceDied(f"{svc.name} died while the test waited: {svc.error!r}") from svc.error


def stop_leftovers(timeout_s: float = 120) -> list[str]:
    """Stop and join every service a test started; the names of those still running after `timeout_s`."""
    services, Service.started = Service.started, []
    for svc in services:
        svc.service.stop()
    deadline = time.monotonic() + timeout_s
    for svc in services:
        svc.join(max(0.0, deadline - time.monotonic()))
    return [svc.name for svc in services if svc.is_alive()]


def worker(redis_url: str, store_url: str, worker_id: str, run: str = "t", max_rounds: int | None = None,
           observer: Callable[[RoundInfo], None] | None = None, start: bool = True, **kw: Any) -> Service:
    settings = WorkerSettings(redis_url, store_url, run, worker_id, heartbeat_interval_s=0.5, block_ms=200, **kw)
    svc = Service(Worker(settings, observer=observer), max_rounds)
    if start:
        svc.start()
    return svc


def aggregator(redis_url: str, store_url: str, agg_id: str = "agg", run: str = "t",
               max_rounds: int | None = None, start: bool = True, fragment: int | None = None, **kw: Any) -> Service:
    """An aggregator of the run, or (streaming) of one of its fragments."""
    settings = AggregatorSettings(redis_url, store_url, run, agg_id, block_ms=200, standby_poll_s=0.2, **kw)
    svc = Service(Aggregator(settings, fragment), max_rounds)
    if start:
        svc.start()
    return svc


def wait_for_version(r: redis.Redis, run: str, version: int, timeout_s: float = 120) -> list[dict[str, str]]:
    """Block on the versions stream until `version` is committed; returns all version entries."""
    deadline = time.monotonic() + timeout_s
    last, entries = "0-0", []
    while time.monotonic() < deadline:
        check_services()
        for _, batch in r.xread({keys.versions(run): last}, block=500) or []:
            for entry_id, fields in batch:
                last = entry_id
                entries.append(fields)
                if int(fields["version"]) >= version:
                    return entries
    raise TimeoutError(f"version {version} of run {run} not committed within {timeout_s}s")


def wait_until(pred: Callable[[], object], what: str, timeout_s: float = 60) -> object:
    """Poll `pred` until it is truthy, for conditions with no event to block on (a key's value, an object,
    a log file); returns its value, fails after the deadline or as soon as a service died."""
    deadline = time.monotonic() + timeout_s
    while not (value := pred()):
        check_services()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(0.02)
    return value


def wait_for_key(r: redis.Redis, key: str, timeout_s: float = 60) -> None:
    """Wait until `key` exists (keyspace has no cheap event here; poll with a deadline)."""
    deadline = time.monotonic() + timeout_s
    while not r.exists(key):
        check_services()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} did not appear within {timeout_s}s")
        time.sleep(0.02)


def wait_until_len(r: redis.Redis, stream: str, length: int, timeout_s: float = 60) -> None:
    """Wait until `stream` holds at least `length` entries (poll with a deadline)."""
    deadline = time.monotonic() + timeout_s
    while r.xlen(stream) < length:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stream} did not reach {length} entries within {timeout_s}s")
        time.sleep(0.02)


def wait_for_field(r: redis.Redis, key: str, field: str, value: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while r.hget(key, field) != value:
        check_services()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} {field} did not become {value!r} within {timeout_s}s")
        time.sleep(0.02)
