"""The workload of bench/sync.py as a diloco task: `bench.sync_task:make_task`.

A `torch.nn.Sequential` of `layers` x `Linear(width, width)` with ReLU between them (6 x 2048 by
default: 25,178,112 fp32 parameters, 100.7 MB), trained with MSE on seeded random inputs and
targets. Run settings suited to it (fp32, H = 5, batch 2, AdamW lr 1e-4, no warm-up) are its
`defaults`.

Timing without touching the product: when the option `trace_dir` is set, every call of `loss` (the
start of a micro-batch, so with grad_accum 1 the start of an inner step) and every `load_state_dict`
of the model (the worker resetting to a new global version) appends one line, `event wall_time_s`,
to `{trace_dir}/{pid}.txt`. `trace_dir` does not change the model or the data (nor `dataset_id`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diloco.tasks import check, check_ids, make_dataset_id, parse_options

FORMAT = "sync-bench-v1"
EVAL_SAMPLES = 16


@dataclass(frozen=True)
class SyncOptions:
    width: int = 2048
    layers: int = 6
    num_samples: int = 1024
    data_seed: int = 0
    trace_dir: str = ""

    def __post_init__(self) -> None:
        for key in ("width", "layers", "num_samples"):
            check(getattr(self, key) >= 1, "sync", f"option {key!r} must be >= 1")


class Tracer:
    """Appends `event time` lines to one file per process (the bench maps pids to worker ids)."""

    def __init__(self, trace_dir: str) -> None:
        self.trace_dir = trace_dir
        self._file = None

    def __call__(self, event: str) -> None:
        if not self.trace_dir:
            return
        if self._file is None:
            self._file = open(os.path.join(self.trace_dir, f"{os.getpid()}.txt"), "a", buffering=1)  # noqa: SIM115
        self._file.write(f"{event} {time.time():.6f}\n")


class TracedSequential(nn.Sequential):
    """nn.Sequential (the same state dict) that notes when a version's weights are loaded into it."""

    tracer: Tracer | None = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.tracer is not None:
            self.tracer("load_start")
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.tracer is not None:
            self.tracer("load_end")
        return out


class RandomDataset:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, dataset_id: str) -> None:
        self.x, self.y, self.dataset_id = x, y, dataset_id
        self.tokens_per_sample = 1

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, ids) -> dict[str, torch.Tensor]:
        idx = check_ids(ids, len(self))
        return {"x": self.x[idx], "y": self.y[idx]}


class SyncTask:
    name = "bench.sync_task:make_task"
    defaults: ClassVar[dict[str, Any]] = {"codec": "fp32", "sync_every": 5, "batch_size": 2, "inner_lr": 1e-4,
                                          "inner_warmup_steps": 0, "outer_lr": 0.7, "outer_momentum": 0.9}

    def __init__(self, opts: SyncOptions) -> None:
        self.opts = opts
        self.options: dict[str, Any] = asdict(opts)
        self.tracer = Tracer(opts.trace_dir)
        self._splits: dict[str, RandomDataset] | None = None

    def build_model(self) -> nn.Module:
        mods: list[nn.Module] = []
        for i in range(self.opts.layers):
            if i:
                mods.append(nn.ReLU())
            mods.append(nn.Linear(self.opts.width, self.opts.width))
        model = TracedSequential(*mods)
        model.tracer = self.tracer
        return model

    def _data(self) -> dict[str, RandomDataset]:
        if self._splits is None:
            o = self.opts
            g = torch.Generator().manual_seed(o.data_seed)
            n = o.num_samples + EVAL_SAMPLES
            x = torch.randn(n, o.width, generator=g)
            y = torch.randn(n, o.width, generator=g)
            ds = make_dataset_id(FORMAT, str(o.width), str(o.num_samples), str(o.data_seed))
            self._splits = {"train": RandomDataset(x[:o.num_samples], y[:o.num_samples], ds),
                            "eval": RandomDataset(x[o.num_samples:], y[o.num_samples:],
                                                  make_dataset_id(FORMAT, "eval", ds))}
        return self._splits

    def train_data(self) -> RandomDataset:
        return self._data()["train"]

    def eval_data(self) -> RandomDataset:
        return self._data()["eval"]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.tracer("step")
        return F.mse_loss(model(batch["x"]), batch["y"])


def make_task(**options: Any) -> SyncTask:
    return SyncTask(parse_options(SyncOptions, options, "sync"))
