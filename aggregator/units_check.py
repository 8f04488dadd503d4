"""Checks of an announcement's work units before its delta is reduced.

Cheap reads first: the count, the ranges, and whether each unit is done or leased to another
worker (a unit leased to nobody counts: see the COMMIT script). The commit script checks ownership
again atomically; this pass only keeps a doomed delta from costing a download and a retried commit.
"""

from __future__ import annotations

import redis

from diloco import keys
from diloco.config import RunConfig
from diloco.errors import RunNotFound
from diloco.messages import Announcement
from diloco.units import UnitPlan, by_epoch, units_per_round


def units_problem(r: redis.Redis, cfg: RunConfig, plan: UnitPlan, ann: Announcement) -> str | None:
    """Why the announcement's units cannot be committed, or None."""
    want = units_per_round(cfg, ann.inner_steps)   # sync_every, unless DyLU (checked before)
    if len(ann.units) != want:
        return f"lists {len(ann.units)} work units, a round trains on {want}"
    meta = r.hmget(keys.units_meta(cfg.run, plan.dataset), "epoch_lo", "epoch_hi")
    if None in meta:   # Redis wiped (or being recovered) under the round: not the worker's fault
        raise RunNotFound(f"run {cfg.run!r} has no work-unit window for dataset {plan.dataset}")
    lo, hi = int(meta[0]), int(meta[1])
    for epoch, bit in ann.units:
        if not lo <= epoch <= hi or not 0 <= bit < plan.num_units:
            return f"work unit {epoch}:{bit} is out of range (epochs {lo}..{hi}, {plan.num_units} units)"
    pipe = r.pipeline(transaction=False)
    grouped = by_epoch(list(ann.units))
    for epoch, bits in grouped.items():
        pipe.hmget(keys.units_owners(cfg.run, plan.dataset, epoch), bits)
        for b in bits:
            pipe.getbit(keys.units_done(cfg.run, plan.dataset, epoch), b)
    replies = iter(pipe.execute())
    for epoch, bits in grouped.items():
        owners = next(replies)
        for b, owner in zip(bits, owners, strict=True):
            if next(replies):
                return f"work unit {epoch}:{b} is already done"
            if owner is not None and owner != ann.worker:
                return f"work unit {epoch}:{b} is leased to {owner}, not to {ann.worker} (its lease ended)"
    return None
