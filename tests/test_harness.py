"""The harness's waits fail as soon as a service of the test has died, not at their deadline.

A mutant (or a bug) that crashes the aggregator used to leave the test waiting for a version for
its whole deadline: the mutation runs spent most of their time there (docs/mutation.md)."""

from __future__ import annotations

import threading
import time

import pytest

from tests import harness


class Crashes:
    """A service whose run raises at once, as an aggregator with a bug in its round would."""

    def run(self, max_rounds: int | None = None) -> int:
        raise RuntimeError("boom in the round")

    def stop(self) -> None:
        pass


class Waits:
    """A service that runs until stopped, as a worker waiting for a version does."""

    def __init__(self) -> None:
        self.stopped = threading.Event()

    def run(self, max_rounds: int | None = None) -> int:
        self.stopped.wait()
        return 0

    def stop(self) -> None:
        self.stopped.set()


def test_waits_fail_within_a_poll_when_a_service_died_and_report_it_once(r):
    dead = harness.Service(Crashes(), None, name="agg")
    dead.start()
    dead.join(10)
    assert not dead.is_alive()
    t0 = time.monotonic()
    with pytest.raises(harness.ServiceDied, match=r"agg died while the test waited: RuntimeError.*boom"):
        harness.wait_for_version(r, "t", 1, timeout_s=60)
    assert time.monotonic() - t0 < 5, "the wait did not notice the dead service before its deadline"
    harness.check_services()   # reported once: the test may go on (say, to start a standby)
    with pytest.raises(RuntimeError, match="boom"):
        dead.result(1)         # its own error still comes out of its result


def test_joining_a_live_service_fails_when_another_dies_and_a_normal_end_is_no_error():
    waiting = harness.Service(Waits(), None, name="worker")
    waiting.start()
    done = harness.Service(Waits(), None, name="finished")
    done.start()
    assert done.stop(10) == 0
    harness.check_services()   # ended normally: nothing to report
    dead = harness.Service(Crashes(), None, name="agg")
    dead.start()
    t0 = time.monotonic()
    with pytest.raises(harness.ServiceDied, match="agg died"):
        waiting.result(60)
    assert time.monotonic() - t0 < 5, "the join did not notice the dead service before its deadline"
    assert waiting.is_alive()
    assert waiting.stop(10) == 0


def test_starting_a_running_redis_server_again_keeps_the_one_process(tmp_path):
    """A fault test restarts Redis in a `finally`, killed or not: a second process would fail to bind the
    port and leave the first one running with nothing left to stop it."""
    from diloco.localserver import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        first = server.proc
        assert server.start().proc is first and first.poll() is None
    finally:
        server.kill()
    assert first.poll() is not None, "kill() stops the one process there is"
