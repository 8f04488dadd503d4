"""The inner learning rate schedule (diloco/schedule.py)."""

from __future__ import annotations

import pytest

from diloco import schedule
from diloco.config import RunConfig


def cfg(**kw) -> RunConfig:
    return RunConfig("r", **{"inner_lr": 0.01, "inner_warmup_steps": 0, "sync_every": 10, **kw})


def test_without_decay_the_lr_is_constant_after_warmup():
    c = cfg(inner_warmup_steps=4)
    assert [schedule.inner_lr(c, s, 0, s) for s in range(6)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert schedule.inner_lr(c, 10**6, 10**5, 3) == 0.01


def test_decay_follows_the_version_not_the_workers_own_steps():
    c = cfg(cooldown_from=4, cooldown_to=8)
    assert schedule.inner_lr(c, 0, 4, 0) == 0.01                      # the decay starts at version 4
    assert schedule.inner_lr(c, 0, 6, 0) == pytest.approx(0.005)       # halfway
    assert schedule.inner_lr(c, 999, 6, 0) == pytest.approx(0.005)     # however long the worker trained
    assert schedule.inner_lr(c, 0, 7, 5) == pytest.approx(0.01 * 0.5 / 4)  # per step within a round
    assert schedule.inner_lr(c, 0, 8, 0) == 0.0
    assert schedule.inner_lr(c, 0, 20, 0) == 0.0


def test_warmup_and_decay_multiply():
    c = cfg(inner_warmup_steps=10, cooldown_from=0, cooldown_to=2)
    assert schedule.inner_lr(c, 4, 1, 0) == pytest.approx(0.01 * 0.5 * 0.5)


def test_outer_momentum_cools_down_at_the_rounds_base_version():
    c = cfg(outer_momentum=0.9, cooldown_from=4, cooldown_to=8)
    assert [schedule.outer_momentum(c, v) for v in (0, 4, 6, 8, 9)] == pytest.approx([0.9, 0.9, 0.45, 0.0, 0.0])
    assert schedule.outer_momentum(cfg(outer_momentum=0.9), 10**6) == 0.9
