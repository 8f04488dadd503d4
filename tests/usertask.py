"""A user task (`tests.usertask:make_task`) whose model depends on the machine's environment,
the way user code differs between machines when one of them runs a stale checkout."""

from __future__ import annotations

import os

import torch

from diloco.tasks.tiny import make_task as make_tiny


def make_task(**options):
    task = make_tiny(**options)
    build = task.build_model

    def build_model() -> torch.nn.Module:
        net = build()
        extra = int(os.environ.get("USERTASK_EXTRA", "0"))
        if extra:
            net[0] = torch.nn.Linear(task.options["in_dim"], task.options["hidden"] + extra)
        return net

    task.build_model = build_model
    return task
