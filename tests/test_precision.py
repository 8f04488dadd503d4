"""The `precision` run setting: bf16 autocast in the inner loop, fp32 everywhere it is kept or sent."""

from __future__ import annotations

import pytest
import torch

from diloco import keys, model
from diloco.config import RunConfig
from diloco.errors import ConfigError
from diloco.store import open_store
from tests import harness


def test_precision_is_validated_and_defaults_to_fp32():
    assert RunConfig(run="r1").precision == "fp32"
    cfg = RunConfig(run="r1", precision="bf16")
    assert RunConfig.from_fields(cfg.to_fields()) == cfg
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16"):
        RunConfig(run="r1", precision="fp16")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_autocasts_the_forward_pass_and_keeps_weights_and_deltas_fp32(redis_url, file_url, r, precision):
    harness.init(redis_url, file_url, precision=precision)
    rounds: list = []
    agg = harness.aggregator(redis_url, file_url, max_rounds=1)
    svc = harness.worker(redis_url, file_url, "w0", max_rounds=1, observer=rounds.append, start=False)
    net = svc.service.model
    seen: set[torch.dtype] = set()
    net[0].register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))  # the first Linear
    svc.start()
    assert svc.result() == 1 and agg.result() == 1

    assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    info = rounds[0]
    assert all(p.dtype == torch.float32 for p in net.parameters()), "master weights stay fp32"
    assert all(t.dtype == torch.float32 for t in info.delta.values()), "deltas are fp32"
    assert all(v.dtype == torch.float32 for s in info.optimizer.state.values() for k, v in s.items()
               if k != "step"), "AdamW state is fp32"
    assert any(t.abs().sum() > 0 for t in info.delta.values())
    entry = r.xrange(keys.versions("t"))[-1][1]
    committed = model.from_bytes(open_store(file_url).get(entry["weights"]), "v1")
    assert all(t.dtype == torch.float32 for n, t in committed.items() if t.is_floating_point())
    assert all(bool(torch.isfinite(t).all()) for t in committed.values() if t.is_floating_point())
