"""The worker's local checkpoint: inner optimizer state that a restarted worker picks up again.

AdamW moments, the LR schedule, the error-feedback residual and the step count survive a restart
of the process (not of the machine's disk). Tensors go to `state.safetensors`, everything else to
`state.msgpack`; both are written to temporary names and renamed, the msgpack last, so a crash
leaves the previous checkpoint intact. A checkpoint of another run or model is ignored with a log
line, never loaded. Global weights are not saved: a restarted worker downloads the current version.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from workers.worker import Worker

log = logging.getLogger(__name__)
FORMAT = "diloco-worker-checkpoint/1"


class Checkpoint:
    def __init__(self, directory: str, worker_id: str) -> None:
        self.dir = Path(directory) / worker_id
        self.tensors = self.dir / "state.safetensors"
        self.meta = self.dir / "state.msgpack"

    def save(self, w: Worker) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        opt = w.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for idx, state in opt["state"].items():
            for k, v in state.items():
                tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous()
        for name, t in w.residual.items():  # views of one buffer (encode_with_feedback): safetensors wants copies
            tensors[f"res.{name}"] = t.detach().cpu().clone()
        meta = {"format": FORMAT, "run": w.s.run, "model_hash": w.cfg.model_hash, "steps_done": w.steps_done,
                "version": w.version, "param_groups": opt["param_groups"]}
        save_file(tensors, str(self.tensors) + ".tmp")
        os.replace(str(self.tensors) + ".tmp", self.tensors)
        Path(str(self.meta) + ".tmp").write_bytes(msgpack.packb(meta, use_bin_type=True))
        os.replace(str(self.meta) + ".tmp", self.meta)

    def load(self, w: Worker) -> bool:
        """Restore the inner state into `w` if a matching checkpoint exists; True if it did."""
        if not self.meta.exists() or not self.tensors.exists():
            return False
        try:
            meta: dict[str, Any] = msgpack.unpackb(self.meta.read_bytes(), raw=False, strict_map_key=False)
            tensors = load_file(str(self.tensors))
        except Exception as e:  # a corrupt local file must not stop the worker: start fresh
            log.warning("ignoring unreadable checkpoint in %s: %s", self.dir, e)
            return False
        if meta.get("format") != FORMAT or meta.get("run") != w.s.run or meta.get("model_hash") != w.cfg.model_hash:
            log.warning("ignoring checkpoint in %s: it belongs to another run or model", self.dir)
            return False
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            kind, _, rest = key.partition(".")
            if kind == "opt":
                idx, _, name = rest.partition(".")
                state.setdefault(int(idx), {})[name] = t
        w.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        # on the CPU, where deltas are encoded, whatever device the model trains on
        w.residual = {k[4:]: t for k, t in tensors.items() if k.startswith("res.")}
        w.steps_done = int(meta["steps_done"])
        log.info("resumed inner optimizer state from %s (%d steps done)", self.dir, w.steps_done)
        return True
