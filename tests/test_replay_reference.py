"""The replay the fault tests and the chaos run rely on (`diloco.replay`), checked against DiLoCo
computed independently (tests/reference.py) from the deltas in the store.

The aggregator here has a bug in one round (its outer step takes 1.5 times the learning rate for
version 2). The replay must recompute every version as the reference does, and flag version 2 and
the one trained from it; the reference agrees with the aggregator on version 1 only.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import load as st_load

import aggregator.aggregator as aggregator_module
from diloco import keys
from diloco.codecs import get_codec
from diloco.messages import Announcement
from diloco.reduce import reduce_round
from diloco.replay import recompute, replay
from diloco.store import open_store
from tests import harness, reference

LR, MU = 0.7, 0.9


def _reference_versions(r, store) -> list[tuple[dict, dict]]:
    """(weights, momentum) of each committed version, recomputed from v0 and the deltas each included."""
    theta = st_load(store.get(keys.weights_object("t", 0, 0)))
    b = st_load(store.get(keys.momentum_object("t", 0, 0)))
    floats = {n: t for n, t in theta.items() if t.is_floating_point()}
    out = []
    for _, entry in r.xrange(keys.versions("t")):
        deltas = []
        for entry_id in entry["entries"].split(","):
            [(_, fields)] = r.xrange(keys.deltas("t"), entry_id, entry_id)
            ann = Announcement.from_fields(fields)
            shards = [store.get(k, digest=h) for k, h in zip(ann.shards, ann.digest, strict=True)]
            deltas.append(reference.fp32_delta(shards, floats))
        theta, b = reference.outer_step(theta, b, deltas, lr=float(entry["outer_lr"]),
                                        mu=float(entry["outer_momentum"]), nesterov=True)
        out.append((theta, b))
    return out


def test_replay_recomputes_what_an_independent_reference_computes_and_flags_a_wrong_version(
        redis_url, file_url, r, monkeypatch):
    """Kills the mutants shared by the aggregator and the replay (in `diloco/outer.py`, `reduce.py`,
    `shards.py`: the replay's recomputation then differs from the reference), and the replay mutants
    that call every version a match (`matches` always true: version 2 goes unflagged)."""
    real, calls = aggregator_module.outer_step_, []

    def buggy_in_round_two(*args, lr: float, **kw):
        calls.append(lr)
        return real(*args, lr=lr * 1.5 if len(calls) == 2 else lr, **kw)

    monkeypatch.setattr(aggregator_module, "outer_step_", buggy_in_round_two)
    harness.init(redis_url, file_url, min_workers=2, outer_lr=LR, outer_momentum=MU)
    agg = harness.aggregator(redis_url, file_url, max_rounds=3)
    ws = [harness.worker(redis_url, file_url, f"w{i}", max_rounds=3) for i in range(2)]
    assert agg.result() == 3 and [w.result() for w in ws] == [3, 3]
    assert len(calls) == 3, "one outer step per version"

    store = open_store(file_url)
    expected = _reference_versions(r, store)
    recomputed = list(recompute(r, store, "t"))
    assert [v.entry["version"] for v in recomputed] == ["1", "2", "3"]
    for v, (theta, b) in zip(recomputed, expected, strict=True):
        assert v.entry["participants"] == "w0,w1"
        reference.assert_close(v.weights, theta, f"replayed weights of version {v.entry['version']}")
        reference.assert_close(v.momentum, b, f"replayed momentum of version {v.entry['version']}")
    assert [v.matches for v in recomputed] == [True, False, False]
    result = replay(r, store, "t")
    assert (result.versions, result.mismatched) == (3, [2, 3])


def test_a_round_of_no_deltas_reduces_to_zero(tmp_path):
    """Kills the mutant that fetches the first announcement's shards even when there is none."""
    like = {"a": torch.ones(3), "b": torch.ones(2, 2)}
    with ThreadPoolExecutor(2) as pool:
        red = reduce_round(open_store(tmp_path.as_uri()), get_codec("fp32"), like, [], 1 << 20, pool)
    assert (red.included, red.rejected, red.nbytes) == ([], [], 0)
    assert {n: t.tolist() for n, t in red.mean.items()} == {"a": [0.0] * 3, "b": [[0.0, 0.0], [0.0, 0.0]]}
