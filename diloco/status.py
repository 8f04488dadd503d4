"""A run's state in one snapshot: what `diloco status` prints and `--json` emits.

The JSON keys are stable (documented in docs/architecture.md): run, version, config, head,
workers, rounds, lock, rejections, round, eval, server_time_ms.
"""

from __future__ import annotations

from typing import Any

import redis

from diloco import keys, runs
from diloco.config import RunConfig
from diloco.connect import server_time_ms

_INT_STATS = ("step", "version", "bytes_sent", "bytes_received", "heartbeat_ms", "registered_ms")
_FLOAT_STATS = ("loss", "steps_per_s")
_ROUND_INTS = ("version", "token", "n", "bytes", "rejected", "samples", "tokens", "committed_ms")
_ROUND_FLOATS = ("loss", "duration_s", "reduce_s", "aggregate_s")


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


def snapshot(r: redis.Redis, run: str, *, rounds: int = 20, rejections: int = 10) -> dict[str, Any]:
    cfg: RunConfig = runs.load_config(r, run)
    head = runs.read_head(r, run)
    now = server_time_ms(r)
    ids = sorted(r.smembers(keys.workers(run)))
    pipe = r.pipeline(transaction=False)
    for w in ids:
        pipe.exists(keys.worker_alive(run, w))
        pipe.hgetall(keys.worker_stats(run, w))
    pipe.hgetall(keys.rejected_counts(run))
    pipe.get(keys.lock(run))
    pipe.pttl(keys.lock(run))
    pipe.xrevrange(keys.versions(run), count=rounds)
    pipe.xrevrange(keys.rejections(run), count=rejections)
    pipe.xlen(keys.rejections(run))
    pipe.hgetall(keys.round_state(run))
    pipe.hgetall(keys.eval_losses(run))
    *per_worker, rejected, lock, lock_ttl, versions, recent_rej, rej_total, round_state, evals = pipe.execute()
    workers = []
    for i, w in enumerate(ids):
        alive, stats = per_worker[2 * i], per_worker[2 * i + 1]
        entry = _typed(stats, _INT_STATS, _FLOAT_STATS)
        entry.update(id=w, alive=bool(alive), rejected=int(rejected.get(w, 0)))
        hb = entry.get("heartbeat_ms")
        entry["heartbeat_age_s"] = round((now - hb) / 1000, 1) if isinstance(hb, int) else None
        entry.pop("nonce", None)
        workers.append(entry)
    token, _, holder = (lock or "").partition(":")
    return {
        "run": run,
        "version": head.version,
        "config": {k: v for k, v in vars(cfg).items()},
        "head": vars(head),
        "workers": workers,
        "rounds": [_typed(f, _ROUND_INTS, _ROUND_FLOATS) | {"id": i, "eval_loss": _num(evals.get(f["version"]), float)}
                   for i, f in reversed(versions)],
        "eval": {int(v): float(x) for v, x in evals.items()},
        "lock": {"holder": holder or None, "token": int(token) if token else None,
                 "ttl_ms": lock_ttl if lock else None},
        "rejections": {"total": int(rej_total), "by_worker": {k: int(v) for k, v in rejected.items()},
                       "recent": [f | {"id": i} for i, f in recent_rej]},
        "round": _typed(round_state, ("version", "accepted", "answered", "live", "min_workers", "deadline_ms",
                                      "rejected"), ()) if round_state else None,
        "server_time_ms": now,
    }
