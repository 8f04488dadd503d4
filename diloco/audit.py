"""The exactly-once audit of work units, from what Redis recorded.

Each committed version lists the stream ids of the announcements it included (`entries`); each
announcement lists its units. Every unit of an epoch must appear in exactly one committed
announcement, and the `done` bitmap must be exactly that set. Tests, the chaos run and benchmarks
check the invariant with this.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import redis

from diloco import keys
from diloco.config import RunConfig
from diloco.messages import Announcement
from diloco.units import Unit, plan_for


@dataclass
class Audit:
    committed: Counter          # unit -> number of committed announcements that trained on it
    done: set[Unit]             # units whose done bit is set
    num_units: int
    versions: int
    unresolved: list[str] = field(default_factory=list)  # announcement ids no longer in the stream (wiped)

    @property
    def twice(self) -> list[Unit]:
        return sorted(u for u, c in self.committed.items() if c > 1)

    def lost(self, epoch: int) -> list[int]:
        """Bits of a finished epoch that no committed delta trained on."""
        return [b for b in range(self.num_units) if (epoch, b) not in self.committed]

    @property
    def mismatched(self) -> list[Unit]:
        """Units whose done bit disagrees with the committed announcements."""
        return sorted(set(self.committed) ^ self.done)


def audit(r: redis.Redis, cfg: RunConfig, archive: dict[str, dict[str, str]] | None = None) -> Audit:
    """`archive` holds announcements (stream id -> fields) that a wipe took from the deltas stream."""
    plan = plan_for(r, cfg)
    committed: Counter = Counter()
    unresolved: list[str] = []
    versions = [(lane, v) for lane in cfg.lanes for v in r.xrange(keys.versions(lane))]  # every fragment's
    for lane, (_, fields) in versions:
        for entry_id in filter(None, fields.get("entries", "").split(",")):
            found = r.xrange(keys.deltas(lane), entry_id, entry_id)
            fields = found[0][1] if found else (archive or {}).get(entry_id)
            if fields is None:  # the deltas stream did not survive a wipe; the caller audits around it
                unresolved.append(entry_id)
                continue
            committed.update(Announcement.from_fields(fields).units)
    meta = r.hgetall(keys.units_meta(cfg.run, plan.dataset))
    # An epoch below epoch_lo is all done (the claim script moves epoch_lo only past a finished one);
    # a recovered Redis keeps only the bitmaps from epoch_lo on.
    lo = int(meta["epoch_lo"])
    done: set[Unit] = {(e, b) for e in range(lo) for b in range(plan.num_units)}
    for e in range(lo, int(meta["epoch_hi"]) + 1):
        pipe = r.pipeline(transaction=False)
        for b in range(plan.num_units):
            pipe.getbit(keys.units_done(cfg.run, plan.dataset, e), b)
        done.update((e, b) for b, bit in enumerate(pipe.execute()) if bit)
    return Audit(committed, done, plan.num_units, len(versions), unresolved)
