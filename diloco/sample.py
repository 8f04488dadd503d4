"""`diloco sample`: text from a committed version, for a quick look at whether a run is learning.

A task that produces text says how, with four optional members beside the `Task` protocol:
`encode(text) -> list[int]`, `decode(ids) -> str`, `logits(model, ids[B, T]) -> [B, T, vocab]` and
`context_len` (the most positions the model takes). The built-in `gpt` and `hf` tasks have them.

Sampling is deterministic for a seed: the draws come from a CPU `torch.Generator` seeded with it, so
the same version, prompt and settings print the same text on any machine of the same torch build.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
import torch

from diloco import runs
from diloco.errors import ConfigError
from diloco.export import run_weights
from diloco.store import ObjectStore
from diloco.tasks import Task, load_task

SAMPLING = ("encode", "decode", "logits", "context_len")


@dataclass(frozen=True)
class SampleSettings:
    max_new_tokens: int = 200
    temperature: float = 0.8     # 0: always the most likely token
    top_k: int = 40              # 0: the whole vocabulary
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")


def check_task(task: Task) -> None:
    missing = [a for a in SAMPLING if not hasattr(task, a)]
    if missing:
        raise ConfigError(f"task {task.name!r} does not generate text (it lacks {', '.join(missing)}); "
                          "`diloco sample` works with the gpt and hf tasks")


@torch.no_grad()
def generate(task: Task, model: torch.nn.Module, prompt: str, s: SampleSettings,
             device: str | torch.device = "cpu") -> str:
    """The continuation of `prompt` (decoded new tokens only)."""
    check_task(task)
    ids = task.encode(prompt)  # type: ignore[attr-defined]
    if not ids:
        raise ConfigError("the prompt is empty: give --prompt some text")
    model.eval()
    g = torch.Generator().manual_seed(s.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(s.max_new_tokens):
        ctx = x[:, -task.context_len:]  # type: ignore[attr-defined]
        logits = task.logits(model, ctx)[0, -1].float().cpu()  # type: ignore[attr-defined]
        x = torch.cat([x, torch.tensor([[_pick(logits, s, g)]], device=device)], dim=1)
    return task.decode(x[0, len(ids):].tolist())  # type: ignore[attr-defined]


def _pick(logits: torch.Tensor, s: SampleSettings, g: torch.Generator) -> int:
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g))


def sample_version(r: redis.Redis, store: ObjectStore, run: str, prompt: str, s: SampleSettings, *,
                   version: int | None = None, device: str = "cpu") -> tuple[int, str]:
    """(version, continuation) from the weights of `version` (default: the head), checksum verified."""
    cfg = runs.load_config(r, run)
    task = load_task(cfg.task, cfg.task_options)
    check_task(task)  # before any download
    state, meta = run_weights(r, store, cfg, version)
    net = runs.build_model(task, cfg.seed)
    net.load_state_dict(state)
    return meta["version"], generate(task, net.to(device), prompt, s, device)
