"""A run's state in one snapshot: what `diloco status` prints, `--json` emits and `diloco monitor` shows.

The JSON keys are stable (documented in docs/architecture.md): run, version, config, head,
workers, rounds, lock, rejections, round, eval, units, control, server_time_ms.

One `read` is one pipelined round trip. What it cannot know before its own answers arrive (the
worker ids, the dataset id and the open epochs) comes from the previous read as `Known`, and the
answers say what the next read must cover: a worker that registers shows up one read later. The
monitor reads once per refresh; `snapshot` reads until nothing new was learned (two or three times).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from diloco import keys
from diloco.config import RunConfig
from diloco.errors import RunNotFound
from diloco.messages import Head

_INT_STATS = ("step", "version", "bytes_sent", "bytes_received", "heartbeat_ms", "registered_ms", "inner_steps")
_FLOAT_STATS = ("loss", "steps_per_s", "lr")
_ROUND_INTS = ("version", "token", "n", "bytes", "rejected", "samples", "tokens", "committed_ms")
_ROUND_FLOATS = ("loss", "duration_s", "reduce_s", "aggregate_s")
_OPEN_ROUND_INTS = ("version", "accepted", "answered", "live", "min_workers", "deadline_ms", "rejected")


@dataclass(frozen=True)
class Known:
    """What one read learned that the next must ask for: worker ids, dataset id, open epochs."""

    workers: tuple[str, ...] = ()
    dataset: str = ""
    epochs: tuple[int, ...] = ()


def _num(value: str | None, kind: type) -> Any:
    try:
        return kind(value) if value not in (None, "") else None
    except ValueError:
        return None


def _typed(fields: dict[str, str], ints: tuple[str, ...], floats: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = dict(fields)
    out.update({k: _num(fields.get(k), int) for k in ints if k in fields})
    out.update({k: _num(fields.get(k), float) for k in floats if k in fields})
    return out


def units_rate(rounds: list[dict[str, Any]], last: int = 10) -> float | None:
    """Units committed per second over the last few versions (Redis clock), or None if unknown."""
    recent = rounds[-last:]
    if len(recent) < 2:
        return None
    done = sum(_num(rd.get("units"), int) or 0 for rd in recent[1:])
    span_ms = (recent[-1].get("committed_ms") or 0) - (recent[0].get("committed_ms") or 0)
    return round(done * 1000 / span_ms, 3) if span_ms > 0 else None


def read(r: redis.Redis, run: str, known: Known = Known(), *, rounds: int = 20,
         rejections: int = 10) -> tuple[dict[str, Any], Known]:
    """The snapshot from one pipeline (covering what `known` names), and what the next read should cover."""
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(keys.config(run))
    pipe.hgetall(keys.head(run))
    pipe.time()
    pipe.smembers(keys.workers(run))
    for w in known.workers:
        pipe.exists(keys.worker_alive(run, w))
        pipe.hgetall(keys.worker_stats(run, w))
        pipe.exists(keys.worker_kicked(run, w))
    pipe.hgetall(keys.rejected_counts(run))
    pipe.get(keys.lock(run))
    pipe.pttl(keys.lock(run))
    pipe.xrevrange(keys.versions(run), count=rounds)
    pipe.xrevrange(keys.rejections(run), count=rejections)
    pipe.xlen(keys.rejections(run))
    pipe.hgetall(keys.round_state(run))
    pipe.hgetall(keys.eval_losses(run))
    pipe.hgetall(keys.control(run))
    if known.dataset:
        pipe.hgetall(keys.units_meta(run, known.dataset))
        for e in known.epochs:
            pipe.bitcount(keys.units_claimed(run, known.dataset, e))
            pipe.bitcount(keys.units_done(run, known.dataset, e))
            pipe.zcard(keys.units_leases(run, known.dataset, e))
    answers = iter(pipe.execute())

    cfg_fields, head_fields, (sec, usec), members = (next(answers) for _ in range(4))
    if not cfg_fields:
        raise RunNotFound(
            f"run {run!r} does not exist in this Redis (no key {keys.config(run)}): "
            f"create it with `diloco init --run {run}`, or check --run and the Redis URL"
        )
    if not head_fields:
        raise RunNotFound(f"run {run!r} has a config but no version pointer {keys.head(run)}")
    cfg, head = RunConfig.from_fields(cfg_fields), Head.from_fields(head_fields)
    now = sec * 1000 + usec // 1000
    per_worker = {w: (next(answers), next(answers), next(answers)) for w in known.workers}
    rejected, lock, lock_ttl, versions, recent_rej, rej_total, round_state, evals, control = (
        next(answers) for _ in range(9))
    rounds_out = [_typed(f, _ROUND_INTS, _ROUND_FLOATS) | {"id": i, "eval_loss": _num(evals.get(f["version"]), float)}
                  for i, f in reversed(versions)]

    units, epochs = None, ()
    if known.dataset:
        meta = next(answers)
        counts = {e: (next(answers), next(answers), next(answers)) for e in known.epochs}
        if meta:
            units, epochs = _units(meta, counts, known.dataset, rounds_out), tuple(
                range(int(meta["epoch_lo"]), int(meta["epoch_hi"]) + 1))

    token, _, holder = (lock or "").partition(":")
    snap = {
        "run": run,
        "version": head.version,
        "config": dict(vars(cfg)),
        "head": vars(head),
        "workers": [_worker(w, *per_worker[w], rejected, now) for w in sorted(per_worker) if w in members],
        "rounds": rounds_out,
        "eval": {int(v): float(x) for v, x in evals.items()},
        "lock": {"holder": holder or None, "token": int(token) if token else None,
                 "ttl_ms": lock_ttl if lock else None},
        "rejections": {"total": int(rej_total), "by_worker": {k: int(v) for k, v in rejected.items()},
                       "recent": [f | {"id": i} for i, f in recent_rej]},
        "round": _typed(round_state, _OPEN_ROUND_INTS, ()) if round_state else None,
        "units": units,
        "control": control or None,
        "server_time_ms": now,
    }
    return snap, Known(tuple(sorted(members)), cfg.dataset_id, epochs)


def _worker(w: str, alive: int, stats: dict[str, str], kicked: int, rejected: dict[str, str],
            now: int) -> dict[str, Any]:
    entry = _typed(stats, _INT_STATS, _FLOAT_STATS)
    entry.update(id=w, alive=bool(alive), kicked=bool(kicked), rejected=int(rejected.get(w, 0)))
    hb = entry.get("heartbeat_ms")
    entry["heartbeat_age_s"] = round((now - hb) / 1000, 1) if isinstance(hb, int) else None
    entry.pop("nonce", None)
    return entry


def _units(meta: dict[str, str], counts: dict[int, tuple[int, int, int]], dataset: str,
           rounds: list[dict[str, Any]]) -> dict[str, Any]:
    n, rate = int(meta["num_units"]), units_rate(rounds)
    epochs = [{"epoch": e, "total": n, "claimed": claimed, "done": done, "leases": leases,
               "eta_s": round((n - done) / rate, 1) if rate else None}
              for e, (claimed, done, leases) in counts.items()]
    return {"dataset": dataset, "num_units": n, "epoch_lo": int(meta["epoch_lo"]), "epoch_hi": int(meta["epoch_hi"]),
            "units_per_s": rate, "epochs": epochs}


def snapshot(r: redis.Redis, run: str, *, rounds: int = 20, rejections: int = 10) -> dict[str, Any]:
    """A complete snapshot: read again while a read learns of workers or epochs it did not cover."""
    known = Known()
    for _ in range(4):
        snap, learned = read(r, run, known, rounds=rounds, rejections=rejections)
        if learned == known:
            break
        known = learned
    return snap
