"""A rank other than 0 of a worker under torchrun: it trains its share of each batch and nothing else.

It never connects to Redis or the store. Rank 0 (workers.worker.Worker) sends it the run's config,
then each round's samples and, when it loaded a new version, the weights (workers/ranks.py). It
checks its model against the run's like rank 0 does, and resumes the inner optimizer from the same
local checkpoint files as rank 0 (read only; rank 0 writes them), so AdamW states stay identical.
"""

from __future__ import annotations

import logging
import threading

import torch

from diloco import model
from diloco.config import RunConfig, WorkerSettings
from diloco.errors import ConfigError, ModelMismatch
from workers.checkpoint import Checkpoint
from workers.inner import InnerLoop
from workers.ranks import Ranks

log = logging.getLogger(__name__)


class Follower:
    def __init__(self, settings: WorkerSettings, ranks: Ranks) -> None:
        assert not ranks.leader, "rank 0 runs the Worker"
        self.s, self.ranks = settings, ranks
        self.stop_event = threading.Event()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.cfg = RunConfig.from_fields(ranks.recv_config())
        self.inner = InnerLoop(self.cfg, ranks)
        self.optimizer = self.inner.optimizer
        self.residual: dict[str, torch.Tensor] = {}  # checkpoint.load sets it; only rank 0 encodes
        got = model.model_hash(self.inner.model.state_dict())
        if got != self.cfg.model_hash:
            raise ModelMismatch(f"rank {ranks.rank}: the local model (hash {got}) is not the run's "
                                f"({self.cfg.model_hash}), though rank 0's is")
        if self.inner.train_data.dataset_id != self.cfg.dataset_id:
            raise ConfigError(f"rank {ranks.rank}: the local dataset {self.inner.train_data.dataset_id} is not "
                              f"the run's dataset {self.cfg.dataset_id}")
        self.inner.distribute()
        self.checkpoint = Checkpoint(settings.checkpoint_dir, settings.worker_id) if settings.checkpoint_dir else None

    @property
    def steps_done(self) -> int:
        return self.inner.steps_done

    @steps_done.setter
    def steps_done(self, value: int) -> None:
        self.inner.steps_done = value

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, max_rounds: int | None = None) -> int:
        """Train the rounds rank 0 sends until it says stop (or any rank stops mid-round); rounds trained.

        `max_rounds` is rank 0's to count: it sends stop after its last round.
        """
        if self.checkpoint is not None:
            self.checkpoint.load(self)
        rounds = 0
        while (cmd := self.ranks.recv_round()) is not None:
            if cmd.reset:
                self.ranks.broadcast_state(self.inner.model)
            self.inner.steps_done = cmd.steps_done
            if self.inner.train(cmd.version, cmd.ids, self.stop_event.is_set) is None:
                log.info("rank %d: stopping with the other ranks", self.ranks.rank)
                break
            rounds += 1
        return rounds
