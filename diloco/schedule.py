"""The run's schedules: the workers' inner learning rate and the aggregator's outer momentum.

Inner lr: `inner_lr` times a linear warmup over a worker's own first `inner_warmup_steps` steps
(a worker that joins late warms up its fresh AdamW state), times the cooldown factor.

Cooldown: 1 up to version `cooldown_from`, then linear to 0 at version `cooldown_to` (0 = none). It
follows the run's position in versions, so every worker, however late it joined or often it
restarted, uses the same rate for the same round: a worker training from version v is at position
v + s / H at its inner step s. Two memories of the full-rate rounds fade with it, at the round's
base version: the aggregator's outer momentum and the share of the error-feedback residual a worker
carries into its next round. Kept constant, both go on applying full-rate updates while the inner rate
decays, and the final weights do not settle (docs/benchmarks.md).
"""

from __future__ import annotations

from diloco.config import RunConfig


def warmup_factor(warmup_steps: int, steps_done: int) -> float:
    """Factor for a worker's optimizer step number `steps_done` (0-based)."""
    return min(1.0, (steps_done + 1) / warmup_steps) if warmup_steps else 1.0


def decay_factor(decay_from: float, decay_to: float, position: float) -> float:
    """Factor at `position`; 1 everywhere when decay_to is 0 (no decay)."""
    if not decay_to or position <= decay_from:
        return 1.0
    return max(0.0, (decay_to - position) / (decay_to - decay_from))


def cooldown(cfg: RunConfig, position: float) -> float:
    return decay_factor(cfg.cooldown_from, cfg.cooldown_to, position)


def inner_lr(cfg: RunConfig, steps_done: int, version: int, step_in_round: int) -> float:
    position = version + step_in_round / cfg.sync_every
    return cfg.inner_lr * warmup_factor(cfg.inner_warmup_steps, steps_done) * cooldown(cfg, position)


def outer_momentum(cfg: RunConfig, base_version: int) -> float:
    return cfg.outer_momentum * cooldown(cfg, base_version)
