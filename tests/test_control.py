"""Operator control: each command takes effect at the next round and is audited."""

from __future__ import annotations

import logging

import pytest

from diloco import control, keys
from diloco.cli import main as cli_main
from diloco.errors import ConfigError
from tests import harness


def _ctl(redis_url: str, *args: str) -> int:
    return cli_main(["control", "--run", "t", "--redis-url", redis_url, *args, "--who", "tester"])


def test_pause_resume_and_stop(redis_url, file_url, r, caplog):
    caplog.set_level(logging.INFO, logger="aggregator.aggregator")
    harness.init(redis_url, file_url, min_workers=2)
    agg = harness.aggregator(redis_url, file_url)
    ws = [harness.worker(redis_url, file_url, f"w{i}") for i in range(2)]
    harness.wait_for_version(r, "t", 2)
    assert _ctl(redis_url, "pause") == 0
    for w in ("w0", "w1"):
        harness.wait_for_field(r, keys.worker_stats("t", w), "state", "paused")
    paused_at = int(r.hget(keys.head("t"), "version"))
    assert paused_at >= 2
    assert _ctl(redis_url, "resume") == 0
    harness.wait_for_version(r, "t", paused_at + 2)
    assert _ctl(redis_url, "stop") == 0
    for w in ws:
        assert w.result(60) >= 2, "workers exit by themselves once the run is stopped"
    assert agg.result(60) >= 4, "the aggregator exits too"
    assert "run t is stopped; the aggregator exits" in caplog.messages, "and says why"
    whats = [f["what"] for _, f in r.xrange(keys.audit("t"))]
    assert whats == ["paused", "running", "stopped"]
    assert all(f["who"] == "tester" and int(f["ms"]) > 0 for _, f in r.xrange(keys.audit("t")))


def test_set_outer_lr_applies_at_the_next_round(redis_url, file_url, r):
    harness.init(redis_url, file_url, outer_lr=0.7)
    agg = harness.aggregator(redis_url, file_url)
    w = harness.worker(redis_url, file_url, "w0")
    harness.wait_for_version(r, "t", 1)
    assert _ctl(redis_url, "set", "outer_lr=0.25") == 0
    changed_at = int(r.hget(keys.head("t"), "version"))
    entries = harness.wait_for_version(r, "t", changed_at + 2)
    assert float(entries[0]["outer_lr"]) == 0.7
    assert float(entries[-1]["outer_lr"]) == 0.25
    assert r.hget(keys.config("t"), "outer_lr") == "0.25"
    w.stop()
    agg.stop()
    (_, entry), = r.xrange(keys.audit("t"))
    assert entry["what"] == "set outer_lr=0.25 (was 0.7)"


@pytest.mark.parametrize(("assignment", "match"), [
    ("sync_every=3", "cannot change during a run"),
    ("outer_momentum=1.5", "outer_momentum"),
    ("outer_lr=abc", "outer_lr"),
    ("outer_lr", "NAME=VALUE"),
])
def test_set_refuses_bad_changes(redis_url, file_url, r, assignment, match):
    harness.init(redis_url, file_url)
    with pytest.raises(ConfigError, match=match):
        control.set_setting(r, "t", assignment, "tester")
    assert r.hget(keys.config("t"), "sync_every") == "5" and r.xlen(keys.audit("t")) == 0


def test_kick_removes_a_worker_and_the_round_goes_on(redis_url, file_url, r):
    harness.init(redis_url, file_url)
    agg = harness.aggregator(redis_url, file_url)
    ws = {w: harness.worker(redis_url, file_url, w) for w in ("w0", "w1")}
    harness.wait_for_version(r, "t", 1)
    assert _ctl(redis_url, "kick", "w1") == 0
    with pytest.raises(ConfigError, match="kicked"):
        ws["w1"].result(60)
    v = int(r.hget(keys.head("t"), "version"))
    entries = harness.wait_for_version(r, "t", v + 2)
    assert entries[-1]["participants"] == "w0"
    again = harness.worker(redis_url, file_url, "w1", start=False)
    with pytest.raises(ConfigError, match="was kicked"):
        again.service.run(max_rounds=1)
    ws["w0"].stop()
    agg.stop()


def test_version_budget_stops_the_run_cleanly(redis_url, file_url, r, caplog):
    """Also kills `Aggregator.run` 27-32 (the line saying why the aggregator exits), which only the
    slow pause test asserted."""
    caplog.set_level(logging.INFO, logger="aggregator.aggregator")
    harness.init(redis_url, file_url, max_versions=3)
    agg = harness.aggregator(redis_url, file_url)
    w = harness.worker(redis_url, file_url, "w0")
    assert agg.result(120) == 3
    assert w.result(60) in (3, 4)
    assert int(r.hget(keys.head("t"), "version")) == 3
    assert control.state(r, "t") == control.STOPPED
    assert "version budget reached" in r.hget(keys.control("t"), "reason")
    assert "run t is stopped; the aggregator exits" in caplog.messages
