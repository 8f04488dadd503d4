"""The monitor and `diloco status` rendered from a live run; small terminals, outages, one pipeline a refresh."""

from __future__ import annotations

import io
import re
import threading
import time

import pytest
from rich.console import Console
from rich.styled import Styled

from diloco import keys, monitor, status
from diloco.cli import build_parser
from diloco.cli import main as cli_main
from diloco.localserver import RedisServer, free_port
from diloco.view import condition, duration, sparkline, status_view
from tests import harness
from tests.harness import wait_until


def text_of(renderable, width: int = 160, height: int = 60) -> str:
    console = Console(width=width, height=height, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()





@pytest.fixture
def live(redis_url, file_url, r):
    """Run t at version 2: w0 stopped after 2 rounds, w1 waiting in a round that needs 2 workers, a lost
    worker w9, a rejected (malformed) announcement and an eval loss."""
    harness.init(redis_url, file_url, min_workers=2)
    agg = harness.aggregator(redis_url, file_url)
    w0 = harness.worker(redis_url, file_url, "w0", max_rounds=2)
    w1 = harness.worker(redis_url, file_url, "w1")
    try:
        assert w0.result() == 2
        r.xadd(keys.deltas("t"), {"kind": "delta", "worker": "w8"})  # no version, no shards: rejected
        r.sadd(keys.workers("t"), "w9")  # registered once, then its heartbeat stopped: evicted
        r.hset(keys.worker_stats("t", "w9"), mapping={"state": "training", "host": "gone-host", "step": "3",
                                                      "heartbeat_ms": str(int(time.time() * 1000) - 90_000)})
        r.hset(keys.eval_losses("t"), "1", "0.4321")
        wait_until(lambda: r.xlen(keys.rejections("t")) >= 1, "the malformed announcement was not rejected")
        wait_until(lambda: r.hgetall(keys.round_state("t")).get("version") == "2"
                   and r.hget(keys.round_state("t"), "accepted") == "1", "w1's delta was not accepted")
        wait_until(lambda: r.hget(keys.worker_stats("t", "w1"), "state") == "waiting"
                   and r.hget(keys.worker_stats("t", "w1"), "loss"), "w1's heartbeat did not say it waits")
        yield r
    finally:
        w1.stop()
        agg.stop()


def test_monitor_and_status_show_the_facts_of_a_live_run(live, redis_url, capsys):
    r = live
    mon = monitor.Monitor(redis_url, "t")
    state = mon.prime()
    assert state.error is None
    snap = state.snap
    text = text_of(monitor.Dashboard(state, fit=False))
    last = r.xrevrange(keys.versions("t"), count=1)[0][1]
    w1 = next(w for w in snap["workers"] if w["id"] == "w1")
    assert w1["lr"] == 0.01  # published with the loss, as a number: the tiny run's constant inner lr
    n = snap["units"]["num_units"]
    for fact in ("run t", "version 2", "collecting", "task tiny", "H 5", "codec fp32", "min_workers 2",
                 "w0", "stopped", "w1", "waiting", f"{w1['loss']:.4f}", "w9", "lost (was training)",
                 "1 accepted (1 answered) of 1 live workers",
                 "waiting for 1 more worker (min_workers 2, 1 live): start workers or lower it",
                 f"20/{n} units done", f"{float(last['loss']):.4f} at v2", "0.4321 at v1",
                 "lock held by agg (token 1)", "reduce", "MB/s", "w9 lost", "evicted",
                 "w8: malformed announcement", "rejections: 1 in all (w8 1)"):
        assert fact in text, f"{fact!r} missing from the monitor:\n{text}"

    status_text = text_of(status_view(status.snapshot(r, "t")))
    for fact in ("run t", "version 2", "w0", "stopped", "w1", "w9", "lost",
                 "waiting for 1 more worker (min_workers 2, 1 live)",
                 f"20/{n} units done", "agg (token 1)", "malformed announcement"):
        assert fact in status_text, f"{fact!r} missing from diloco status:\n{status_text}"

    assert cli_main(["monitor", "--run", "t", "--redis-url", redis_url, "--once"]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out and "lock held by agg" in out

    # A small terminal drops panels instead of garbling: every line fits and the run stays on screen.
    for width, height in ((60, 15), (100, 12), (30, 3), (20, 1)):
        small = text_of(monitor.Dashboard(state), width=width, height=height)
        lines = small.rstrip("\n").split("\n")
        assert len(lines) <= height and all(len(line) <= width for line in lines), small
        assert "run t" in small and ("version 2" in small or width < 25), small
    small = text_of(monitor.Dashboard(state), width=60, height=15)
    assert "workers" in small and "lost workers and rejections" not in small, small

    # An operator's pause shows as the phase, with its reason.
    r.hset(keys.control("t"), mapping={"state": "paused", "reason": "paused by ops@host"})
    paused = text_of(monitor.Dashboard(mon.refresh(), fit=False))
    assert "version 2  paused" in paused and "paused: paused by ops@host" in paused, paused


def test_one_refresh_is_one_pipeline_and_new_workers_show_up_on_the_next(live, redis_url):
    r = live
    mon = monitor.Monitor(redis_url, "t")
    mon.prime()
    calls = {"pipelines": 0, "executes": 0, "commands": 0}
    real_pipeline, real_command = mon.r.pipeline, mon.r.execute_command

    def pipeline(*args, **kw):
        calls["pipelines"] += 1
        pipe = real_pipeline(*args, **kw)
        real_execute = pipe.execute

        def execute(*a, **k):
            calls["executes"] += 1
            return real_execute(*a, **k)

        pipe.execute = execute
        return pipe

    def command(*args, **kw):
        calls["commands"] += 1
        return real_command(*args, **kw)

    mon.r.pipeline, mon.r.execute_command = pipeline, command
    state = mon.refresh()
    assert state.error is None and calls == {"pipelines": 1, "executes": 1, "commands": 0}
    assert {w["id"] for w in state.snap["workers"]} == {"w0", "w1", "w9"}
    assert state.snap["units"]["epochs"][0]["done"] == 20

    r.sadd(keys.workers("t"), "w10")
    r.hset(keys.worker_stats("t", "w10"), mapping={"state": "starting", "heartbeat_ms": "0"})
    assert "w10" not in {w["id"] for w in mon.refresh().snap["workers"]}  # learned by this read...
    assert "w10" in {w["id"] for w in mon.refresh().snap["workers"]}      # ...and read by the next
    assert calls == {"pipelines": 3, "executes": 3, "commands": 0}


def test_redis_outage_keeps_the_last_snapshot_dimmed_and_retries(tmp_path, file_url):
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    try:
        harness.init(server.url, file_url, run="o")
        mon = monitor.Monitor(server.url, "o", refresh_s=0.5)
        assert mon.prime().error is None
        server.kill()
        state = mon.refresh()
        assert state.unreachable and server.url in state.error and state.snap["run"] == "o"
        frame = text_of(monitor.Dashboard(state), width=100, height=30)
        assert f"Redis unreachable at {server.url}" in frame
        assert "showing the last snapshot" in frame and "retrying every 0.5s" in frame and "run o" in frame
        _, body = monitor.dashboard(state, 100, 30).renderables
        assert isinstance(body, Styled) and body.style == "dim", "the stale snapshot is dimmed"
        server.start()  # same data directory: the AOF brings the run back
        state = mon.refresh()
        assert state.error is None and not state.unreachable and "unreachable" not in text_of(monitor.Dashboard(state))
    finally:
        server.kill()


def test_unreachable_redis_is_a_message_never_a_traceback(capsys):
    url = f"redis://127.0.0.1:{free_port()}/0"
    state = monitor.Monitor(url, "t").prime()
    assert state.unreachable and state.snap is None
    frame = text_of(monitor.Dashboard(state), width=60, height=15)
    assert "unreachable" in frame and url in frame and "no data yet" in frame
    assert cli_main(["monitor", "--run", "t", "--redis-url", url, "--once"]) == 1
    out = capsys.readouterr()
    assert "unreachable" in out.out and url in out.out and "Traceback" not in out.out + out.err


def test_missing_run_is_shown_not_raised(redis_url):
    state = monitor.Monitor(redis_url, "nope").prime()
    assert not state.unreachable and "run 'nope' does not exist" in state.error
    assert "diloco init --run nope" in text_of(monitor.Dashboard(state))


def test_alongside_holds_back_the_lines_and_passes_results_and_ctrl_c_through(redis_url, file_url):
    harness.init(redis_url, file_url)
    quiet = Console(file=io.StringIO(), width=100)
    screen = Console(file=io.StringIO(), force_terminal=True, width=100, height=30)

    def body() -> int:
        quiet.print("version    1  loss 0.1000")
        assert "version    1" not in quiet.file.getvalue(), "held back while the dashboard shows"
        return 7

    assert monitor.alongside(body, redis_url, "t", quiet, refresh_s=0.05, screen=screen) == 7
    assert quiet.file.getvalue() == "version    1  loss 0.1000\n"
    assert "run t" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.file.getvalue()), "the dashboard was drawn"

    def interrupted() -> int:
        quiet.print("version    2  loss 0.0900")
        time.sleep(0.2)  # a few refreshes happen in the monitor thread meanwhile
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        monitor.alongside(interrupted, redis_url, "t", quiet, refresh_s=0.05, screen=screen)
    assert quiet.file.getvalue().endswith("version    2  loss 0.0900\n")
    assert not any(t.name == "monitor" for t in threading.enumerate()), "the refresh thread stopped"


def test_cli_flags():
    p = build_parser()
    assert p.parse_args(["run", "--no-monitor"]).no_monitor and not p.parse_args(["run"]).no_monitor
    args = p.parse_args(["monitor", "--run", "x", "--refresh-s", "0.5", "--once"])
    assert (args.run, args.refresh_s, args.once) == ("x", 0.5, True)
    assert cli_main(["monitor", "--run", "x", "--refresh-s", "0"]) == 2


def test_sparkline():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([8, 1]) == "█▁"
    assert sparkline([2.5, 2.5, 2.5]) == "▄▄▄", "a flat series sits mid-height, never at zero"
    assert sparkline([1, None, float("nan"), float("inf"), 3]) == "▁   █"
    assert sparkline(range(20), width=5) == "▁▃▅▆█", "the last `width` values, scaled among themselves"
    assert sparkline([1, 2, 3], width=10) == "▁▅█"
    assert sparkline([]) == "" and sparkline([1, 2], width=0) == "" and sparkline([None]) == " "


def test_many_workers_fill_the_spare_lines_and_the_rest_is_counted():
    snap = {"run": "t", "version": 7, "config": {"task": "tiny", "sync_every": 5, "codec": "fp32", "outer_lr": 0.7,
                                                 "outer_momentum": 0.9, "nesterov": True, "min_workers": 2},
            "workers": [{"id": f"w{i:02d}", "alive": True, "state": "training", "step": i, "loss": 0.5,
                         "heartbeat_age_s": 1.0, "rejected": 0} for i in range(40)],
            "rounds": [{"version": v, "loss": 1 / v, "committed_ms": 1000 * v, "units": "10", "bytes": 10**6,
                        "reduce_s": 0.5, "duration_s": 3.0, "n": 2, "aggregator": "a"} for v in range(1, 8)],
            "eval": {}, "lock": {"holder": "a", "token": 3, "ttl_ms": 20000},
            "rejections": {"total": 0, "by_worker": {}, "recent": []}, "round": None, "units": None,
            "control": None, "server_time_ms": 8000}
    state = monitor.State("redis://x", "t", 1.0, snap=snap)
    for height in (30, 60):
        lines = text_of(monitor.Dashboard(state), width=100, height=height).rstrip("\n").split("\n")
        shown = sum("training" in line for line in lines)
        assert len(lines) == height and shown > monitor.MIN_WORKER_ROWS, "the spare lines go to the workers table"
        assert any(f"+{40 - shown} more" in line for line in lines), lines
    everything = text_of(monitor.Dashboard(state, fit=False), width=100)
    assert sum("training" in line for line in everything.split("\n")) == 40 and "more" not in everything


def test_worker_condition():
    assert condition({"alive": True, "state": "training"}) == "training"
    assert condition({"alive": False, "state": "stopped"}) == "stopped"
    assert condition({"alive": False, "state": "training"}) == "lost", "heartbeat expired without a goodbye"
    assert condition({"alive": False, "state": "stopped", "kicked": True}) == "kicked"


def test_duration():
    assert [duration(s) for s in (None, float("nan"), -3, 0.4, 45, 200, 7500)] == \
        ["-", "-", "0s", "0s", "45s", "3m20s", "2h05m"]


def test_read_covers_what_the_previous_read_learned(live):
    snap, known = status.read(live, "t")
    assert snap["workers"] == [] and snap["units"] is None, "nothing known yet: the first read learns"
    assert known.workers == ("w0", "w1", "w9") and known.dataset and known.epochs == ()
    snap, known2 = status.read(live, "t", known)
    assert [w["id"] for w in snap["workers"]] == ["w0", "w1", "w9"] and known2.epochs == (0,)
    snap, known3 = status.read(live, "t", known2)
    assert known3 == known2 and snap["units"]["epochs"][0]["done"] == 20
