"""A run's state in one snapshot: what `diloco status` prints, `--json` emits and `diloco monitor` shows.

The JSON keys are stable (documented in docs/architecture.md): run, version, config, head,
workers, rounds, lock, rejections, round, eval, units, control, server_time_ms, and for a streaming
run `fragments` (each fragment's version, lock, last round and open round; the top-level head,
rounds, lock and round are fragment 0's).

One `read` is one pipelined round trip. What it cannot know before its own answers arrive (the
worker ids, the dataset id and the open epochs) comes from the previous read as `Known`, and the
answers say what the next read must cover: a worker that registers shows up one read later. The
monitor reads once per refresh; `snapshot` reads until nothing new was learned (two or three times).
"""

from __future__ import annotations

from collections import Counter
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
    lanes: tuple[str, ...] = ()   # a streaming run's fragments (diloco.keys.lane); () = the run itself


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
    lanes = known.lanes or (run,)
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(keys.config(run))
    for lane in lanes:
        pipe.hgetall(keys.head(lane))
    pipe.time()
    pipe.smembers(keys.workers(run))
    for w in known.workers:
        pipe.exists(keys.worker_alive(run, w))
        pipe.hgetall(keys.worker_stats(run, w))
        pipe.exists(keys.worker_kicked(run, w))
    for lane in lanes:
        pipe.hgetall(keys.rejected_counts(lane))
        pipe.get(keys.lock(lane))
        pipe.pttl(keys.lock(lane))
        pipe.xrevrange(keys.versions(lane), count=rounds)
        pipe.xrevrange(keys.rejections(lane), count=rejections)
        pipe.xlen(keys.rejections(lane))
        pipe.hgetall(keys.round_state(lane))
    pipe.hgetall(keys.eval_losses(run))
    pipe.hgetall(keys.control(run))
    if known.dataset:
        pipe.hgetall(keys.units_meta(run, known.dataset))
        for e in known.epochs:
            pipe.bitcount(keys.units_claimed(run, known.dataset, e))
            pipe.bitcount(keys.units_done(run, known.dataset, e))
            pipe.zcard(keys.units_leases(run, known.dataset, e))
    answers = iter(pipe.execute())

    cfg_fields = next(answers)
    head_fields = [next(answers) for _ in lanes]
    (sec, usec), members = next(answers), next(answers)
    if not cfg_fields:
        raise RunNotFound(
            f"run {run!r} does not exist in this Redis (no key {keys.config(run)}): "
            f"create it with `diloco init --run {run}`, or check --run and the Redis URL"
        )
    cfg = RunConfig.from_fields(cfg_fields)
    if tuple(cfg.lanes) != lanes:   # learned from the config: read again, covering the run's fragments
        return read(r, run, Known(known.workers, known.dataset, known.epochs, tuple(cfg.lanes)), rounds=rounds,
                    rejections=rejections)
    if not all(head_fields):
        raise RunNotFound(f"run {run!r} has a config but no version pointer {keys.head(lanes[0])}")
    heads = [Head.from_fields(f) for f in head_fields]
    now = sec * 1000 + usec // 1000
    per_worker = {w: (next(answers), next(answers), next(answers)) for w in known.workers}
    per_lane = [[next(answers) for _ in range(7)] for _ in lanes]
    evals, control = next(answers), next(answers)
    # lane 0 is the run's own (with fragments, fragment 0: it syncs last in each cycle, so it is the least
    # advanced); the others show in `fragments`
    rejected, lock, lock_ttl, versions, recent_rej, rej_total, round_state = per_lane[0]
    head = heads[0]
    rounds_out = [_typed(f, _ROUND_INTS, _ROUND_FLOATS) | {"id": i, "eval_loss": _num(evals.get(f["version"]), float)}
                  for i, f in reversed(versions)]
    fragments = [_fragment(f, h, *state) for f, (h, state) in enumerate(zip(heads, per_lane, strict=True))]
    if len(lanes) > 1:
        rejected = dict(sum((Counter({w: int(n) for w, n in st[0].items()}) for st in per_lane), Counter()))
        rej_total = sum(int(st[5]) for st in per_lane)
        recent_rej = sorted((x for st in per_lane for x in st[4]), key=lambda x: _stream_order(x[0]),
                            reverse=True)[:rejections]

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
    if len(lanes) > 1:
        snap["fragments"] = fragments
    return snap, Known(tuple(sorted(members)), cfg.dataset_id, epochs, lanes if len(lanes) > 1 else ())


def _stream_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _fragment(f: int, head: Head, rejected: dict[str, str], lock: str | None, lock_ttl: int,
              versions: list, recent_rej: list, rej_total: int, round_state: dict[str, str]) -> dict[str, Any]:
    """One fragment's lane of a streaming run: its version, lock holder, last commit and open round."""
    token, _, holder = (lock or "").partition(":")
    last = _typed(versions[0][1], _ROUND_INTS, _ROUND_FLOATS) if versions else None
    return {"fragment": f, "version": head.version, "committed_ms": head.committed_ms,
            "lock": {"holder": holder or None, "token": int(token) if token else None,
                     "ttl_ms": lock_ttl if lock else None},
            "last_round": last, "rejected": int(rej_total),
            "round": _typed(round_state, _OPEN_ROUND_INTS, ()) if round_state else None}


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
