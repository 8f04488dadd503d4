"""Storage retention: which objects of a run may go, and deleting them (`diloco gc`).

Every committed version leaves a weights, a momentum and a snapshot object, and every round leaves
its workers' delta shards; without retention the store grows without bound. The rules (settings
of the run config, changeable on a live run since workers never read them):

* weights, momentum and snapshot of a version are kept or deleted together. Kept: version 0
  (replay and a fresh start begin there), the last `keep_last` versions up to the head, every
  `keep_every`-th version (0 = none), the version of the newest snapshot (so `diloco recover`
  always has a usable snapshot, even if the head's own was never written), and every version above
  the head (an aggregator may be writing it right now). The head's objects are never deleted.
* orphans: a weights or momentum object of a committed version (<= head) whose key is not the
  committed one, i.e. written by an aggregator that lost the lock before committing. Deleted
  whatever the version; for a kept version whose committed key is unknown (the versions stream
  no longer holds it), all its objects are kept.
* delta shards: everything under `deltas/v{base}/` once version base+1 was committed more than
  `delta_grace_s` ago, whether the shards were included, rejected or dropped.
* published updates (diloco/update.py): everything under `updates/v{v}/` once version v+1 was
  committed more than `delta_grace_s` ago; only a worker holding v-1 while v is the head reads it
  (a worker further behind downloads the full weights).

Replay (`diloco.replay`) recomputes every version from v0 and the committed deltas, so once the
grace period has passed it can no longer replay the versions whose deltas are gone; within the
grace period it still can. Export (`diloco export`) reads only kept versions.

`plan()` decides from the head, the versions stream and a listing of the store, without deleting;
`apply()` deletes. Both are safe to run while the run goes on, and from several processes at once:
nothing a live process still needs is in a plan, and deleting is idempotent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import redis

from diloco import keys, runs
from diloco.connect import server_time_ms
from diloco.errors import ObjectMissing
from diloco.messages import Head
from diloco.store import ObjectStore

KINDS = ("snapshots", "weights", "momentum", "deltas", "updates")   # also the deletion order (see apply)
_DIRS = {"state": "snapshots", "weights": "weights", "momentum": "momentum", "deltas": "deltas", "updates": "updates"}
_SINGULAR = {"snapshots": "snapshot", "weights": "weights", "momentum": "momentum"}
_TENSORS = re.compile(r"^v(\d{8})-t(\d+)\.safetensors$")
_SNAPSHOT = re.compile(r"^v(\d{8})\.msgpack$")
_DELTA_DIR = re.compile(r"^v(\d{8})$")
_PAGE = 1000


class Doomed(NamedTuple):
    """One object a plan deletes, and why (shown by `diloco gc --verbose`)."""

    key: str
    reason: str


@dataclass(frozen=True)
class Policy:
    keep_last: int
    keep_every: int
    delta_grace_s: float


@dataclass(frozen=True)
class Committed:
    """What the run committed for one version: its object keys and when (Redis clock, ms)."""

    weights: str | None
    momentum: str | None
    committed_ms: int | None


@dataclass
class Summary:
    """Objects and bytes per kind; bytes are None where they were not measured."""

    count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    nbytes: dict[str, int] | None = None

    @property
    def total(self) -> int:
        return sum(self.count.values())

    @property
    def total_bytes(self) -> int | None:
        return None if self.nbytes is None else sum(self.nbytes.values())

    def lines(self) -> list[str]:
        out = []
        for kind in KINDS:
            size = "" if self.nbytes is None else f"  {_human(self.nbytes[kind])}"
            out.append(f"  {kind:<10} {self.count[kind]:>7} objects{size}")
        size = "" if self.nbytes is None else f"  {_human(self.total_bytes or 0)}"
        out.append(f"  {'total':<10} {self.total:>7} objects{size}")
        return out

    def describe(self) -> str:
        parts = [f"{self.count[k]} {k}" for k in KINDS if self.count[k]]
        size = "" if self.nbytes is None else f", {_human(self.total_bytes or 0)}"
        return (", ".join(parts) or "nothing") + size


def kind_of(key: str) -> str:
    """'weights', 'momentum', 'snapshots', 'deltas' or 'updates' for a key under runs/{run}/."""
    parts = key.split("/")
    if len(parts) > 4 and re.fullmatch(r"f\d+", parts[2]):  # a fragment's objects: runs/{run}/f{i}/...
        parts = parts[:2] + parts[3:]
    kind = _DIRS.get(parts[2]) if len(parts) > 3 and parts[0] == "runs" else None
    if kind is None:
        raise ValueError(f"{key!r} is not a run object retention handles")
    return kind


# --- deciding ----------------------------------------------------------------------------------

def plan(r: redis.Redis, store: ObjectStore, run: str, *, now_ms: int | None = None) -> list[Doomed]:
    """What retention would delete now, per the run's settings. Deletes nothing."""
    cfg = runs.load_config(r, run)
    # The head first, then the listing: whatever an aggregator writes meanwhile is above this head
    # (kept), and a version committed meanwhile only moves the kept window forward.
    head = runs.read_head(r, run)
    committed = committed_versions(r, run, head)
    now = server_time_ms(r) if now_ms is None else now_ms
    listing = [key for d in _DIRS for key in store.list(f"{keys.run_prefix(run)}{d}/")]
    policy = Policy(cfg.keep_last, cfg.keep_every, cfg.delta_grace_s)
    return decide(run, head, committed, listing, policy, now)


def committed_versions(r: redis.Redis, run: str, head: Head) -> dict[int, Committed]:
    """Version -> its committed keys and time, from the versions stream, v0 and the head."""
    out = {0: Committed(keys.weights_object(run, 0, 0), keys.momentum_object(run, 0, 0), None)}
    last = "-"
    while True:
        page = r.xrange(keys.versions(run), min=last, max="+", count=_PAGE)
        for entry_id, fields in page if last == "-" else page[1:]:
            last = entry_id
            try:
                version, ms = int(fields["version"]), int(fields["committed_ms"])
            except (KeyError, ValueError):
                continue  # not a commit entry we can read: its version's objects stay
            if version <= head.version:
                out[version] = Committed(fields.get("weights"), fields.get("momentum"), ms)
        if len(page) < _PAGE:
            break
    out[head.version] = Committed(head.weights, head.momentum, head.committed_ms)
    return out


def kept_versions(head: int, policy: Policy, newest_snapshot: int | None) -> set[int]:
    """The versions <= head whose weights, momentum and snapshot retention keeps."""
    kept = {0, head, *range(max(0, head - policy.keep_last + 1), head + 1)}
    if policy.keep_every > 0:
        kept.update(range(0, head + 1, policy.keep_every))
    if newest_snapshot is not None and newest_snapshot <= head:
        kept.add(newest_snapshot)
    return kept


def decide(run: str, head: Head, committed: dict[int, Committed], listing: Iterable[str], policy: Policy,
           now_ms: int) -> list[Doomed]:
    """The pure decision: the objects in `listing` that retention deletes, each with its reason."""
    prefix = keys.run_prefix(run)
    parsed: list[tuple[str, str, int, str]] = []   # (key, kind, version, file name)
    for key in listing:
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix):].split("/")
        kind = _DIRS.get(parts[0])
        if kind in ("deltas", "updates"):
            m = _DELTA_DIR.match(parts[1]) if len(parts) > 2 else None
        elif kind == "snapshots":
            m = _SNAPSHOT.match(parts[1]) if len(parts) == 2 else None
        elif kind is not None:
            m = _TENSORS.match(parts[1]) if len(parts) == 2 else None
        else:
            m = None
        if m is not None:  # anything else is not ours to judge, and stays
            parsed.append((key, kind, int(m.group(1)), parts[1]))
    snapshots = [v for _, kind, v, _ in parsed if kind == "snapshots" and v <= head.version]
    kept = kept_versions(head.version, policy, max(snapshots, default=None))
    commit_ms = _commit_times({**committed, head.version: Committed(
        head.weights, head.momentum, head.committed_ms)})

    doomed = []
    for key, kind, version, _name in parsed:
        if kind in ("deltas", "updates"):  # the update to v is read while v is the head, as deltas of base v
            what = f"deltas of base v{version}" if kind == "deltas" else f"update to v{version}"
            reason = _delta_reason(version, head.version, commit_ms, policy.delta_grace_s, now_ms, what)
        elif version > head.version:
            reason = None   # not committed (yet): an aggregator may be writing it
        elif version not in kept:
            reason = (f"{_SINGULAR[kind]} of v{version}: not kept (keep_last {policy.keep_last}, "
                      f"keep_every {policy.keep_every}, head v{head.version})")
        elif kind == "snapshots":
            reason = None
        else:
            want = getattr(committed.get(version), kind, None)
            reason = None if want is None or key == want else \
                f"orphan {kind} of v{version}: committed object is {want.rsplit('/', 1)[-1]}"
        if reason is not None:
            doomed.append(Doomed(key, reason))
    return doomed


def _commit_times(committed: dict[int, Committed]) -> list[tuple[int, int]]:
    """(version, committed_ms) of the versions whose commit time is known, ascending."""
    return sorted((v, c.committed_ms) for v, c in committed.items() if c.committed_ms is not None)


def _delta_reason(base: int, head: int, commit_ms: list[tuple[int, int]], grace_s: float, now_ms: int,
                  what: str) -> str | None:
    if base >= head:
        return None  # the open round (or a later one): workers are uploading
    # Version base+1 was committed no later than the first version >= base+1 whose time is known
    # (the stream may no longer hold base+1: trimmed, or restored from a snapshot); the head is.
    consumed_ms = next(ms for v, ms in commit_ms if v >= base + 1)
    age_s = (now_ms - consumed_ms) / 1000
    if age_s <= grace_s:
        return None
    return f"{what}: v{base + 1} committed {age_s:.0f}s ago (grace {grace_s:g}s)"


# --- deleting ----------------------------------------------------------------------------------

def measure(store: ObjectStore, doomed: list[Doomed], *, pool: Executor | None = None) -> Summary:
    """Counts and bytes per kind of what `doomed` names, deleting nothing (for --dry-run)."""
    return _run(store, doomed, delete=False, sizes=True, pool=pool)


def apply(store: ObjectStore, doomed: list[Doomed], *, sizes: bool = True, pool: Executor | None = None) -> Summary:
    """Delete what `doomed` names; returns counts (and, with `sizes`, bytes) per kind.

    Snapshots go first, then weights and momentum, then deltas and updates: if this stops midway, recover
    never meets a snapshot whose objects are half gone, and the next pass deletes the rest.
    """
    return _run(store, doomed, delete=True, sizes=sizes, pool=pool)


def _run(store: ObjectStore, doomed: list[Doomed], *, delete: bool, sizes: bool, pool: Executor | None) -> Summary:
    summary = Summary(nbytes=dict.fromkeys(KINDS, 0) if sizes else None)
    by_kind: dict[str, list[str]] = {k: [] for k in KINDS}
    for item in doomed:
        by_kind[kind_of(item.key)].append(item.key)

    def one(key: str) -> int:
        size = 0
        if sizes:
            try:
                size = store.size(key)
            except ObjectMissing:
                return -1  # gone already (another gc): nothing to count
        if delete:
            store.delete(key)
        return size

    own = pool is None
    executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="gc") if own else pool
    try:
        for kind in KINDS:  # one kind after another, in the order the docstring of apply gives
            for size in executor.map(one, by_kind[kind]):
                if size < 0:
                    continue
                summary.count[kind] += 1
                if summary.nbytes is not None:
                    summary.nbytes[kind] += size
    finally:
        if own:
            executor.shutdown(wait=True)
    return summary


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
