"""Tasks: what a worker trains (model + data + loss), and how a run's config names one.

A run's config holds a task name and a JSON-able options dict. Every worker calls
`load_task(name, options)` and must end up with the same model shapes and the same data, so
tasks are deterministic: the model depends only on the global torch seed the caller sets, and a
dataset's `dataset_id` changes whenever its samples would.

The name is a builtin ("gpt", "tiny", "hf") or "some.module:factory" for user code, where
`factory(**options)` returns an object satisfying `Task`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import typing
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import torch

from diloco.errors import ConfigError

BUILTIN = {"gpt": "diloco.tasks.gpt:make_task", "tiny": "diloco.tasks.tiny:make_task",
           "hf": "diloco.tasks.hf:make_task"}  # hf needs the optional extra diloco[hf]


class Dataset(Protocol):
    dataset_id: str  # sha256 hex (24 chars) over everything that determines the samples
    tokens_per_sample: int

    def __len__(self) -> int: ...

    def batch(self, ids: Sequence[int]) -> dict[str, torch.Tensor]: ...


class Task(Protocol):
    name: str
    options: dict[str, Any]  # resolved, defaults filled in; rebuilding from these gives the same task

    def build_model(self) -> torch.nn.Module: ...

    def train_data(self) -> Dataset: ...

    def eval_data(self) -> Dataset: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    # Optional: `defaults`, a dict of run settings (sync_every, batch_size, unit_samples, ...) that
    # suit the task, used by `diloco init` for each setting the user leaves out (see run_defaults).


def run_defaults(task: Task) -> dict[str, Any]:
    """The task's own defaults for run settings, checked to be settings a task may choose."""
    from diloco.config import RunConfig  # config imports the codecs, which import torch: only when needed

    defaults = getattr(task, "defaults", None) or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"task {task.name!r}: defaults must be a dict of run settings, got {type(defaults).__name__}")
    allowed = {f.name for f in dataclasses.fields(RunConfig)} - {"run", "task", "task_options", "model_hash",
                                                                  "dataset_id", "schema_version", "init_weights"}
    unknown = sorted(set(defaults) - allowed)
    if unknown:
        raise ConfigError(f"task {task.name!r}: defaults name {', '.join(unknown)}, which are not run settings "
                          f"a task may set")
    return dict(defaults)


def load_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """Build the task that `name` names, with `options` passed to its factory as keywords."""
    spec = BUILTIN.get(name, name)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"unknown task {name!r}: use one of {sorted(BUILTIN)} or 'some.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"task {spec!r}: cannot import module {module_name!r}: {e}") from e
    factory: Any = module
    for part in attr.split("."):  # allow "module:Class.method"
        if not hasattr(factory, part):
            raise ConfigError(f"task {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"task {spec!r}: {attr!r} is not callable")
    task = factory(**(options or {}))
    missing = [a for a in ("name", "options", "build_model", "train_data", "eval_data", "loss")
               if not hasattr(task, a)]
    if missing:
        raise ConfigError(f"task {spec!r}: the factory returned {type(task).__name__}, "
                          f"which lacks {', '.join(missing)}")
    return task


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---- helpers shared by the builtin tasks ----

OptionsT = TypeVar("OptionsT")


def parse_options(cls: type[OptionsT], options: dict[str, Any], task: str) -> OptionsT:
    """Check `options` against the frozen dataclass `cls` (keys and types); cls checks ranges."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"task {task!r}: unknown option {unknown[0]!r}; valid options: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in options.items():
        want = hints[key]
        # bool is an int subclass, and True as a layer count is surely a mistake
        ok = isinstance(value, want) and not isinstance(value, bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)  # JSON writes 4.0 as 4
        if not ok:
            raise ConfigError(f"task {task!r}: option {key!r} must be {want.__name__}, got {value!r}")
        values[key] = value
    return cls(**values)


def check(cond: bool, task: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"task {task!r}: {message}")


def check_ids(ids: Sequence[int], n: int) -> torch.Tensor:
    """`ids` as an int64 tensor, after checking every id names one of the `n` samples."""
    idx = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids)
    if idx.ndim != 1 or idx.numel() == 0:
        raise ValueError("ids must be a non-empty 1-D sequence of sample indices")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"ids must be integers, got {idx.dtype}")
    idx = idx.long()
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        raise IndexError(f"sample id {lo if lo < 0 else hi} out of range for a dataset of {n} samples")
    return idx


def make_dataset_id(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
