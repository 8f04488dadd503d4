"""Every Redis key and object-store key name of a run, in one place.

Redis keys carry the hash tag `{run}` so all of one run's keys share a Redis Cluster slot.
Object keys are named so that sorting them sorts by version (`v00000042`). A test pins the names:
operators read them with redis-cli and the docs list them, so they must not drift.

A *lane* is what one aggregator lock serves: the run itself, or with streaming fragments
(`num_fragments` > 1) one fragment of it, written `run@f2` (`lane()`). A fragment's round state
(head, deltas, versions, rejections, round, lock) lives under `diloco:{run}:f2:...` and its objects
under `runs/{run}/f2/`; the run's own state (config, control, workers, work units, eval) has one key
whatever lane names it, so code serving a lane may pass the lane wherever a run is asked for.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, value: str) -> str:
    """Run names and worker ids appear in keys; keep them to a safe alphabet."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"invalid {kind} {value!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit"
        )
    return value


def lane(run: str, fragment: int | None) -> str:
    """The lane of `fragment` of `run` (None: the run itself, no fragments)."""
    return run if fragment is None else f"{run}@f{fragment}"


def split_lane(lane_: str) -> tuple[str, int | None]:
    """(run, fragment or None) of a lane."""
    run, sep, frag = lane_.partition("@f")
    return (run, int(frag)) if sep else (run, None)


def _k(lane_: str, *parts: str) -> str:
    """A run-wide key: the same for the run and every lane of it."""
    return ":".join(("diloco", "{" + split_lane(lane_)[0] + "}", *parts))


def _lk(lane_: str, *parts: str) -> str:
    """A lane's own key: the run's for the run itself, `...:f{i}:...` for fragment i."""
    run, frag = split_lane(lane_)
    return _k(run, *parts) if frag is None else _k(run, f"f{frag}", *parts)


# --- Redis -------------------------------------------------------------------------------------

def config(run: str) -> str:
    """Hash: the run's group-wide settings (diloco.config.RunConfig)."""
    return _k(run, "config")


def head(run: str) -> str:
    """Hash: the committed version pointer and what it points at; written by the init and commit scripts and
    by `diloco recover` (which also resets `deltas_since`)."""
    return _lk(run, "head")


def deltas(run: str) -> str:
    """Stream: workers' announcements of uploaded pseudo-gradients."""
    return _lk(run, "deltas")


def versions(run: str) -> str:
    """Stream: one entry per committed version, with the round's stats."""
    return _lk(run, "versions")


def rejections(run: str) -> str:
    """Stream: every rejected announcement with its reason."""
    return _lk(run, "rejections")


def rejected_counts(run: str) -> str:
    """Hash: worker id -> number of its announcements rejected."""
    return _lk(run, "rejected")


def round_state(run: str) -> str:
    """Hash: the open round as the aggregator sees it (version, phase, accepted, answered, live, min_workers,
    deadline_ms, waiting, rejected)."""
    return _lk(run, "round")


def eval_losses(run: str) -> str:
    """Hash: version -> held-out loss, written by `diloco eval`."""
    return _k(run, "eval")


def control(run: str) -> str:
    """Hash: `state` (running, paused, stopped) and `reason`, set by `diloco control` or a budget."""
    return _k(run, "control")


def audit(run: str) -> str:
    """Stream: every operator command (who, what, when)."""
    return _k(run, "audit")


def rejected_entries(run: str) -> str:
    """Set: deltas-stream ids already rejected, so a round redone after a crash counts each once."""
    return _lk(run, "rejected", "entries")


def lock(run: str) -> str:
    """String with TTL: the aggregator lock; value '<token>:<aggregator id>'."""
    return _lk(run, "lock")


def lock_token(run: str) -> str:
    """Counter: the fencing tokens handed out with the lock."""
    return _lk(run, "lock", "token")


def recovered(run: str) -> str:
    """String: a fresh id `diloco recover` writes with each recovery. A streaming worker that sees it change
    reloads every fragment: any of them may have gone back, not only the one it waits on."""
    return _k(run, "recovered")


def workers(run: str) -> str:
    """Set: every worker id that ever registered."""
    return _k(run, "workers")


def worker_alive(run: str, worker: str) -> str:
    """String with TTL: present while the worker heartbeats; value is its session nonce."""
    return _k(run, "worker", worker, "alive")


def worker_kicked(run: str, worker: str) -> str:
    """String with TTL: set by `diloco control kick`; the worker exits and may not rejoin until it expires."""
    return _k(run, "worker", worker, "kicked")


def worker_stats(run: str, worker: str) -> str:
    """Hash: the worker's latest stats (step, loss, steps/s, lr, version, bytes sent/received...)."""
    return _k(run, "worker", worker)


def datasets(run: str) -> str:
    """Hash: dataset id -> number of samples, snapshotted at first registration."""
    return _k(run, "datasets")


def units_meta(run: str, dataset: str) -> str:
    """Hash: num_units, unit_samples, length, layout, epoch_lo (oldest epoch not all done), epoch_hi (newest opened)."""
    return _k(run, "units", dataset)


def units_claimed(run: str, dataset: str, epoch: int) -> str:
    """Bitmap: bit i set = the i-th unit of the epoch's order is claimed (leased or done)."""
    return _k(run, "units", dataset, str(epoch), "claimed")


def units_done(run: str, dataset: str, epoch: int) -> str:
    """Bitmap: bit i set = the i-th unit is in a committed version. Set only by the commit script.

    Outside the `units:` namespace on purpose: workers may write `units:*` (claims, leases) but
    only read `done:*`, which a Redis ACL can express with key patterns.
    """
    return _k(run, "done", dataset, str(epoch))


def units_leases(run: str, dataset: str, epoch: int) -> str:
    """Sorted set: unit bit -> lease expiry (Redis clock, ms)."""
    return _k(run, "units", dataset, str(epoch), "leases")


def units_owners(run: str, dataset: str, epoch: int) -> str:
    """Hash: unit bit -> id of the worker holding its lease."""
    return _k(run, "units", dataset, str(epoch), "owners")


def epoch_keys(run: str, dataset: str, epoch: int) -> list[str]:
    """The four keys of one epoch, in the order the unit scripts take them."""
    return [units_claimed(run, dataset, epoch), units_done(run, dataset, epoch),
            units_leases(run, dataset, epoch), units_owners(run, dataset, epoch)]


# --- Object store ------------------------------------------------------------------------------

def run_prefix(run: str) -> str:
    """A lane's objects: `runs/{run}/`, or `runs/{run}/f{i}/` for fragment i."""
    base, frag = split_lane(run)
    return f"runs/{base}/" if frag is None else f"runs/{base}/f{frag}/"


def weights_object(run: str, version: int, token: int) -> str:
    """The fencing token in the name means two aggregators never write the same key."""
    return f"{run_prefix(run)}weights/v{version:08d}-t{token}.safetensors"


def momentum_object(run: str, version: int, token: int) -> str:
    return f"{run_prefix(run)}momentum/v{version:08d}-t{token}.safetensors"


def update_prefix(run: str, version: int) -> str:
    """The encoded update from version-1 to `version` (diloco/update.py), one directory per version."""
    return f"{run_prefix(run)}updates/v{version:08d}/"


def update_shard(run: str, version: int, token: int, index: int) -> str:
    return f"{update_prefix(run, version)}t{token}-{index:04d}.safetensors"


def snapshot_object(run: str, version: int) -> str:
    """msgpack snapshot of the run's Redis state as of a committed version (for `diloco recover`)."""
    return f"{run_prefix(run)}state/v{version:08d}.msgpack"


def snapshot_prefix(run: str) -> str:
    return f"{run_prefix(run)}state/"


def weights_prefix(run: str) -> str:
    return f"{run_prefix(run)}weights/"


def delta_prefix(run: str, version: int, worker: str) -> str:
    """Everything a worker uploads for one base version lives under its own prefix."""
    return f"{run_prefix(run)}deltas/v{version:08d}/{worker}/"


def delta_shard(run: str, version: int, worker: str, nonce: str, index: int) -> str:
    return f"{delta_prefix(run, version, worker)}{nonce}-{index:04d}.safetensors"
