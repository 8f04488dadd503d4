"""The inner loop: H AdamW steps on a round's samples, the same code on every rank of a worker.

A worker is one process, or K ranks under torchrun (workers/ranks.py). Each micro-batch of
`batch_size` samples is cut into K equal shares, rank r training the r-th; DDP averages the
gradients, and since every task's loss is a mean over equal-sized samples, the K ranks take the same
step as one process training the whole micro-batch. Gradient accumulation skips DDP's all-reduce
(`no_sync`) on every micro-batch but the last of a step.

`precision` "bf16" runs the forward pass under `torch.autocast(bfloat16)`: parameters, gradients,
AdamW state, and so deltas and the outer step, stay fp32.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diloco import runs, schedule
from diloco.config import RunConfig
from diloco.errors import ConfigError
from diloco.tasks import load_task, to_device
from workers.ranks import Ranks


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's context for a run's `precision` (fp32: none)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Trained:
    """What one round of inner steps did."""

    losses: list[float]     # per optimizer step, the worker's mean over all its ranks
    micro_batches: int      # whole micro-batches of batch_size samples (all ranks together)
    train_s: float


class InnerLoop:
    """A worker's model, data and inner optimizer; `train` runs one round's steps."""

    def __init__(self, cfg: RunConfig, ranks: Ranks) -> None:
        if cfg.batch_size % ranks.world:
            raise ConfigError(f"batch_size {cfg.batch_size} of run {cfg.run!r} does not split evenly over "
                              f"{ranks.world} ranks: run torchrun with a number of ranks that divides it")
        self.cfg, self.ranks, self.device = cfg, ranks, ranks.device
        self.task = load_task(cfg.task, cfg.task_options)
        self.model = runs.build_model(self.task, cfg.seed).to(self.device)
        self.net: torch.nn.Module = self.model   # what the forward pass calls: the DDP wrapper on several ranks
        self.train_data = self.task.train_data()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.inner_lr,
                                           weight_decay=cfg.inner_weight_decay, betas=(0.9, 0.95))
        self.steps_done = 0

    def distribute(self) -> None:
        """Wrap the model in DDP (a collective: every rank calls it at the same point)."""
        self.net = self.ranks.wrap(self.model)

    def train(self, version: int, ids: list[int], should_stop: Callable[[], bool],
              on_step: Callable[[int, float, float, float], None] | None = None,
              first_step: int = 0) -> Trained | None:
        """One step per `grad_accum * batch_size` of `ids` (the round's samples, in order): `sync_every`
        steps, or DyLU's H for this worker, or a part of a round starting at its step `first_step` (the
        learning rate's position; streaming trains a round in pieces); None if any rank asked to stop.

        `on_step(step, loss, lr, elapsed_s)` is called after each step with this rank's loss.
        """
        cfg, ranks = self.cfg, self.ranks
        self.net.train()
        share = cfg.batch_size // ranks.world
        t0 = time.perf_counter()
        losses, micro_batches = [], 0
        for step in range(len(ids) // (cfg.grad_accum * cfg.batch_size)):
            if ranks.agree_stop(should_stop()):
                return None
            self.optimizer.zero_grad(set_to_none=True)
            lr = schedule.inner_lr(cfg, self.steps_done, version, first_step + step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro in range(cfg.grad_accum):
                start = (step * cfg.grad_accum + micro) * cfg.batch_size + ranks.rank * share
                batch = to_device(self.train_data.batch(ids[start:start + share]), self.device)
                # DDP reduces gradients at the backward of the step's last micro-batch only
                with ranks.no_sync(self.net, skip=micro < cfg.grad_accum - 1):
                    with autocast(cfg.precision, self.device):
                        loss = self.task.loss(self.net, batch) / cfg.grad_accum
                    loss.backward()
                total += loss.item()
                micro_batches += 1
            self.optimizer.step()
            self.steps_done += 1
            losses.append(total)
            if on_step is not None:
                on_step(step, total, lr, time.perf_counter() - t0)
        return Trained(ranks.mean(losses), micro_batches, time.perf_counter() - t0)
