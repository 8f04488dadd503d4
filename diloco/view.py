"""Rendering a status snapshot with rich: pure functions from the snapshot dict to renderables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


def _mb(n: Any) -> str:
    return f"{n / 1e6:.2f} MB" if isinstance(n, (int, float)) else "-"


def header(snap: dict[str, Any]) -> Text:
    cfg, lock = snap["config"], snap["lock"]
    holder = f"{lock['holder']} (token {lock['token']})" if lock["holder"] else "none"
    return Text.assemble(
        ("run ", "dim"), (snap["run"], "bold"), ("  version ", "dim"), (str(snap["version"]), "bold cyan"),
        ("  task ", "dim"), cfg["task"], ("  H ", "dim"), str(cfg["sync_every"]),
        ("  codec ", "dim"), cfg["codec"], ("  outer ", "dim"), f"lr {cfg['outer_lr']} mu {cfg['outer_momentum']}",
        ("  aggregator ", "dim"), holder,
    )


def workers_table(snap: dict[str, Any]) -> Table:
    t = Table(title="workers", expand=False)
    dylu = bool(snap["config"].get("dylu"))   # DyLU: each worker's H for its current round
    for col in ("id", "state", "alive", "version", "step", "loss", "lr", "steps/s", "heartbeat", "sent",
                "received", "rejected"):
        t.add_column(col)
    if dylu:
        t.add_column("H")
    for w in snap["workers"]:
        age = w.get("heartbeat_age_s")
        row = [w["id"], condition(w), "yes" if w["alive"] else "[red]no[/]", str(w.get("version", "-")),
               str(w.get("step", "-")), f"{w['loss']:.4f}" if w.get("loss") is not None else "-",
               f"{w['lr']:.3g}" if w.get("lr") is not None else "-", str(w.get("steps_per_s") or "-"),
               f"{age}s ago" if age is not None else "-",
               _mb(w.get("bytes_sent")), _mb(w.get("bytes_received")), str(w["rejected"])]
        t.add_row(*row, *([str(w.get("inner_steps", "-"))] if dylu else []))
    return t


def rounds_table(snap: dict[str, Any], last: int = 10) -> Table:
    t = Table(title="recent versions")
    is_async = snap["config"].get("mode") == "async"   # async versions record each delta's staleness
    for col in ("version", "workers", "loss", "eval loss", "round s", "bytes", "rejected", "aggregator"):
        t.add_column(col)
    if is_async:
        t.add_column("staleness")
    for rd in snap["rounds"][-last:]:
        ev = rd.get("eval_loss")
        row = [str(rd.get("version")), str(rd.get("n")), f"{rd['loss']:.4f}" if rd.get("loss") is not None else "-",
               f"{ev:.4f}" if ev is not None else "-",
               str(rd.get("duration_s")), _mb(rd.get("bytes")), str(rd.get("rejected")), str(rd.get("aggregator"))]
        t.add_row(*row, *([str(rd.get("staleness", "-"))] if is_async else []))
    return t


def fragments_table(snap: dict[str, Any]) -> Table:
    """A streaming run's fragments: each one's version, aggregator, last round and open round."""
    t = Table(title="fragments (the versions above are fragment 0's)")
    for col in ("fragment", "version", "aggregator", "last round s", "bytes", "open round", "rejected"):
        t.add_column(col)
    for fr in snap["fragments"]:
        last, rnd = fr.get("last_round") or {}, fr.get("round") or {}
        waiting = f"{rnd.get('accepted')}/{rnd.get('live')}" if rnd.get("version") == fr["version"] else "-"
        t.add_row(str(fr["fragment"]), str(fr["version"]), str(fr["lock"]["holder"] or "none"),
                  str(last.get("duration_s", "-")), _mb(last.get("bytes")), waiting, str(fr["rejected"]))
    return t


def status_view(snap: dict[str, Any]) -> Group:
    parts: list[Any] = [header(snap)]
    if phase(snap) in ("paused", "stopped"):
        parts.append(Text(f"run {phase(snap)}: {(snap.get('control') or {}).get('reason', '')}", "yellow"))
    rnd = snap.get("round")
    if rnd and rnd.get("version") == snap["version"]:
        why = f": waiting for {rnd['waiting']}" if rnd.get("waiting") else ""
        parts.append(Text(f"round for version {rnd['version']}: {rnd.get('phase')}, {rnd.get('accepted')} accepted "
                          f"of {rnd.get('live')} live workers{why}"))
    parts += [workers_table(snap), rounds_table(snap)]
    if snap.get("fragments"):
        parts.append(fragments_table(snap))
    if snap.get("units"):
        parts.append(units_grid(snap))
    rej = snap["rejections"]
    if rej["total"]:
        parts.append(Text(f"rejections: {rej['total']} in all; latest: "
                          + "; ".join(f"{e.get('worker')}: {e.get('reason')}" for e in rej["recent"][:3])))
    return Group(*parts)


def print_status(snap: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(status_view(snap))


def units_table(rep: dict[str, Any]) -> Table:
    t = Table(title=f"work units of dataset {rep['dataset']} "
                    f"({rep['num_units']} units of {rep['unit_samples']} samples)")
    for col in ("epoch", "done", "claimed", "leased", "holders", "ETA"):
        t.add_column(col)
    for e in rep["epochs"]:
        holders = sorted({lease["worker"] or "?" for lease in e["leased"]})
        eta = f"{e['eta_s']:.0f}s" if e["eta_s"] is not None else "-"
        t.add_row(str(e["epoch"]), f"{e['done']}/{e['total']}", str(e["claimed"]), str(len(e["leased"])),
                  ", ".join(holders[:6]) + (" ..." if len(holders) > 6 else ""), eta)
    return t


def print_units(rep: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(units_table(rep))


# --- the monitor's panels (diloco monitor) ------------------------------------------------------

BARS = "▁▂▃▄▅▆▇█"
GONE = ("lost", "kicked")  # worker conditions that need an operator's eye
_NUMERIC = ("step", "steps/s", "loss", "H")


def sparkline(values: Sequence[float | None], width: int | None = None) -> str:
    """One bar per value (the last `width` values), from the lowest (▁) to the highest (█).

    Missing or non-finite values are spaces; a flat series sits mid-height, so it never reads as zero.
    """
    vals = list(values)
    if width is not None:
        vals = vals[max(len(vals) - width, 0):] if width > 0 else []
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    out = []
    for v in vals:
        if v is None or not math.isfinite(v):
            out.append(" ")
        elif hi == lo:
            out.append(BARS[len(BARS) // 2 - 1])
        else:
            out.append(BARS[round((v - lo) / (hi - lo) * (len(BARS) - 1))])
    return "".join(out)


def duration(s: float | None) -> str:
    """45s, 3m20s, 2h05m; '-' when unknown."""
    if s is None or not math.isfinite(s):
        return "-"
    s = max(0, round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def condition(w: dict[str, Any]) -> str:
    """A worker's state as an operator reads it: its own state while alive, else stopped, kicked or lost."""
    if w.get("kicked"):
        return "kicked"
    if w["alive"]:
        return w.get("state") or "?"
    return "stopped" if w.get("state") == "stopped" else "lost"


def open_round(snap: dict[str, Any]) -> dict[str, Any] | None:
    """The round the aggregator publishes for the current version (older round state is stale)."""
    rnd = snap.get("round")
    return rnd if rnd and rnd.get("version") == snap["version"] else None


def phase(snap: dict[str, Any]) -> str:
    ctl = (snap.get("control") or {}).get("state")
    if ctl in ("paused", "stopped"):
        return ctl
    rnd = open_round(snap)
    if rnd:
        return rnd.get("phase") or "collecting"
    return "starting a round" if snap["lock"]["holder"] else "no aggregator"


_PHASE_STYLE = {"collecting": "bold green", "reducing": "bold cyan", "paused": "bold yellow", "stopped": "bold red",
                "no aggregator": "bold red"}


def run_header(snap: dict[str, Any]) -> Text:
    cfg, workers, ph = snap["config"], snap["workers"], phase(snap)
    alive = sum(w["alive"] for w in workers)
    text = Text.assemble(
        ("run ", "dim"), (snap["run"], "bold"), ("  version ", "dim"), (str(snap["version"]), "bold cyan"),
        "  ", (ph, _PHASE_STYLE.get(ph, "bold")), ("  workers ", "dim"), f"{alive} alive of {len(workers)}\n",
        ("task ", "dim"), str(cfg["task"]), ("  H ", "dim"), str(cfg["sync_every"]), ("  codec ", "dim"),
        str(cfg["codec"]), ("  outer ", "dim"), f"lr {cfg['outer_lr']} mu {cfg['outer_momentum']}"
        + (" nesterov" if cfg.get("nesterov") else ""), ("  min_workers ", "dim"), str(cfg["min_workers"]),
    )
    reason = (snap.get("control") or {}).get("reason")
    if ph in ("paused", "stopped") and reason:
        text.append(f"\n{ph}: {reason}", "yellow")
    return text


def live_workers_table(snap: dict[str, Any], width: int, rows: int | None = None) -> Table:
    """The workers, with columns dropped to fit `width` and at most `rows` rows (the rest counted)."""
    cols = ["id", "host", "state", "step", "steps/s", "loss", "heartbeat", "up", "down"]
    if width < 90:
        cols = ["id", "state", "step", "loss", "heartbeat"] if width >= 50 else ["id", "state", "loss"]
    if snap["config"].get("dylu"):   # each worker's H for its round differs with its speed
        cols.insert(cols.index("loss"), "H")
    workers = snap["workers"]
    shown = workers if rows is None else workers[:max(rows, 0)]
    more = len(workers) - len(shown)
    t = Table(expand=True, box=None, padding=(0, 1), caption=f"+{more} more" if more else None,
              caption_justify="left", header_style="bold dim")
    for c in cols:
        t.add_column(c, no_wrap=True, overflow="ellipsis", justify="right" if c in _NUMERIC else "left")
    for w in shown:
        cond, age = condition(w), w.get("heartbeat_age_s")
        state = f"{cond} (was {w.get('state', '?')})" if cond in GONE else cond
        cells = {"id": w["id"], "host": w.get("host") or "-", "state": state, "step": str(w.get("step", "-")),
                 "steps/s": f"{w['steps_per_s']:.1f}" if w.get("steps_per_s") is not None else "-",
                 "loss": f"{w['loss']:.4f}" if w.get("loss") is not None else "-",
                 "heartbeat": f"{duration(age)} ago" if age is not None else "-",
                 "up": _mb(w.get("bytes_sent")), "down": _mb(w.get("bytes_received")),
                 "H": str(w.get("inner_steps", "-"))}
        style = "red" if cond in GONE else "dim" if cond == "stopped" else None
        t.add_row(*(cells[c] for c in cols), style=style)
    if not workers:
        t.add_row(*(["no worker has registered yet"] + [""] * (len(cols) - 1)), style="dim")
    return t


def round_text(snap: dict[str, Any]) -> Text:
    rnd, ph = open_round(snap), phase(snap)
    if rnd is None:
        if ph == "no aggregator":
            return Text("no aggregator holds the lock: nothing is committed until one starts", "red")
        return Text(f"round for version {snap['version']}: not published yet ({ph})", "dim")
    left_s = (rnd["deadline_ms"] - snap["server_time_ms"]) / 1000 if rnd.get("deadline_ms") else None
    deadline = "-" if left_s is None else f"in {duration(left_s)}" if left_s > 0 else f"passed {duration(-left_s)} ago"
    text = Text.assemble(
        ("round for version ", "dim"), (str(rnd["version"]), "bold"), ": ", (rnd.get("phase") or "?", "bold"), "\n",
        (str(rnd.get("accepted")), "bold"), f" accepted ({rnd.get('answered')} answered) of {rnd.get('live')} live "
        f"workers  min_workers {rnd.get('min_workers')}  deadline {deadline}",
    )
    if rnd.get("rejected"):
        text.append(f"  rejected {rnd['rejected']}", "yellow")
    text.append("\n")
    text.append(f"waiting for {rnd['waiting']}" if rnd.get("waiting") else "all answers in: reducing", "yellow")
    return text


def units_grid(snap: dict[str, Any]) -> Table | Text:
    units = snap.get("units")
    if not units or not units["epochs"]:
        return Text("work units: not read yet", "dim")
    g = Table.grid(expand=True, padding=(0, 1))
    g.add_column(no_wrap=True)
    g.add_column(ratio=1)
    g.add_column(no_wrap=True, overflow="ellipsis")
    for e in units["epochs"][:2]:
        g.add_row(f"epoch {e['epoch']}", ProgressBar(total=max(e["total"], 1), completed=e["done"]),
                  f"{e['done']}/{e['total']} units done  {e['leases']} leased  ETA {duration(e['eta_s'])}")
    return g


def loss_text(snap: dict[str, Any], width: int) -> Text:
    rounds = [rd for rd in snap["rounds"] if rd.get("version") is not None]
    evals = sorted(snap["eval"].items())
    spark_w = max(width - 30, 8)
    text = Text()
    for label, series in (("loss", [(rd["version"], rd.get("loss")) for rd in rounds]), ("eval", evals)):
        series = series[-spark_w:]
        if text:
            text.append("\n")
        text.append(f"{label:<5}", "dim")
        if not series:
            text.append("no values yet", "dim")
            continue
        v, last = series[-1]
        text.append(sparkline([x for _, x in series]), "cyan")
        text.append(f" {last:.4f}" if last is not None else " -", "bold")
        text.append(f" at v{v} (v{series[0][0]}-v{v})", "dim")
    return text


def aggregator_text(snap: dict[str, Any]) -> Text:
    lock = snap["lock"]
    text = Text()
    if snap.get("fragments"):
        held = [fr for fr in snap["fragments"] if fr["lock"]["holder"]]
        text.append(f"fragments: {len(held)} of {len(snap['fragments'])} held by "
                    f"{', '.join(sorted({fr['lock']['holder'] for fr in held})) or 'none'}; "
                    f"versions {', '.join(str(fr['version']) for fr in snap['fragments'])}\n")
    if lock["holder"]:
        ttl = f", lock ttl {lock['ttl_ms'] / 1000:.1f}s" if lock.get("ttl_ms") and lock["ttl_ms"] > 0 else ""
        text.append_text(Text.assemble(("lock held by ", "dim"), (lock["holder"], "bold"), f" (token {lock['token']})"
                                       + ttl))
    else:
        text.append("no aggregator holds the lock", "red")
    if snap["rounds"]:
        rd = snap["rounds"][-1]
        reduce_s, nbytes = rd.get("reduce_s"), rd.get("bytes")
        rate = f"{nbytes / reduce_s / 1e6:.1f} MB/s" if reduce_s and nbytes is not None else "-"
        ago = (snap["server_time_ms"] - rd["committed_ms"]) / 1000 if rd.get("committed_ms") else None
        text.append(f"\nlast round v{rd.get('version')}: {rd.get('duration_s')}s, {rd.get('n')} workers, "
                    f"{_mb(nbytes)}, reduce {reduce_s}s at {rate}, committed {duration(ago)} ago by "
                    f"{rd.get('aggregator')}")
    return text


def events_text(snap: dict[str, Any], rows: int = 5) -> Text:
    """Workers lost or kicked, then the latest rejections (one line each)."""
    lines: list[Text] = []
    for w in snap["workers"]:
        cond = condition(w)
        if cond in GONE:
            why = "kicked by an operator" if cond == "kicked" else (
                f"no heartbeat for {duration(w.get('heartbeat_age_s'))} (evicted)")
            lines.append(Text(f"{w['id']} {cond}: {why}, was {w.get('state', '?')}", "red"))
    rej = snap["rejections"]
    if rej["total"]:
        per = ", ".join(f"{k} {v}" for k, v in sorted(rej["by_worker"].items()))
        lines.append(Text(f"rejections: {rej['total']} in all ({per})", "yellow"))
    for e in rej["recent"]:
        lines.append(Text.assemble((f"v{e.get('version')} ", "dim"), (str(e.get("worker")), "bold"), ": ",
                                   str(e.get("reason"))))
    if not lines:
        lines.append(Text("no rejections, no lost workers", "dim"))
    text = Text("\n").join(lines[:rows])
    text.no_wrap, text.overflow = True, "ellipsis"
    return text
