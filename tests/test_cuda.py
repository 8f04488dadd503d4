"""The CUDA paths, on a machine with a GPU (`pytest -m cuda`; CI has none and leaves these out).

A worker training on `cuda` (the tiny task, whose BatchNorm holds float and int64 buffers, and a
small GPT) commits versions through the real services, its residual and deltas stay on the CPU
where they are encoded, and every committed version replays bit for bit: the aggregator's CPU
arithmetic does not depend on where the workers trained.
"""

from __future__ import annotations

import pytest
import torch

from diloco import keys
from diloco.replay import replay
from diloco.store import open_store
from tests import harness

pytestmark = pytest.mark.cuda

GPT_SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "seq_len": 32, "corpus_mb": 0.25}


@pytest.mark.parametrize(("task", "options", "codec"), [
    ("tiny", {"num_samples": 400}, "bf16"),
    ("tiny", {"num_samples": 400}, "topk"),
    ("gpt", GPT_SMALL, "int8"),
])
def test_workers_train_on_cuda_and_every_version_replays(redis_url, file_url, r, task, options, codec):
    assert torch.cuda.is_available(), "run these on a machine with a CUDA device"
    harness.init(redis_url, file_url, task=task, task_options=options, codec=codec, min_workers=2)
    rounds: list = []
    agg = harness.aggregator(redis_url, file_url, max_rounds=3)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=3, device="cuda", observer=rounds.append)
          for i in range(2)]
    assert agg.result(300) == 3 and [w.result(300) for w in ws] == [3, 3]
    assert all(t.device.type == "cpu" for info in rounds for t in info.delta.values()), "deltas encode on the CPU"
    assert any(p.is_cuda for w in ws for p in w.service.model.parameters()), "the model trained on the GPU"
    assert all(t.device.type == "cpu" for w in ws for t in w.service.residual.values())
    entries = [f for _, f in r.xrange(keys.versions("t"))]
    assert [e["n"] for e in entries] == ["2", "2", "2"]
    assert replay(r, open_store(file_url), "t").mismatched == []
