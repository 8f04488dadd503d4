"""Every Redis key and object-store key name of a run, in one place.

Redis keys carry the hash tag `{run}` so all of one run's keys share a Redis Cluster slot.
Object keys are named so that sorting them sorts by version (`v00000042`). A test pins the names:
operators read them with redis-cli and the docs list them, so they must not drift.
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


def _k(run: str, *parts: str) -> str:
    return ":".join(("diloco", "{" + run + "}", *parts))


# --- Redis -------------------------------------------------------------------------------------

def config(run: str) -> str:
    """Hash: the run's group-wide settings (diloco.config.RunConfig)."""
    return _k(run, "config")


def head(run: str) -> str:
    """Hash: the committed version pointer and what it points at; written only by the commit script."""
    return _k(run, "head")


def deltas(run: str) -> str:
    """Stream: workers' announcements of uploaded pseudo-gradients."""
    return _k(run, "deltas")


def versions(run: str) -> str:
    """Stream: one entry per committed version, with the round's stats."""
    return _k(run, "versions")


def rejections(run: str) -> str:
    """Stream: every rejected announcement with its reason."""
    return _k(run, "rejections")


def rejected_counts(run: str) -> str:
    """Hash: worker id -> number of its announcements rejected."""
    return _k(run, "rejected")


def lock(run: str) -> str:
    """String with TTL: the aggregator lock; value '<token>:<aggregator id>'."""
    return _k(run, "lock")


def lock_token(run: str) -> str:
    """Counter: the fencing tokens handed out with the lock."""
    return _k(run, "lock", "token")


def workers(run: str) -> str:
    """Set: every worker id that ever registered."""
    return _k(run, "workers")


def worker_alive(run: str, worker: str) -> str:
    """String with TTL: present while the worker heartbeats; value is its session nonce."""
    return _k(run, "worker", worker, "alive")


def worker_stats(run: str, worker: str) -> str:
    """Hash: the worker's latest stats (step, loss, steps/s, version, bytes sent/received...)."""
    return _k(run, "worker", worker)


def datasets(run: str) -> str:
    """Hash: dataset id -> number of samples, snapshotted at first registration."""
    return _k(run, "datasets")


# --- Object store ------------------------------------------------------------------------------

def run_prefix(run: str) -> str:
    return f"runs/{run}/"


def weights_object(run: str, version: int, token: int) -> str:
    """The fencing token in the name means two aggregators never write the same key."""
    return f"runs/{run}/weights/v{version:08d}-t{token}.safetensors"


def momentum_object(run: str, version: int, token: int) -> str:
    return f"runs/{run}/momentum/v{version:08d}-t{token}.safetensors"


def delta_prefix(run: str, version: int, worker: str) -> str:
    """Everything a worker uploads for one base version lives under its own prefix."""
    return f"runs/{run}/deltas/v{version:08d}/{worker}/"


def delta_shard(run: str, version: int, worker: str, nonce: str, index: int) -> str:
    return f"{delta_prefix(run, version, worker)}{nonce}-{index:04d}.safetensors"
