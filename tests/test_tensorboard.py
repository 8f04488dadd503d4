"""`diloco eval --tensorboard DIR`: event files with the run's curves, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diloco import keys
from diloco.cli import main as cli_main
from tests import harness


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_eval_writes_eval_train_round_and_worker_scalars(redis_url, file_url, r, tmp_path):
    harness.init(redis_url, file_url, min_workers=2)
    agg = harness.aggregator(redis_url, file_url, max_rounds=2)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=2) for i in range(2)]
    assert agg.result() == 2 and [w.result() for w in ws] == [2, 2]

    logdir = tmp_path / "tb"
    code = cli_main(["eval", "--run", "t", "--redis-url", redis_url, "--store", file_url, "--max-rounds", "1",
                     "--tensorboard", str(logdir)])
    assert code == 0
    scalars = _scalars(logdir)
    expected = {"eval/loss", "train/loss", "round/bytes", "round/seconds", "round/participants", "round/samples",
                "round/tokens", "round/rejected", "workers/w0/loss", "workers/w0/steps_per_s", "workers/w1/loss",
                "workers/w1/steps_per_s"}
    assert expected <= set(scalars), sorted(expected - set(scalars))
    versions = {int(f["version"]): f for _, f in r.xrange(keys.versions("t"))}
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([float(versions[v]["loss"]) for v in (1, 2)])
    assert [v for _, v in scalars["round/participants"]] == [2.0, 2.0]
    assert [v for _, v in scalars["round/bytes"]] == [float(versions[v]["bytes"]) for v in (1, 2)]
    # the evaluator took the newest version (2); its loss is the one recorded in Redis
    assert scalars["eval/loss"] == [(2, pytest.approx(float(r.hget(keys.eval_losses("t"), "2")), abs=1e-6))]
    assert all(v > 0 for _, v in scalars["workers/w1/steps_per_s"])


def test_tensorboard_without_the_package_names_the_extra(monkeypatch):
    import sys

    from diloco.errors import ConfigError
    from diloco.tboard import summary_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match=r"pip install 'diloco\[tensorboard\]'"):
        summary_writer("unused")
