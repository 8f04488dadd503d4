"""Dynamic Local Updates (DyLU, Liu et al. 2024, arXiv 2401.09135): a slower worker trains fewer inner
steps per round, so its delta is not staler than a fast worker's.

With `dylu` on (either mode; in a sync round the slow workers then finish about when the fast ones do,
instead of everyone waiting for them), a worker's H for a round is

    max(h_min, floor(sync_every * its steps/s / the fastest live worker's steps/s))

read at the start of the round from the live workers' heartbeat stat `steps_per_s` (the rate of
their last round's steps). A worker with no measured rate yet, or no live worker with one, trains
`sync_every`. The worker publishes its H in its stats (`inner_steps`) and announces the steps it
trained; the aggregator accepts `h_min <= inner_steps <= sync_every` with units to match.
"""

from __future__ import annotations

import math

import redis

from diloco import runs
from diloco.config import RunConfig


def inner_steps(cfg: RunConfig, own: float | None, others: list[float]) -> int:
    """This worker's H for the round from its own rate and the other live workers' (steps/s)."""
    if not cfg.dylu or own is None or own <= 0:
        return cfg.sync_every
    fastest = max([own, *(s for s in others if math.isfinite(s) and s > 0)])
    return max(cfg.h_min, min(cfg.sync_every, math.floor(cfg.sync_every * own / fastest)))


def speeds(r: redis.Redis, run: str) -> dict[str, float]:
    """steps/s of each live worker that has measured one, in one pipelined read."""
    out = {}
    for w, raw in runs.live_worker_stat(r, run, "steps_per_s").items():
        try:
            if raw:
                out[w] = float(raw)
        except ValueError:  # a stat is a worker's word, not a number we trust
            continue
    return out


def allowed_steps(cfg: RunConfig, steps: int) -> str | None:
    """Why an announcement's `inner_steps` cannot count, or None."""
    if cfg.dylu:
        if not cfg.h_min <= steps <= cfg.sync_every:
            return f"trained {steps} inner steps, outside DyLU's [h_min {cfg.h_min}, sync_every {cfg.sync_every}]"
        return None
    if cfg.is_streaming:   # a fragment's announcement carries the steps since the previous fragment's
        interval = cfg.sync_every // cfg.num_fragments
        if steps != interval:
            return (f"trained {steps} inner steps, the run syncs a fragment every {interval} "
                    "(sync_every / num_fragments)")
        return None
    if steps != cfg.sync_every:
        return f"trained {steps} inner steps, the run's sync_every is {cfg.sync_every}"
    return None
