"""TensorBoard scalars of a run, written by `diloco eval --tensorboard DIR`.

Per committed version (the step is the version number):

    eval/loss                   the held-out loss, for each version the evaluator evaluates
    train/loss                  the mean inner loss of the round's deltas (the aggregator's round stats)
    round/bytes, round/seconds, round/participants, round/samples, round/tokens, round/rejected
    workers/{id}/loss           each worker's announced loss
    workers/{id}/steps_per_s    its inner steps over its training time

Everything but eval/loss is read from Redis (the versions stream and the announcements each version
lists), so one writer holds the whole picture and the aggregator needs no file system. Each version
is written once per evaluator process; a restarted evaluator writes the history again into a new
event file in the same directory. Needs the `tensorboard` package (`pip install 'diloco[tensorboard]'`).
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from diloco import keys
from diloco.errors import ConfigError

log = logging.getLogger(__name__)

ROUND_STATS = {"bytes": "round/bytes", "duration_s": "round/seconds", "n": "round/participants",
               "samples": "round/samples", "tokens": "round/tokens", "rejected": "round/rejected"}


def summary_writer(logdir: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({e}): "
                          "pip install 'diloco[tensorboard]'") from None
    return SummaryWriter(log_dir=logdir)


class TensorBoardLog:
    def __init__(self, logdir: str, r: redis.Redis, run: str) -> None:
        self.writer = summary_writer(logdir)
        self.r, self.run = r, run
        self.last = "0-0"   # the versions stream's last entry written

    def eval_loss(self, version: int, loss: float) -> None:
        self.writer.add_scalar("eval/loss", loss, version)
        self.writer.flush()

    def rounds(self) -> int:
        """Write the round stats of every version committed since the last call; how many."""
        entries = self.r.xrange(keys.versions(self.run), min=f"({self.last}" if self.last != "0-0" else "-")
        for entry_id, fields in entries:
            self._round(fields)
            self.last = entry_id
        if entries:
            self.writer.flush()
        return len(entries)

    def _round(self, fields: dict[str, str]) -> None:
        version = int(fields["version"])
        if "loss" in fields:
            self.writer.add_scalar("train/loss", float(fields["loss"]), version)
        for field, tag in ROUND_STATS.items():
            if field in fields:
                self.writer.add_scalar(tag, float(fields[field]), version)
        for entry in filter(None, fields.get("entries", "").split(",")):
            found = self.r.xrange(keys.deltas(self.run), min=entry, max=entry)
            if not found:  # trimmed from the deltas stream: the round's totals above still hold
                continue
            ann = found[0][1]
            worker = ann.get("worker", "?")
            self.writer.add_scalar(f"workers/{worker}/loss", float(ann["loss"]), version)
            train_s = float(ann.get("train_s", 0))
            if train_s > 0:
                self.writer.add_scalar(f"workers/{worker}/steps_per_s", int(ann["inner_steps"]) / train_s, version)

    def close(self) -> None:
        self.writer.close()
