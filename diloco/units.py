"""Work units: contiguous sample ranges, claimed from Redis bitfields, committed exactly once.

A dataset of `length` samples is cut into `num_units = ceil(length / unit_samples)` units; unit u
covers samples [u*U, (u+1)*U), the last one wrapping around to the start so every unit has U
samples. Each epoch visits the units in a seeded permutation, and bit i of the epoch's bitmaps is
the i-th unit of that order, so progress reads as a prefix. Per (dataset, epoch) Redis holds a
`claimed` and a `done` bitmap, a lease sorted set and an owners hash; all changes go through the
Lua scripts in `diloco.scripts`. A unit becomes done only in the commit script.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import threading
from dataclasses import dataclass

import redis
import torch

from diloco import keys
from diloco.config import RunConfig
from diloco.errors import RunNotFound
from diloco.scripts import Scripts

log = logging.getLogger(__name__)

Unit = tuple[int, int]  # (epoch, bit)


@dataclass(frozen=True)
class UnitPlan:
    dataset: str
    length: int
    unit_samples: int
    seed: int

    @property
    def num_units(self) -> int:
        return math.ceil(self.length / self.unit_samples)

    def meta(self) -> dict[str, str]:
        """The units meta hash of a new run."""
        return {"num_units": str(self.num_units), "unit_samples": str(self.unit_samples),
                "length": str(self.length), "epoch_lo": "0", "epoch_hi": "0"}

    @functools.lru_cache(maxsize=4)  # noqa: B019 (plans are few and long-lived)
    def order(self, epoch: int) -> torch.Tensor:
        key = f"{self.seed}:{self.dataset}:{epoch}".encode()
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        return torch.randperm(self.num_units, generator=g)

    def samples(self, unit: Unit) -> list[int]:
        epoch, bit = unit
        u = int(self.order(epoch)[bit])
        start = u * self.unit_samples
        return [(start + j) % self.length for j in range(self.unit_samples)]


def plan_for(r: redis.Redis, cfg: RunConfig) -> UnitPlan:
    meta = r.hgetall(keys.units_meta(cfg.run, cfg.dataset_id))
    if not meta:
        raise RunNotFound(f"run {cfg.run!r} has no work units for dataset {cfg.dataset_id}")
    return UnitPlan(cfg.dataset_id, int(meta["length"]), int(meta["unit_samples"]), cfg.seed)


def units_per_round(cfg: RunConfig) -> int:
    return cfg.sync_every * cfg.grad_accum * cfg.batch_size // cfg.unit_samples


def format_units(units: list[Unit]) -> str:
    return ",".join(f"{e}:{b}" for e, b in units)


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

    def claim(self, want: int, stop: threading.Event, poll_s: float = 0.5) -> list[Unit] | None:
        """Claim `want` units (waiting while all are leased to others); None if stopped first."""
        got: list[Unit] = []
        while len(got) < want:
            lo = int(self.r.hget(keys.units_meta(self.run, self.plan.dataset), "epoch_lo") or 0)
            new = self.scripts.claim_units(self.run, self.plan.dataset, lo, want - len(got), self.worker,
                                           self.lease_ms)
            if new:
                with self._lock:
                    self.held.extend(new)
                got.extend(new)
            elif new is not None:  # every unit of the open epochs is leased: wait for leases to end
                log.info("no free work unit; waiting for leases to end or be committed")
                if stop.wait(poll_s):
                    self.release()
                    return None
        return got

    def renew(self) -> None:
        with self._lock:
            held = list(self.held)
        for epoch, bits in by_epoch(held).items():
            self.scripts.renew_units(self.run, self.plan.dataset, epoch, self.worker, bits, self.lease_ms)

    def release(self) -> int:
        """Give back every held unit that is not done (done ones are simply forgotten)."""
        with self._lock:
            held, self.held = self.held, []
        return sum(self.scripts.release_units(self.run, self.plan.dataset, e, self.worker, bits)
                   for e, bits in by_epoch(held).items())
