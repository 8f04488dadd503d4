"""`diloco monitor`: a run's live dashboard in the terminal, from one pipelined Redis read per refresh.

Data, rendering and the loop are kept apart: `State` holds the last snapshot and why the last read
failed (if it did); `dashboard` is a pure function of the state and the terminal size, which drops
panels least important first when the terminal is small; `watch` is the `Live` loop. When Redis
goes away the last snapshot stays on screen, dimmed, under a line naming the URL, and every
refresh tries again. `diloco run` shows the same dashboard while it follows its run (`alongside`).
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.styled import Styled
from rich.text import Text

from diloco import keys, view
from diloco.connect import redact
from diloco.errors import ConfigError, DilocoError
from diloco.status import Known, read

ROUNDS, REJECTIONS = 60, 8   # versions behind the sparklines; rejections listed
TIMEOUT_S = 2.0              # a hung Redis must not freeze the screen: the next refresh is the retry
MIN_WORKER_ROWS = 3          # the workers table keeps this many rows before lesser panels are dropped


@dataclass
class State:
    url: str                       # redacted: safe to show
    run: str
    refresh_s: float
    snap: dict[str, Any] | None = None   # the last good snapshot (status.read), kept through failures
    error: str | None = None       # why the last refresh failed; None when it succeeded
    unreachable: bool = False      # the failure was Redis itself (connection or timeout)
    stale_s: float | None = None   # age of `snap` while refreshes fail


class Monitor:
    """Reads one run, one pipeline per refresh; remembers what the next read must cover."""

    def __init__(self, redis_url: str, run: str, refresh_s: float = 1.0, client: redis.Redis | None = None) -> None:
        try:
            keys.check_name("run name", run)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            self.r = client or redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=TIMEOUT_S,
                                                    socket_connect_timeout=TIMEOUT_S, retry=Retry(NoBackoff(), 0))
        except ValueError as e:
            raise ConfigError(f"invalid Redis URL {redact(redis_url)!r}: {e}") from None
        self.known = Known()
        self.state = State(redact(redis_url), run, refresh_s)
        self._ok_at: float | None = None

    def refresh(self) -> State:
        st = self.state
        try:
            snap, self.known = read(self.r, st.run, self.known, rounds=ROUNDS, rejections=REJECTIONS)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            st.error, st.unreachable = f"Redis unreachable at {st.url}: {e}", True
        except (redis.RedisError, DilocoError) as e:
            st.error, st.unreachable = f"{e} (Redis at {st.url})", False
        except Exception as e:  # a dashboard outlives odd data: it shows the error and keeps refreshing
            st.error, st.unreachable = f"cannot read run {st.run}: {type(e).__name__}: {e}", False
        else:
            st.snap, st.error, st.unreachable, self._ok_at = snap, None, False, time.monotonic()
        st.stale_s = time.monotonic() - self._ok_at if st.error and self._ok_at is not None else None
        return st

    def prime(self) -> State:
        """Refresh until a read covers every worker and epoch, so the first frame is complete."""
        for _ in range(3):
            before = self.known
            st = self.refresh()
            if st.error or self.known == before:
                break
        return st


# --- rendering: pure functions of the state and the terminal size -------------------------------

def _panel(body: RenderableType, title: str) -> Panel:
    return Panel(body, title=f"[bold]{title}[/]", title_align="left", border_style="blue", padding=(0, 1))


def _banner(state: State) -> Text | None:
    if state.error is None:
        return None
    text = Text(state.error, "bold red")
    if state.snap is None:
        text.append(f"\nno data yet; retrying every {state.refresh_s:g}s", "red")
    else:
        text.append(f"\nshowing the last snapshot, {view.duration(state.stale_s)} old (dimmed); "
                    f"retrying every {state.refresh_s:g}s", "red")
    return text


def _height(r: RenderableType, width: int) -> int:
    measure = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    return len(measure.render_lines(r, measure.options, pad=False))


def _workers(snap: dict[str, Any], width: int, rows: int | None) -> Panel:
    return _panel(view.live_workers_table(snap, width - 4, rows), "workers")


def dashboard(state: State, width: int, height: int | None = None) -> RenderableType:
    """The frame for a `width` x `height` terminal (height None: as tall as needed).

    Panels that do not fit are dropped, least important first: recent events, aggregator, loss,
    units, the round; the workers table shrinks to a few rows first. The header always stays.
    """
    banner, snap = _banner(state), state.snap
    if snap is None:
        return banner or Text("no data yet", "dim")
    n_workers = len(snap["workers"])
    rows = None if height is None else min(n_workers, MIN_WORKER_ROWS)
    # In display order, which is also the order of importance.
    panels: list[RenderableType] = [
        _panel(view.run_header(snap), "diloco monitor"),
        _workers(snap, width, rows),
        _panel(view.round_text(snap), "round"),
        _panel(view.units_grid(snap), "work units"),
        _panel(view.loss_text(snap, width - 4), "loss over versions"),
        _panel(view.aggregator_text(snap), "aggregator"),
        _panel(view.events_text(snap, rows=1 + REJECTIONS), "lost workers and rejections"),
    ]
    if height is not None:
        budget = height - (_height(banner, width) if banner else 0)
        heights = [_height(p, width) for p in panels]
        if heights[0] > budget:  # not even the header: one line that still names the run and version
            line = Text(f"run {snap['run']} version {snap['version']} {view.phase(snap)}", "bold", no_wrap=True,
                        overflow="ellipsis")
            return Group(*(x for x in (banner, line) if x is not None))
        keep: list[int] = []
        for i, h in enumerate(heights):
            if sum(heights[j] for j in keep) + h <= budget:
                keep.append(i)
        spare = budget - sum(heights[j] for j in keep)
        if 1 in keep and spare > 0 and rows is not None and rows < n_workers:
            # Grow the workers table into the spare lines; showing them all also drops the "+N more" line.
            rows = min(n_workers, rows + spare + (1 if rows + spare + 1 >= n_workers else 0))
            while rows > MIN_WORKER_ROWS and _height(_workers(snap, width, rows), width) > heights[1] + spare:
                rows -= 1
            panels[1] = _workers(snap, width, rows)
        panels = [panels[i] for i in keep]
    body: RenderableType = Group(*panels)
    if state.error:
        body = Styled(body, "dim")
    return Group(banner, body) if banner else body


class Dashboard:
    """`dashboard` at the size rich renders it at (fit), or as tall as it needs (not fit: `--once`)."""

    def __init__(self, state: State, fit: bool = True) -> None:
        self.state, self.fit = state, fit

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = (options.height or console.height) if self.fit else None
        yield dashboard(self.state, options.max_width, height)


# --- the loop ------------------------------------------------------------------------------------

def watch(redis_url: str, run: str, *, refresh_s: float = 1.0, once: bool = False,
          console: Console | None = None, stop: threading.Event | None = None) -> int:
    """Full-screen dashboard until `stop` is set or Ctrl-C (exit 0); `once`: print one frame, exit 1 if it
    has no fresh data."""
    if not refresh_s > 0:
        raise ConfigError(f"--refresh-s must be a positive number of seconds, got {refresh_s}")
    console = console or Console()
    mon = Monitor(redis_url, run, refresh_s)
    state = mon.prime()
    if once:
        console.print(Dashboard(state, fit=False))
        return 0 if state.error is None else 1
    stop = stop or threading.Event()
    try:
        with Live(Dashboard(state), console=console, screen=True, auto_refresh=False) as live:
            while _pause(stop, refresh_s):
                live.update(Dashboard(mon.refresh()), refresh=True)
    except KeyboardInterrupt:
        return 0
    return 0


def _pause(stop: threading.Event, seconds: float) -> bool:
    """Sleep `seconds` in short slices; False as soon as `stop` is set. Only is_set() here: a signal
    handler may set() the event at any moment, and must never find its lock held by this thread."""
    deadline = time.monotonic() + seconds
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, 0.05))
    return False


@contextlib.contextmanager
def _refreshing(mon: Monitor, live: Live) -> Iterator[None]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(mon.state.refresh_s):
            live.update(Dashboard(mon.refresh()), refresh=True)

    thread = threading.Thread(target=loop, name="monitor", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2 * TIMEOUT_S)


def alongside(body: Callable[[], int], redis_url: str, run: str, quiet: Console, *, refresh_s: float = 1.0,
              screen: Console | None = None) -> int:
    """Run `body()` (which prints to `quiet`) with the dashboard full screen, refreshed in a thread.

    What `body` prints is held back and printed once the dashboard closes, so its lines end up in
    the scrollback; its return value and exceptions (Ctrl-C included) pass through unchanged.
    """
    mon = Monitor(redis_url, run, refresh_s)
    capture = quiet.capture()
    try:
        with capture, Live(Dashboard(mon.prime()), console=screen or Console(), screen=True,
                           auto_refresh=False) as live, _refreshing(mon, live):
            return body()
    finally:
        quiet.file.write(capture.get())
        quiet.file.flush()
