"""Typed, validated settings.

`RunConfig` holds the group-wide settings of a run. It lives in the Redis hash
`diloco:{run}:config`, is written once by `diloco init`, and every worker adopts it: there is no
worker-side override of a group setting. Each service also has its own local settings
(`WorkerSettings`, `AggregatorSettings`). Everything is checked at the boundary, so the rest of the
code can trust it. Environment variable names are constants here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from diloco import keys
from diloco.errors import ConfigError

SCHEMA_VERSION = 1

ENV_REDIS_URL = "DILOCO_REDIS_URL"
ENV_STORE = "DILOCO_STORE"
ENV_RUN = "DILOCO_RUN"
ENV_WORKER_ID = "DILOCO_WORKER_ID"
ENV_S3_ENDPOINT = "DILOCO_S3_ENDPOINT"
ENV_CRASH_AT = "DILOCO_CRASH_AT"

# Inner-loop precisions: "bf16" runs forward and backward under torch.autocast(bfloat16).
PRECISIONS = ("fp32", "bf16")

# Asynchronous DiLoCo's choices (RunConfig.mode, staleness_weight, aggregation).
MODES = ("sync", "async")
STALENESS_WEIGHTS = ("none", "inv_sqrt")
AGGREGATIONS = ("uniform", "tokens")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RUN = "default"


@dataclass(frozen=True)
class RunConfig:
    run: str
    task: str = "gpt"
    task_options: dict[str, Any] = field(default_factory=dict)
    model_hash: str = ""        # fingerprint of the model's state dict, filled in by init
    dataset_id: str = ""        # the training split's id, filled in by init
    seed: int = 0
    init_weights: str = ""      # sha256 of the weights file the run started from; "" = the task's seeded init
    sync_every: int = 500       # H: inner optimizer steps per round
    batch_size: int = 16        # samples per micro-batch
    grad_accum: int = 1         # micro-batches per optimizer step
    precision: str = "fp32"     # inner forward/backward: fp32, or bf16 autocast (weights, deltas, outer step stay fp32)
    unit_samples: int = 0       # samples per work unit; 0 = one optimizer step's worth (set by init)
    inner_lr: float = 1e-3
    inner_weight_decay: float = 0.1
    inner_warmup_steps: int = 100
    cooldown_from: int = 0      # version at which inner lr, outer momentum and error feedback start to decay
    cooldown_to: int = 0        # version at which they reach zero; 0 = no cooldown (diloco/schedule.py)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    codec: str = "bf16"
    codec_options: dict[str, Any] = field(default_factory=dict)   # e.g. {"density": 0.015} for topk
    download_codec: str = ""    # codec of the published weight updates; "" = codec (diloco/update.py)
    download_codec_options: dict[str, Any] = field(default_factory=dict)   # {} = codec_options if the same codec
    shard_mb: float = 64.0
    min_workers: int = 1
    round_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 30.0
    outlier_factor: float = 10.0  # reject a delta whose norm exceeds this many times the round's median; 0 = off
    max_versions: int = 0       # stop the run cleanly at this version; 0 = no budget
    max_tokens: int = 0         # stop the run cleanly once this many tokens are committed; 0 = no budget
    keep_last: int = 5          # retention: keep the last K versions' weights, momentum and snapshot
    keep_every: int = 100       # retention: also keep every M-th version; 0 = none
    delta_grace_s: float = 3600.0  # retention: delete deltas/v{b}/ this long after version b+1 was committed
    retention_every: int = 10   # the aggregator runs retention after every N-th commit; 0 = never (diloco gc)
    # Streaming DiLoCo (docs/architecture.md, "Streaming fragments"); 1 fragment = plain rounds.
    num_fragments: int = 1      # N: the model is synced in N fragments, one every sync_every / N steps
    fragment_layout: str = "strided"   # which repeated block goes to which fragment (diloco/fragments.py)
    overlap_steps: int = 0      # tau: steps trained after a fragment's announcement before its result is merged
    merge_alpha: float = 0.0    # local = alpha * local + (1 - alpha) * global at a merge (0: the paper's 0.5
                                # measured 4-10% worse here: docs/benchmarks.md, "Streaming DiLoCo")
    fragment_plan: str = ""     # the plan's fingerprint, filled in by init (part of the model check)
    # Asynchronous DiLoCo (docs/architecture.md, "Asynchronous mode"); the defaults are today's sync rounds.
    mode: str = "sync"          # sync: one version per quorum round; async: a version per delta (or grace window)
    grace_s: float = 0.0        # async: deltas announced within this long of the batch's first share its outer step
    max_staleness: int = 4      # async: reject a delta whose base is more than this many versions behind the head
    staleness_weight: str = "none"   # async: "none", or "inv_sqrt" (a delta of staleness s scaled by 1/sqrt(1+s))
    dn_buffer: int = 1          # Delayed Nesterov: momentum updated once every N deltas; 1 = plain Nesterov
    aggregation: str = "uniform"     # the mean's weights: "uniform", or "tokens" (each delta's announced tokens)
    dylu: bool = False          # a worker's H scales with its speed relative to the fastest (diloco/dylu.py)
    h_min: int = 1              # DyLU: the fewest inner steps a round trains
    schema_version: int = SCHEMA_VERSION

    # Settings a worker never needs to agree on; every other field must match across the group.
    TUNABLE: ClassVar[frozenset[str]] = frozenset(
        {"outer_lr", "outer_momentum", "min_workers", "round_timeout_s", "heartbeat_timeout_s", "outlier_factor",
         "max_versions", "max_tokens", "keep_last", "keep_every", "delta_grace_s", "retention_every",
         "grace_s", "max_staleness", "staleness_weight", "aggregation"}
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        try:
            keys.check_name("run name", self.run)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _positive_int(self, "sync_every", "batch_size", "grad_accum", "min_workers", "num_fragments", "keep_last")
        _positive_num(self, "inner_lr", "outer_lr", "shard_mb", "round_timeout_s", "heartbeat_timeout_s")
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        nonneg = ("inner_weight_decay", "inner_warmup_steps", "cooldown_from", "cooldown_to", "seed",
                  "outlier_factor", "max_versions", "max_tokens", "keep_every", "delta_grace_s", "retention_every")
        for name in nonneg:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.cooldown_to and self.cooldown_to <= self.cooldown_from:
            raise ConfigError(
                f"cooldown_to ({self.cooldown_to}) must be greater than cooldown_from "
                f"({self.cooldown_from}), or 0 for no cooldown"
            )
        self._validate_async()
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        per_round = self.sync_every * self.grad_accum * self.batch_size
        if self.unit_samples < 0 or (self.unit_samples and per_round % self.unit_samples):
            raise ConfigError(
                f"unit_samples ({self.unit_samples}) must divide the samples of one round "
                f"(sync_every * grad_accum * batch_size = {per_round}), so rounds train on whole units"
            )
        from diloco.codecs import get_codec  # here, not at import: it imports torch, which status does not need

        get_codec(self.codec, self.codec_options)  # ConfigError naming an unknown codec or option
        if self.download_codec or self.download_codec_options:
            from diloco.update import download_codec_spec

            get_codec(*download_codec_spec(self))
        if self.init_weights and not re.fullmatch(r"[0-9a-f]{64}", self.init_weights):
            raise ConfigError(f"init_weights must be a sha256 (64 lowercase hex), got {self.init_weights[:80]!r}")
        self._validate_streaming()
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(
                f"run {self.run!r} has config schema version {self.schema_version}, but this diloco "
                f"understands version {SCHEMA_VERSION}: use a diloco release that matches the run"
            )

    def _validate_async(self) -> None:
        for name, allowed in (("mode", MODES), ("staleness_weight", STALENESS_WEIGHTS), ("aggregation", AGGREGATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not math.isfinite(self.grace_s) or self.grace_s < 0:
            raise ConfigError(f"grace_s must be a finite number of seconds >= 0, got {self.grace_s!r}")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness must be an integer >= 0 (versions), got {self.max_staleness!r}")
        if self.dn_buffer < 1:
            raise ConfigError(f"dn_buffer must be a positive integer (1 = plain Nesterov), got {self.dn_buffer!r}")
        if self.dn_buffer > 1 and not self.nesterov:
            raise ConfigError("dn_buffer > 1 (Delayed Nesterov) needs nesterov = true")
        if self.mode == "sync" and (self.grace_s or self.staleness_weight != "none"):
            raise ConfigError("grace_s and staleness_weight apply to mode=async only; the run's mode is sync")
        if not 1 <= self.h_min <= self.sync_every:
            raise ConfigError(f"h_min must be in [1, sync_every ({self.sync_every})], got {self.h_min!r}")
        step_samples = self.grad_accum * self.batch_size
        if self.dylu and self.unit_samples and step_samples % self.unit_samples:
            raise ConfigError(f"dylu needs unit_samples ({self.unit_samples}) to divide one optimizer step's samples "
                              f"(grad_accum * batch_size = {step_samples}), so any H trains whole units")

    def _validate_streaming(self) -> None:
        from diloco.fragments import check_settings

        check_settings(self.sync_every, self.num_fragments, self.overlap_steps, self.merge_alpha,
                       self.fragment_layout)
        if self.num_fragments == 1:
            if self.overlap_steps:
                raise ConfigError("overlap_steps applies to streaming runs (num_fragments > 1) only")
            return
        clash = [name for name, on in (("mode=async", self.is_async), ("dylu", self.dylu),
                                       ("dn_buffer > 1", self.dn_buffer > 1)) if on]
        if clash:
            raise ConfigError(f"num_fragments > 1 (streaming) does not combine with {', '.join(clash)}: "
                              "fragments sync in synchronous rounds of fixed length")
        per_interval = self.sync_every // self.num_fragments * self.grad_accum * self.batch_size
        if self.unit_samples and per_interval % self.unit_samples:
            raise ConfigError(f"unit_samples ({self.unit_samples}) must divide the samples between two fragment syncs "
                              f"(sync_every / num_fragments * grad_accum * batch_size = {per_interval})")

    @property
    def is_streaming(self) -> bool:
        return self.num_fragments > 1

    @property
    def lanes(self) -> list[str]:
        """What aggregator locks serve: the run, or each fragment's lane (diloco.keys.lane)."""
        if not self.is_streaming:
            return [self.run]
        return [keys.lane(self.run, f) for f in range(self.num_fragments)]

    @property
    def is_async(self) -> bool:
        return self.mode == "async"

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 1024 * 1024)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_fields(self) -> dict[str, str]:
        """Plain strings, so `redis-cli HGETALL` reads well."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                out[f.name] = "true" if value else "false"
            elif isinstance(value, dict):
                out[f.name] = json.dumps(value, sort_keys=True)
            else:
                out[f.name] = str(value)
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> RunConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        if fields.get("schema_version", str(SCHEMA_VERSION)) != str(SCHEMA_VERSION):
            # A newer schema may add fields; the version is the real cause, report it first.
            raise ConfigError(
                f"run {fields.get('run', '?')!r} has config schema version {fields['schema_version']} "
                f"(field schema_version), but this diloco understands version {SCHEMA_VERSION}: "
                "use a diloco release that matches the run"
            )
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ConfigError(f"run config has unknown settings: {', '.join(unknown)}")
        values = {name: _parse(name, known[name].type, raw) for name, raw in fields.items()}
        return cls(**values)

    @classmethod
    def from_options(cls, run: str, options: dict[str, Any]) -> RunConfig:
        """Build from user-given settings (flags), rejecting names that are not settings."""
        known = {f.name for f in dataclasses.fields(cls)} - {"run", "schema_version"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown run settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(run=run, **options)

    def differences(self, other: RunConfig, names: set[str] | None = None) -> list[str]:
        """'name: ours -> theirs' for each differing field (all fields, or only `names`)."""
        diffs = []
        for f in dataclasses.fields(self):
            if names is not None and f.name not in names:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                diffs.append(f"{f.name}: {a!r} -> {b!r}")
        return diffs


def _parse(name: str, type_name: Any, raw: str) -> Any:
    type_name = str(type_name)
    try:
        if type_name == "bool":
            if raw not in ("true", "false"):
                raise ValueError(raw)
            return raw == "true"
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
        if type_name.startswith("dict"):
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError(raw)
            return value
        return str(raw)
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"run config field {name!r} has an invalid value {raw!r}") from None


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict[str, Any]": (dict,)}


def _check_types(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        allowed = _TYPES.get(str(f.type))
        value = getattr(cfg, f.name)
        wrong_bool = isinstance(value, bool) and str(f.type) != "bool"
        if allowed is not None and (not isinstance(value, allowed) or wrong_bool):
            raise ConfigError(f"{f.name} must be of type {f.type}, got {value!r}")


def _positive_int(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _positive_num(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class WorkerSettings:
    """A worker's own settings; none of them changes what the group computes."""

    redis_url: str
    store_url: str
    run: str
    worker_id: str
    device: str = "cpu"
    heartbeat_interval_s: float = 2.0
    threads: int = 0            # torch intra-op threads; 0 = torch's default
    block_ms: int = 1000        # how long one XREAD waits before re-checking for stop
    outage_limit_s: float = 600.0   # give up (exit non-zero) once Redis or the store is gone this long
    checkpoint_dir: str | None = None  # keep inner optimizer state here across restarts

    def __post_init__(self) -> None:
        try:
            keys.check_name("run name", self.run)
            keys.check_name("worker id", self.worker_id)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _positive_num(self, "heartbeat_interval_s")

    def check_against(self, cfg: RunConfig) -> None:
        # A heartbeat must arrive several times per timeout, or one slow beat evicts a live worker.
        if self.heartbeat_interval_s > cfg.heartbeat_timeout_s / 3:
            raise ConfigError(
                f"heartbeat interval {self.heartbeat_interval_s}s is too long for run {cfg.run!r}, "
                f"whose heartbeat timeout is {cfg.heartbeat_timeout_s}s: use at most "
                f"{cfg.heartbeat_timeout_s / 3:.3g}s (a third of the timeout)"
            )


@dataclass(frozen=True)
class AggregatorSettings:
    redis_url: str
    store_url: str
    run: str
    aggregator_id: str
    lock_ttl_s: float = 30.0
    concurrency: int = 8        # parallel shard downloads
    block_ms: int = 1000        # how long one XREAD waits before re-checking liveness and deadline
    standby_poll_s: float = 1.0  # how often a standby aggregator tries the lock
    outage_limit_s: float = 600.0   # give up (exit non-zero) once Redis or the store is gone this long
    stall_limit_s: float = 1800.0   # give the lock up when the round loop made no progress this long

    def __post_init__(self) -> None:
        try:
            keys.check_name("run name", self.run)
            keys.check_name("aggregator id", self.aggregator_id)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _positive_num(self, "lock_ttl_s", "standby_poll_s", "stall_limit_s")
        _positive_int(self, "concurrency")
