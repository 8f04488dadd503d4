"""A run's shared state: create it (`diloco init`), read its config and head, fetch its weights.

Init is idempotent: with the same settings it returns the existing run; with a changed setting it
refuses and names every difference. Settings left out adopt the run's values.

A run starts from the task's seeded initialisation, or from a weights file (`--init-weights`, a
safetensors file such as `diloco export` writes): DiLoCo is usually run from a briefly pretrained
model, since averaging pseudo-gradients is least efficient in the first steps from random weights
(docs/benchmarks.md measures it). The file's sha256 is the run's `init_weights` setting, so
initialising an existing run again with another file is refused like any other changed setting.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch

from diloco import fragments, keys, model
from diloco.config import RunConfig
from diloco.connect import server_time_ms
from diloco.errors import BadInput, ConfigError, ObjectExists, RunNotFound
from diloco.messages import Head
from diloco.scripts import Scripts
from diloco.store import ObjectStore, put_idempotent
from diloco.tasks import Task, load_task, run_defaults
from diloco.units import UnitPlan, units_per_round
from diloco.update import split_momentum

log = logging.getLogger(__name__)


def load_config(r: redis.Redis, run: str) -> RunConfig:
    fields = r.hgetall(keys.config(run))
    if not fields:
        raise RunNotFound(
            f"run {run!r} does not exist in this Redis (no key {keys.config(run)}): "
            f"create it with `diloco init --run {run}`, or check --run and DILOCO_REDIS_URL"
        )
    return RunConfig.from_fields(fields)


def read_head(r: redis.Redis, run: str) -> Head:
    return parse_head(run, r.hgetall(keys.head(run)))


def parse_head(run: str, fields: dict[str, str]) -> Head:
    """The head from its hash's fields (read by the caller, e.g. in a pipeline); RunNotFound if empty."""
    if not fields:
        raise RunNotFound(f"run {run!r} has a config but no version pointer {keys.head(run)}")
    return Head.from_fields(fields)


def live_worker_stat(r: redis.Redis, run: str, field: str) -> dict[str, str | None]:
    """One heartbeat stat (`state`, `steps_per_s`, ...) of each live worker, in one pipelined read."""
    ids = sorted(r.smembers(keys.workers(run)))
    if not ids:
        return {}
    pipe = r.pipeline(transaction=False)
    for w in ids:
        pipe.exists(keys.worker_alive(run, w))
        pipe.hget(keys.worker_stats(run, w), field)
    replies = pipe.execute()
    return {w: value for w, alive, value in zip(ids, replies[0::2], replies[1::2], strict=True) if alive}


def load_weights(store: ObjectStore, head: Head) -> dict[str, torch.Tensor]:
    return load_weights_counted(store, head)[0]


def load_weights_counted(store: ObjectStore, head: Head, *, views: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """(the weights of `head`, the bytes read): a worker counts what it downloads without asking the
    store for the object's size (one more request). `views`: read-only (model.from_bytes)."""
    data = store.get(head.weights, digest=head.weights_digest)
    return model.from_bytes(data, f"weights {head.weights}", views=views), len(data)


def read_heads(r: redis.Redis, cfg: RunConfig) -> list[Head]:
    """The head of each of the run's lanes (one without fragments), read together."""
    return heads_and_recovery(r, cfg.run, cfg.lanes)[0]


def heads_and_recovery(r: redis.Redis, run: str, lanes: list[str]) -> tuple[list[Head], str]:
    """The heads of `lanes` and the id of the run's newest `diloco recover` ("" if never recovered), in
    one transaction: heads never come from the other side of a recovery than the id."""
    pipe = r.pipeline(transaction=True)
    for lane in lanes:
        pipe.hgetall(keys.head(lane))
    pipe.get(keys.recovered(run))
    *heads, recovery = pipe.execute()
    return [parse_head(lane, fields) for lane, fields in zip(lanes, heads, strict=True)], recovery or ""


def load_full_weights(store: ObjectStore, heads: list[Head]) -> dict[str, torch.Tensor]:
    """The whole model of the run at `heads` (read_heads): with fragments, each fragment's weights at its
    head's version, joined (fragments.join: split entries put back together)."""
    out: dict[str, torch.Tensor] = {}
    for head in heads:
        out.update(load_weights(store, head))
    return fragments.join(out)


def load_momentum(store: ObjectStore, head: Head) -> dict[str, torch.Tensor]:
    return load_outer_state(store, head)[0]


def load_outer_state(store: ObjectStore, head: Head) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(momentum, the download's error-feedback residual) of `head`: one object holds both (diloco/update.py)."""
    data = store.get(head.momentum, digest=head.momentum_digest)
    return split_momentum(model.from_bytes(data, f"momentum {head.momentum}"))


def build_model(task: Task, seed: int) -> torch.nn.Module:
    """The run's initial model: the same seed gives the same weights on every machine."""
    torch.manual_seed(seed)
    return task.build_model()


@dataclass(frozen=True)
class InitWeights:
    """A run's starting weights, read from a file the operator gave."""

    path: str
    sha256: str
    state: dict[str, torch.Tensor]


def read_init_weights(path: str | Path) -> InitWeights:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the initial weights {path}: {e.strerror or e}") from None
    try:
        state = model.from_bytes(data, f"initial weights {path}")
    except BadInput as e:
        raise ConfigError(str(e)) from None
    return InitWeights(str(path), hashlib.sha256(data).hexdigest(), state)


def _load_init_weights(net: torch.nn.Module, init: InitWeights) -> None:
    """Copy `init` into `net`, refusing a file made for another model or holding non-finite values."""
    expected = net.state_dict()
    diffs = model.describe_differences(expected, init.state, names=("task", "file"))
    if diffs:
        raise ConfigError(f"initial weights {init.path} do not fit the task's model: {'; '.join(diffs)}")
    bad = sorted(n for n, t in init.state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ConfigError(f"initial weights {init.path} hold NaN or infinite values in {', '.join(bad[:5])}")
    net.load_state_dict(init.state)


@dataclass(frozen=True)
class InitResult:
    config: RunConfig
    created: bool


def init_run(r: redis.Redis, store: ObjectStore, run: str, given: dict[str, Any],
             init: InitWeights | None = None) -> InitResult:
    """Create run `run` from the explicitly given settings, or check them against the existing run.

    With `init`, version 0 holds those weights instead of the task's seeded initialisation.
    """
    if init is not None:
        given = {**given, "init_weights": init.sha256}
    elif given.get("init_weights"):
        raise ConfigError("init_weights names a weights file's sha256; give the file itself (--init-weights PATH)")
    existing = r.hgetall(keys.config(run))
    if existing:
        return InitResult(_check_same(RunConfig.from_fields(existing), given), created=False)
    store.check()  # creating a run may create a file store's directory; a running service never does
    if store.list(keys.snapshot_prefix(run)) or store.list(keys.snapshot_prefix(keys.lane(run, 0))):
        # Redis lost the run but the store has its history: starting over at version 0 would
        # silently throw away every committed version.
        raise ConfigError(
            f"run {run!r} is not in Redis but the store has its snapshots ({store.url}/{keys.snapshot_prefix(run)}): "
            f"restore it with `diloco recover --run {run}`, or use another run name"
        )

    task = load_task(given.get("task", RunConfig.task), given.get("task_options") or {})
    # The task's defaults fill what the user left out (a setting given explicitly still wins).
    settings = {**run_defaults(task), **given, "task": given.get("task", RunConfig.task), "task_options": task.options}
    cfg = RunConfig.from_options(run, settings)
    net = build_model(task, cfg.seed)
    if init is not None:
        _load_init_weights(net, init)
    state = model.state_to_cpu(net)
    train = task.train_data()
    cfg = cfg.replace(model_hash=model.model_hash(state), dataset_id=train.dataset_id,
                      unit_samples=cfg.unit_samples or cfg.batch_size * cfg.grad_accum)
    plan = UnitPlan(train.dataset_id, len(train), cfg.unit_samples, cfg.seed)
    if units_per_round(cfg) > plan.num_units:
        raise ConfigError(
            f"a round trains on {units_per_round(cfg)} work units of {cfg.unit_samples} samples, but the dataset "
            f"has only {plan.num_units} units ({len(train)} samples): lower sync_every or batch_size"
        )
    momentum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in net.named_parameters()}
    parts = fragments.plan_of_state(state, cfg)
    if cfg.is_streaming:
        cfg = cfg.replace(fragment_plan=parts.fingerprint())
    heads = {keys.head(lane): _write_version_zero(r, store, lane, fragments.part(state, names),
                                                  fragments.part(momentum, _params(names, momentum)))
             for lane, names in zip(cfg.lanes, parts.fragments, strict=True)}
    created = Scripts(r).init_run(run, {
        keys.config(run): cfg.to_fields(), **heads,
        keys.datasets(run): {train.dataset_id: str(len(train))},
        keys.units_meta(run, train.dataset_id): plan.meta(),
    })
    if not created:  # another init won the race; hold it to the same rule
        return InitResult(_check_same(load_config(r, run), given), created=False)
    log.info("created run %s: task %s, model %s, %d samples", run, cfg.task, cfg.model_hash, len(train))
    return InitResult(cfg, created=True)


def _params(pieces: tuple[str, ...], momentum: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The pieces of a fragment that are (parts of) parameters: those have outer momentum."""
    return tuple(p for p in pieces if fragments.piece(p)[0] in momentum)


def _write_version_zero(r: redis.Redis, store: ObjectStore, lane: str, state: dict[str, torch.Tensor],
                        momentum: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write a lane's version 0 (weights and zero momentum); its head's fields."""
    w_key, m_key = keys.weights_object(lane, 0, 0), keys.momentum_object(lane, 0, 0)
    run = keys.split_lane(lane)[0]
    w_sha = _put_idempotent(store, w_key, model.to_bytes(state, run=run, version="0"))
    m_sha = _put_idempotent(store, m_key, model.to_bytes(momentum, run=run, version="0"))
    return {"version": "0", "token": "0", "weights": w_key, "weights_digest": w_sha,
            "momentum": m_key, "momentum_digest": m_sha,
            "committed_ms": str(server_time_ms(r)), "deltas_since": "0-0"}


def _check_same(existing: RunConfig, given: dict[str, Any]) -> RunConfig:
    wanted = dict(given)
    if "task_options" in wanted or "task" in wanted:
        task = load_task(wanted.get("task", existing.task), wanted.get("task_options") or {})
        wanted["task_options"] = task.options
    requested = existing.replace(**wanted)
    diffs = existing.differences(requested, set(given) | ({"task_options"} if "task" in given else set()))
    if diffs:
        raise ConfigError(
            f"run {existing.run!r} already exists with other settings ({'; '.join(diffs)}, "
            "as run -> requested). Leave these flags out to adopt the run's settings, or start "
            "a new run with another --run name."
        )
    return existing


def _put_idempotent(store: ObjectStore, key: str, data: bytes) -> str:
    """Create-only write that accepts an identical object left by an init that died midway."""
    try:
        return put_idempotent(store, key, data)
    except ObjectExists:
        raise ConfigError(
            f"{store.url}/{key} exists with other content (left by an earlier init with other "
            f"settings?): delete {keys.run_prefix(key.split('/')[1])} or use another run name"
        ) from None
