"""A tiny regression task, fast enough that tests can train it for many steps in milliseconds.

The data is synthetic, y = sin(x @ A) @ b + noise, generated from `data_seed` with a private
torch.Generator so building the task never disturbs the caller's global RNG. The model has a
BatchNorm on purpose: its state dict then holds float buffers (running_mean/var) and an int64
buffer (num_batches_tracked), which every part of the system that ships weights must handle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diloco.tasks import check, check_ids, make_dataset_id, parse_options

FORMAT = "tiny-v1"
EVAL_SAMPLES = 512


@dataclass(frozen=True)
class TinyOptions:
    in_dim: int = 8
    hidden: int = 32
    num_samples: int = 4096
    data_seed: int = 1234

    def __post_init__(self) -> None:
        for key in ("in_dim", "hidden", "num_samples"):
            check(getattr(self, key) >= 1, "tiny", f"option {key!r} must be >= 1")
        check(self.data_seed >= 0, "tiny", "option 'data_seed' must be >= 0")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, without numpy (which the CPU torch wheel does not require)."""
    flat = t.detach().contiguous().view(-1).view(torch.uint8)
    buf = bytearray(flat.numel())
    torch.frombuffer(buf, dtype=torch.uint8).copy_(flat)
    return bytes(buf)


class TensorDataset:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, dataset_id: str) -> None:
        self.x, self.y = x, y
        self.dataset_id = dataset_id
        self.tokens_per_sample = 1  # one regression target per sample

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, ids) -> dict[str, torch.Tensor]:
        idx = check_ids(ids, len(self))
        return {"x": self.x[idx], "y": self.y[idx]}


class TinyTask:
    name = "tiny"
    # Run settings used when the user gives none: the run-wide sync_every of 500 would need more
    # units than the default 4096 samples hold (256 units of 16); 20 steps is a round of 20 units.
    defaults: ClassVar[dict[str, Any]] = {"sync_every": 20, "batch_size": 16, "inner_warmup_steps": 10}

    def __init__(self, opts: TinyOptions) -> None:
        self.opts = opts
        self.options: dict[str, Any] = asdict(opts)
        self._splits: dict[str, TensorDataset] | None = None

    def _data(self) -> dict[str, TensorDataset]:
        if self._splits is None:
            o = self.opts
            g = torch.Generator().manual_seed(o.data_seed)
            # scaled so x @ A ~ N(0, 1): sin stays in its smooth range and y has unit-ish variance
            A = torch.randn(o.in_dim, o.in_dim, generator=g) / o.in_dim**0.5
            b = torch.randn(o.in_dim, 1, generator=g) / o.in_dim**0.5
            n = o.num_samples + EVAL_SAMPLES  # eval samples come after the train ones in the stream
            x = torch.randn(n, o.in_dim, generator=g)
            y = torch.sin(x @ A) @ b + 0.01 * torch.randn(n, 1, generator=g)
            # hidden is left out: it changes the model, not the samples
            data_opts = json.dumps({"in_dim": o.in_dim, "num_samples": o.num_samples, "seed": o.data_seed})
            self._splits = {}
            for split, sl in (("train", slice(0, o.num_samples)), ("eval", slice(o.num_samples, n))):
                xs, ys = x[sl].clone(), y[sl].clone()
                content = hashlib.sha256(tensor_bytes(xs) + tensor_bytes(ys)).hexdigest()
                ds_id = make_dataset_id(content, FORMAT, data_opts, split)
                self._splits[split] = TensorDataset(xs, ys, ds_id)
        return self._splits

    def build_model(self) -> nn.Module:
        o = self.opts
        return nn.Sequential(nn.Linear(o.in_dim, o.hidden), nn.BatchNorm1d(o.hidden), nn.ReLU(),
                             nn.Linear(o.hidden, 1))

    def train_data(self) -> TensorDataset:
        return self._data()["train"]

    def eval_data(self) -> TensorDataset:
        return self._data()["eval"]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch["x"]), batch["y"])


def make_task(**options: Any) -> TinyTask:
    return TinyTask(parse_options(TinyOptions, options, "tiny"))
