"""Operator control of a running run: stop, pause, resume, kick a worker, change a tunable setting.

Commands write Redis state that the services read at the start of each round, so a change takes
effect at the next round, never in the middle of one. Every command is recorded in the audit
stream `diloco:{run}:audit` (who, what, when on the Redis clock).
"""

from __future__ import annotations

import dataclasses
import getpass
import socket

import redis

from diloco import keys
from diloco.config import RunConfig, _parse
from diloco.connect import server_time_ms
from diloco.errors import ConfigError
from diloco.runs import load_config

RUNNING, PAUSED, STOPPED = "running", "paused", "stopped"
KICK_TTL_S = 3600


def default_who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def audit(r: redis.Redis, run: str, who: str, what: str, pipeline: redis.client.Pipeline | None = None) -> None:
    (pipeline or r).xadd(keys.audit(run), {"who": who, "what": what, "ms": str(server_time_ms(r))},
                         maxlen=10_000, approximate=True)


def state(r: redis.Redis, run: str) -> str:
    return r.hget(keys.control(run), "state") or RUNNING


def set_state(r: redis.Redis, run: str, new: str, who: str, reason: str = "") -> None:
    pipe = r.pipeline()
    pipe.hset(keys.control(run), mapping={"state": new, "reason": reason or f"{new} by {who}"})
    audit(r, run, who, f"{new}" + (f" ({reason})" if reason else ""), pipe)
    pipe.execute()


def kick(r: redis.Redis, run: str, worker: str, who: str) -> None:
    """Remove a worker now: the round stops waiting for it and it exits at its next heartbeat."""
    keys.check_name("worker id", worker)
    if not r.sismember(keys.workers(run), worker):
        raise ConfigError(f"run {run!r} has no worker {worker!r}")
    pipe = r.pipeline()
    pipe.set(keys.worker_kicked(run, worker), who, ex=KICK_TTL_S)
    pipe.delete(keys.worker_alive(run, worker))
    audit(r, run, who, f"kick {worker}", pipe)
    pipe.execute()


def set_setting(r: redis.Redis, run: str, assignment: str, who: str) -> RunConfig:
    """`name=value` for a tunable setting; validated as the whole config before it is written."""
    name, sep, raw = assignment.partition("=")
    if not sep:
        raise ConfigError(f"expected NAME=VALUE, got {assignment!r}")
    if name not in RunConfig.TUNABLE:
        tunable = ", ".join(sorted(RunConfig.TUNABLE))
        raise ConfigError(f"{name!r} cannot change during a run; tunable settings: {tunable}")
    cfg = load_config(r, run)
    field = next(f for f in dataclasses.fields(RunConfig) if f.name == name)
    new = cfg.replace(**{name: _parse(name, field.type, raw)})
    pipe = r.pipeline()
    pipe.hset(keys.config(run), name, new.to_fields()[name])
    audit(r, run, who, f"set {name}={new.to_fields()[name]} (was {cfg.to_fields()[name]})", pipe)
    pipe.execute()
    return new


def budget_reached(cfg: RunConfig, version: int, tokens: int) -> str | None:
    """Why the run's version or token budget stops it now, or None."""
    if cfg.max_versions and version >= cfg.max_versions:
        return f"version budget reached: version {version} of max_versions {cfg.max_versions}"
    if cfg.max_tokens and tokens >= cfg.max_tokens:
        return f"token budget reached: {tokens} tokens of max_tokens {cfg.max_tokens}"
    return None
