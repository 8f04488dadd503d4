"""Work units: fixed sets of samples, claimed from Redis bitfields, committed exactly once.

A dataset of `length` samples is cut into `num_units = ceil(length / unit_samples)` units. In the
default `strided` layout unit u holds samples u, u + num_units, u + 2*num_units, ... (U of them,
indices past the end wrapping to the start so every unit has U samples): one unit's samples come
from U evenly spaced places in the dataset, not from one stretch of it. Neighbouring samples of a
text corpus are strongly correlated, and with contiguous units a worker's whole round came from a
few stretches of text, which made its pseudo-gradient biased (docs/benchmarks.md measures it).
The `contiguous` layout (unit u = samples [u*U, (u+1)*U)) is what runs created before the strided
layout use; their units meta has no `layout` field.

Each epoch visits the units in a seeded permutation, and bit i of the epoch's bitmaps is
the i-th unit of that order, so progress reads as a prefix. Per (dataset, epoch) Redis holds a
`claimed` and a `done` bitmap, a lease sorted set and an owners hash; all changes go through the
Lua scripts in `diloco.scripts`. A unit becomes done only in the commit script.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from dataclasses import dataclass

import redis
import torch

from diloco import keys
from diloco.config import RunConfig
from diloco.errors import RunNotFound
from diloco.scripts import Scripts

Unit = tuple[int, int]  # (epoch, bit)
STRIDED, CONTIGUOUS = "strided", "contiguous"
LAYOUTS = (STRIDED, CONTIGUOUS)


@dataclass(frozen=True)
class UnitPlan:
    dataset: str
    length: int
    unit_samples: int
    seed: int
    layout: str = STRIDED

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown work unit layout {self.layout!r} (known: {', '.join(LAYOUTS)})")

    @property
    def num_units(self) -> int:
        return math.ceil(self.length / self.unit_samples)

    def meta(self) -> dict[str, str]:
        """The units meta hash of a new run."""
        return {"num_units": str(self.num_units), "unit_samples": str(self.unit_samples),
                "length": str(self.length), "layout": self.layout, "epoch_lo": "0", "epoch_hi": "0"}

    @functools.lru_cache(maxsize=4)  # noqa: B019 (plans are few and long-lived)
    def order(self, epoch: int) -> torch.Tensor:
        key = f"{self.seed}:{self.dataset}:{epoch}".encode()
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        return torch.randperm(self.num_units, generator=g)

    def samples(self, unit: Unit) -> list[int]:
        epoch, bit = unit
        u = int(self.order(epoch)[bit])
        if self.layout == STRIDED:
            return [(u + j * self.num_units) % self.length for j in range(self.unit_samples)]
        start = u * self.unit_samples
        return [(start + j) % self.length for j in range(self.unit_samples)]


def plan_for(r: redis.Redis, cfg: RunConfig) -> UnitPlan:
    meta = r.hgetall(keys.units_meta(cfg.run, cfg.dataset_id))
    if not meta:
        raise RunNotFound(f"run {cfg.run!r} has no work units for dataset {cfg.dataset_id}")
    return UnitPlan(cfg.dataset_id, int(meta["length"]), int(meta["unit_samples"]), cfg.seed,
                    meta.get("layout", CONTIGUOUS))


def units_per_round(cfg: RunConfig, inner_steps: int | None = None) -> int:
    """Units of a round of `inner_steps` optimizer steps (default `sync_every`; DyLU trains fewer)."""
    steps = cfg.sync_every if inner_steps is None else inner_steps
    return steps * cfg.grad_accum * cfg.batch_size // cfg.unit_samples


def by_epoch(units: list[Unit]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e, b in units:
        out.setdefault(e, []).append(b)
    return out


class Leases:
    """The units one worker holds: claimed for a round, renewed while alive, given back if not committed."""

    def __init__(self, r: redis.Redis, run: str, plan: UnitPlan, worker: str, lease_ms: int) -> None:
        self.r, self.run, self.plan, self.worker, self.lease_ms = r, run, plan, worker, lease_ms
        self.scripts = Scripts(r)
        self.held: list[Unit] = []
        self._lock = threading.Lock()  # the heartbeat thread renews while the main thread claims

    def claim(self, want: int, stop: threading.Event, *, keep: bool = False) -> list[Unit] | None:
        """Claim exactly `want` units in one script call; None if stopped first.

        A claim never waits: it takes free units of the open epochs, oldest first, and opens the next
        epoch when they run short (docs/architecture.md, "Work units", argues why that cannot stall).
        Units still held from a round that an outage or a wipe interrupted are given back first, unless
        `keep` (streaming: the previous interval's units wait for their fragment's commit meanwhile).
        """
        if self.held and not keep:
            self.release()
        while not stop.is_set():
            lo, hi = self.r.hmget(keys.units_meta(self.run, self.plan.dataset), "epoch_lo", "epoch_hi")
            if lo is None or hi is None:  # Redis lost the run (wiped): the caller waits for `diloco recover`
                raise RunNotFound(f"run {self.run!r} has no work units in Redis (was it wiped?)")
            got = self.scripts.claim_units(self.run, self.plan.dataset, int(lo), int(hi), want, self.worker,
                                           self.lease_ms)
            if got is not None:  # None: another claim moved epoch_lo or epoch_hi; read them again
                with self._lock:
                    self.held = [*self.held, *got] if keep else list(got)
                return got
        return None

    def renew(self) -> None:
        with self._lock:
            held = list(self.held)
        for epoch, bits in by_epoch(held).items():
            self.scripts.renew_units(self.run, self.plan.dataset, epoch, self.worker, bits, self.lease_ms)

    def forget(self) -> None:
        """Drop every held unit without telling Redis: their leases died with it (a wipe)."""
        with self._lock:
            self.held = []

    def release(self, only: list[Unit] | None = None) -> int:
        """Give back every held unit (or those of `only`) that is not done (done ones are simply forgotten)."""
        with self._lock:
            if only is None:
                held, self.held = self.held, []
            else:
                gone = set(only)
                held = [u for u in self.held if u in gone]
                self.held = [u for u in self.held if u not in gone]
        return sum(self.scripts.release_units(self.run, self.plan.dataset, e, self.worker, bits)
                   for e, bits in by_epoch(held).items())


def report(r: redis.Redis, cfg: RunConfig) -> dict:
    """Per epoch: total, claimed, done, leases (unit, worker, seconds left) and an ETA from recent rounds."""
    plan = plan_for(r, cfg)
    meta = r.hgetall(keys.units_meta(cfg.run, plan.dataset))
    lo, hi, n = int(meta["epoch_lo"]), int(meta["epoch_hi"]), plan.num_units
    now_s, now_us = r.time()
    now_ms = now_s * 1000 + now_us // 1000
    rate = _units_per_second(r, cfg.lanes)
    epochs = []
    for e in range(lo, hi + 1):
        pipe = r.pipeline(transaction=False)
        pipe.bitcount(keys.units_claimed(cfg.run, plan.dataset, e), 0, n - 1, "BIT")
        pipe.bitcount(keys.units_done(cfg.run, plan.dataset, e), 0, n - 1, "BIT")
        pipe.zrange(keys.units_leases(cfg.run, plan.dataset, e), 0, -1, withscores=True)
        pipe.hgetall(keys.units_owners(cfg.run, plan.dataset, e))
        claimed, done, leases, owners = pipe.execute()
        leased = [{"unit": int(u), "worker": owners.get(u), "expires_in_s": round((exp - now_ms) / 1000, 1)}
                  for u, exp in leases]
        eta = round((n - done) / rate, 1) if rate else None
        epochs.append({"epoch": e, "total": n, "claimed": claimed, "done": done, "leased": leased, "eta_s": eta})
    return {"run": cfg.run, "dataset": plan.dataset, "samples": plan.length, "unit_samples": plan.unit_samples,
            "num_units": n, "epoch_lo": lo, "epoch_hi": hi, "units_per_s": rate, "epochs": epochs}


def _units_per_second(r: redis.Redis, lanes: list[str], last: int = 10) -> float | None:
    """Units committed per second over the last few versions (of every fragment's, with fragments;
    Redis clock), or None if unknown."""
    entries = sorted((f for lane in lanes for _, f in r.xrevrange(keys.versions(lane), count=last)),
                     key=lambda f: int(f["committed_ms"]), reverse=True)[:last]
    if len(entries) < 2:
        return None
    done = sum(int(f.get("units", 0)) for f in entries[:-1])
    span_ms = int(entries[0]["committed_ms"]) - int(entries[-1]["committed_ms"])
    return round(done * 1000 / span_ms, 3) if span_ms > 0 else None
