"""The workers' inner learning rate: linear warmup, constant, then an optional linear decay to zero.

Warmup counts a worker's own optimizer steps (a worker that joins late warms up its fresh AdamW
state). The decay is global: it follows the run's position in versions, so every worker, however
late it joined or often it restarted, uses the same learning rate for the same round. A worker
training from version v is at position v + s / H at its inner step s; the factor is 1 up to version
`inner_lr_decay_from` and falls linearly to 0 at version `inner_lr_decay_to` (a warmup-stable-decay
schedule: most of the run at the full rate, then a cooldown that removes the iterate noise of a
constant rate from the final weights).
"""

from __future__ import annotations

from diloco.config import RunConfig


def warmup_factor(warmup_steps: int, steps_done: int) -> float:
    """Factor for a worker's optimizer step number `steps_done` (0-based)."""
    return min(1.0, (steps_done + 1) / warmup_steps) if warmup_steps else 1.0


def decay_factor(decay_from: int, decay_to: int, position: float) -> float:
    """Factor at `position` (in versions); 1 everywhere when decay_to is 0 (no decay)."""
    if not decay_to or position <= decay_from:
        return 1.0
    return max(0.0, (decay_to - position) / (decay_to - decay_from))


def inner_lr(cfg: RunConfig, steps_done: int, version: int, step_in_round: int) -> float:
    position = version + step_in_round / cfg.sync_every
    return (cfg.inner_lr * warmup_factor(cfg.inner_warmup_steps, steps_done)
            * decay_factor(cfg.inner_lr_decay_from, cfg.inner_lr_decay_to, position))
