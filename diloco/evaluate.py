"""Held-out evaluation: the loss of a weights version on the task's evaluation split.

`diloco eval` follows the versions stream and records each version's eval loss in the hash
`diloco:{run}:eval` (version -> loss), where `diloco status` and the monitor read it. It evaluates
the same fixed samples every time, so losses of different versions compare. It evaluates in fp32
whatever the run's `precision`, so losses compare across runs too. With `--tensorboard DIR` it
also writes TensorBoard scalars (diloco/tboard.py).
"""

from __future__ import annotations

import logging
import threading

import redis
import torch

from diloco import keys, runs
from diloco.config import RunConfig
from diloco.connect import OUTAGE_ERRORS, Outage, connect_redis
from diloco.errors import RunNotFound
from diloco.messages import Head
from diloco.store import open_store
from diloco.tasks import Task, load_task, to_device

log = logging.getLogger(__name__)


@torch.no_grad()
def eval_loss(task: Task, model: torch.nn.Module, *, max_samples: int = 512, batch_size: int = 64,
              device: str | torch.device = "cpu") -> float:
    """Mean loss over the first `max_samples` samples of the evaluation split."""
    data = task.eval_data()
    n = min(max_samples, len(data))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        ids = list(range(start, min(start + batch_size, n)))
        total += float(task.loss(model, to_device(data.batch(ids), device))) * len(ids)
        count += len(ids)
    model.train(was_training)
    return total / max(count, 1)


class Evaluator:
    """Follows the versions stream and records the eval loss of every committed version."""

    def __init__(self, redis_url: str, store_url: str, run: str, *, max_samples: int = 512, device: str = "cpu",
                 block_ms: int = 1000, outage_limit_s: float = 600.0, tensorboard: str | None = None) -> None:
        self.stop_event = threading.Event()
        self.r = connect_redis(redis_url)
        self.store = open_store(store_url)
        self.run_name, self.max_samples, self.device, self.block_ms = run, max_samples, device, block_ms
        self.cfg: RunConfig = runs.load_config(self.r, run)
        self.task = load_task(self.cfg.task, self.cfg.task_options)
        self.model = runs.build_model(self.task, self.cfg.seed).to(device)
        self.outage = Outage(outage_limit_s, self.stop_event)
        self.tb = None
        if tensorboard:
            from diloco.tboard import TensorBoardLog

            self.tb = TensorBoardLog(tensorboard, self.r, run)

    def stop(self) -> None:
        self.stop_event.set()

    def evaluate(self, head: Head) -> float:
        """The eval loss of `head`'s weights; with fragments `head` is fragment 0's, and the model joins every
        fragment at its newest version (fragment 0 syncs last in a cycle, so the others are at least as new)."""
        if self.cfg.is_streaming:
            self.model.load_state_dict(runs.load_full_weights(self.store, runs.read_heads(self.r, self.cfg)))
        else:
            self.model.load_state_dict(runs.load_weights(self.store, head))
        loss = eval_loss(self.task, self.model, max_samples=self.max_samples, device=self.device)
        self.r.hset(keys.eval_losses(self.run_name), str(head.version), f"{loss:.6f}")
        log.info("version %d: eval loss %.4f", head.version, loss)
        if self.tb is not None:
            self.tb.eval_loss(head.version, loss)
        return loss

    def run(self, max_rounds: int | None = None) -> int:
        """Evaluate versions as they are committed (the newest first if several wait); returns how many."""
        done = 0
        while not self.stop_event.is_set() and (max_rounds is None or done < max_rounds):
            try:
                if self.tb is not None:
                    self.tb.rounds()
                lane = self.cfg.lanes[0]
                head = runs.read_head(self.r, lane)
                if not self.r.hexists(keys.eval_losses(self.run_name), str(head.version)):
                    self.evaluate(head)
                    done += 1
                    continue
                last = self.r.xinfo_stream(keys.versions(lane))["last-generated-id"] \
                    if self.r.exists(keys.versions(lane)) else "0-0"
                self.r.xread({keys.versions(lane): last}, block=self.block_ms)
                self.outage.ok()
            except RunNotFound as e:
                self.outage.failed("the run to reappear in Redis", e)
            except OUTAGE_ERRORS as e:
                self.outage.failed("Redis and the object store", e)
            except redis.ResponseError as e:
                self.outage.failed("Redis", e)
        if self.tb is not None:
            self.tb.close()
        return done
