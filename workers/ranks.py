"""The ranks of one logical worker: one process, or K processes started by torchrun.

Under `torchrun --nproc-per-node K -m diloco worker ...` the K ranks form one worker. Rank 0 (the
leader) alone talks to Redis and the object store; it tells the other ranks (followers) what to do
with small messages over a process group:

    config       once: the run's config, as the JSON of its plain-string fields
    round        per round: version, steps done, whether the weights were reset, the round's sample ids
    state        after a reset: every state-dict tensor, broadcast from rank 0
    stop         the leader is leaving: followers exit

Every inner step all ranks agree on whether to stop (an all-reduce of their stop flags), so a
signal to any rank stops them all at the same step. Messages are tensors, never pickles. On CUDA the
model's collectives use NCCL and the messages a separate gloo group, so a follower waiting for the
next round blocks on a socket rather than on the GPU. Waits between rounds last as long as the
leader waits for a version, so the groups' timeout is long; a rank that dies closes its sockets,
which ends its peers' waits with an error, and torchrun stops the other ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Between rounds a follower waits as long as the leader waits for the next version (a paused run: days).
WAIT_TIMEOUT = timedelta(days=30)
_STOP, _ROUND = 0, 1


@dataclass(frozen=True)
class RoundCommand:
    version: int
    steps_done: int        # the leader's optimizer steps so far: drives the warmup on every rank
    reset: bool            # the leader loaded new weights: the state broadcast follows
    ids: list[int]         # the round's samples in training order (every rank gets all of them)


class Ranks:
    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                 ctl: dist.ProcessGroup | None = None, *, distributed: bool = False) -> None:
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.ctl = ctl  # the group for messages (None: the default group)
        self.distributed = distributed  # in a process group (under torchrun, even with one rank)

    @classmethod
    def from_env(cls, device: str) -> Ranks:
        """The ranks torchrun started (WORLD_SIZE, RANK, LOCAL_RANK), or one rank without torchrun.

        Under torchrun even one rank joins a process group and wraps its model in DDP, so a machine
        with one GPU runs the same code as one with eight.
        """
        dev = torch.device(device)
        if "WORLD_SIZE" not in os.environ:
            return cls(device=dev)
        world = int(os.environ["WORLD_SIZE"])
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=WAIT_TIMEOUT)
        ctl = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT) if dev.type == "cuda" else None
        return cls(rank, world, dev, ctl, distributed=True)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def peer_failure(self, e: BaseException) -> bool:
        """Whether `e` is a collective failing because another rank died (its sockets closed)."""
        if not self.distributed:
            return False
        return isinstance(e, dist.DistError) or "Connection closed by peer" in str(e) \
            or "Connection reset by peer" in str(e)

    def close(self) -> None:
        """Leave the process group after a clean exit of every rank (a barrier first, so no rank tears
        its sockets down while another still uses them)."""
        if self.distributed and dist.is_initialized():
            dist.barrier(group=self.ctl)
            dist.destroy_process_group()

    # --- the model --------------------------------------------------------------------------

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, net: torch.nn.Module, *, skip: bool) -> contextlib.AbstractContextManager:
        """DDP's no_sync (no gradient all-reduce in this backward) when `skip`, else nothing."""
        return net.no_sync() if skip and hasattr(net, "no_sync") else contextlib.nullcontext()

    def broadcast_state(self, model: torch.nn.Module) -> None:
        """Every state-dict tensor from rank 0, in place (the tensors share the parameters' storage)."""
        if self.distributed:
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)

    # --- agreement --------------------------------------------------------------------------

    def agree_stop(self, stop: bool) -> bool:
        """True on every rank if any rank asks to stop."""
        if not self.distributed:
            return stop
        flag = torch.tensor([int(stop)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctl)
        return bool(flag.item())

    def mean(self, values: list[float]) -> list[float]:
        """The element-wise mean over ranks (each rank's losses are over its share of the samples)."""
        if not self.distributed or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.ctl)
        return (t / self.world).tolist()

    # --- messages from the leader -----------------------------------------------------------

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=0, group=self.ctl)
        return t

    def send_config(self, fields: dict[str, str]) -> None:
        if self.distributed:
            data = torch.frombuffer(bytearray(json.dumps(fields).encode()), dtype=torch.uint8)
            self._bcast(torch.tensor([data.numel()]))
            self._bcast(data)

    def recv_config(self) -> dict[str, str]:
        n = int(self._bcast(torch.zeros(1, dtype=torch.int64)).item())
        data = self._bcast(torch.zeros(n, dtype=torch.uint8))
        return json.loads(bytes(data.tolist()).decode())

    def send_round(self, cmd: RoundCommand | None) -> None:
        """The next round, or None: stop."""
        if not self.distributed:
            return
        if cmd is None:
            self._bcast(torch.tensor([_STOP, 0, 0, 0, 0]))
            return
        self._bcast(torch.tensor([_ROUND, cmd.version, cmd.steps_done, int(cmd.reset), len(cmd.ids)]))
        self._bcast(torch.tensor(cmd.ids, dtype=torch.int64))

    def recv_round(self) -> RoundCommand | None:
        op, version, steps, reset, n = self._bcast(torch.zeros(5, dtype=torch.int64)).tolist()
        if op == _STOP:
            return None
        ids = self._bcast(torch.zeros(n, dtype=torch.int64)).tolist()
        return RoundCommand(version, steps, bool(reset), ids)
