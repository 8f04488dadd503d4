"""`reduce_round` against a real file store: the mean of the valid deltas, and each shard downloaded
once (the next delta's shards are fetched while one is decoded, never fetched again)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch

from diloco import keys
from diloco.codecs import get_codec
from diloco.messages import Announcement
from diloco.reduce import reduce_round
from diloco.shards import encode_delta, l2_norm
from diloco.store import open_store

LIKE = {"a.weight": torch.zeros(3, 5), "b.bias": torch.zeros(7)}
SHARD_BYTES = 64   # several shards per delta


def test_reduce_round_downloads_each_shard_once_and_averages_the_valid_deltas(tmp_path):
    """Kills `Reducer.add` 3 and `reduce_round` 31, 34: the prefetched shards thrown away and every
    delta downloaded again (the same mean, twice the traffic on the round's critical path)."""
    store = open_store(tmp_path.as_uri())
    gets: list[str] = []
    real_get = store.get

    def counted(key, **kw):
        gets.append(key)
        return real_get(key, **kw)

    store.get = counted
    codec = get_codec("fp32")
    gen = torch.Generator().manual_seed(5)
    anns, deltas = [], []
    for i, worker in enumerate(("w0", "w1", "w2", "w3")):
        delta = {n: torch.randn(t.shape, generator=gen) for n, t in LIKE.items()}
        payloads = encode_delta(delta, codec, SHARD_BYTES)
        names = tuple(keys.delta_shard("t", 0, worker, "n", j) for j in range(len(payloads)))
        for key, data in zip(names, payloads, strict=True):
            store.put(key, data)
        lie = 2.0 if worker == "w2" else 1.0   # w2 claims a norm twice the real one: rejected
        anns.append((f"1-{i}", Announcement(
            run="t", worker=worker, nonce="n", version=0, codec="fp32", shards=names,
            sizes=tuple(len(p) for p in payloads), sha256=tuple(hashlib.sha256(p).hexdigest() for p in payloads),
            samples=8, tokens=8, inner_steps=5, loss=1.0, norm=lie * l2_norm(delta.values()))))
        if worker != "w2":
            deltas.append(delta)
    assert len(anns[0][1].shards) > 1
    with ThreadPoolExecutor(4) as pool:
        red = reduce_round(store, codec, LIKE, anns, SHARD_BYTES, pool)
    assert sorted(gets) == sorted(k for _, a in anns for k in a.shards), "a shard downloaded twice or never"
    assert [a.worker for a in red.included] == ["w0", "w1", "w3"]
    assert [(e, a.worker) for e, a, _ in red.rejected] == [("1-2", "w2")]
    assert "the announcement claims" in red.rejected[0][2]
    assert red.nbytes == sum(a.nbytes for _, a in anns if a.worker != "w2")
    for name in LIKE:
        expected = sum(d[name] for d in deltas) / 3
        torch.testing.assert_close(red.mean[name], expected, rtol=1e-6, atol=1e-6)
