"""Rendering a status snapshot with rich: pure functions from the snapshot dict to renderables."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
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
    for col in ("id", "state", "alive", "version", "step", "loss", "steps/s", "heartbeat", "sent", "received",
                "rejected"):
        t.add_column(col)
    for w in snap["workers"]:
        age = w.get("heartbeat_age_s")
        t.add_row(w["id"], w.get("state", "-"), "yes" if w["alive"] else "[red]no[/]", str(w.get("version", "-")),
                  str(w.get("step", "-")), f"{w['loss']:.4f}" if w.get("loss") is not None else "-",
                  str(w.get("steps_per_s") or "-"), f"{age}s ago" if age is not None else "-",
                  _mb(w.get("bytes_sent")), _mb(w.get("bytes_received")), str(w["rejected"]))
    return t


def rounds_table(snap: dict[str, Any], last: int = 10) -> Table:
    t = Table(title="recent versions")
    for col in ("version", "workers", "loss", "eval loss", "round s", "bytes", "rejected", "aggregator"):
        t.add_column(col)
    for rd in snap["rounds"][-last:]:
        ev = rd.get("eval_loss")
        t.add_row(str(rd.get("version")), str(rd.get("n")), f"{rd['loss']:.4f}" if rd.get("loss") is not None else "-",
                  f"{ev:.4f}" if ev is not None else "-",
                  str(rd.get("duration_s")), _mb(rd.get("bytes")), str(rd.get("rejected")), str(rd.get("aggregator")))
    return t


def status_view(snap: dict[str, Any]) -> Group:
    parts: list[Any] = [header(snap)]
    rnd = snap.get("round")
    if rnd and rnd.get("version") == snap["version"]:
        why = f": waiting for {rnd['waiting']}" if rnd.get("waiting") else ""
        parts.append(Text(f"round for version {rnd['version']}: {rnd.get('phase')}, {rnd.get('accepted')} accepted "
                          f"of {rnd.get('live')} live workers{why}"))
    parts += [workers_table(snap), rounds_table(snap)]
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
