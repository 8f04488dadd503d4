"""`reduce_round` against a real file store: the mean of the valid deltas, and each shard downloaded
once (the next delta's shards are fetched while one is decoded, never fetched again)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from diloco import keys
from diloco.codecs import get_codec
from diloco.messages import Announcement
from diloco.reduce import reduce_round
from diloco.shards import encode_delta, l2_norm
from diloco.store import digest_of, open_store

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
            sizes=tuple(len(p) for p in payloads), digest=tuple(digest_of(p) for p in payloads),
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


def _announced(store, worker: str, i: int, delta: dict[str, torch.Tensor], codec) -> tuple[str, Announcement]:
    payloads = encode_delta(delta, codec, SHARD_BYTES)
    names = tuple(keys.delta_shard("t", 0, worker, "n", j) for j in range(len(payloads)))
    for key, data in zip(names, payloads, strict=True):
        store.put(key, data)
    return f"1-{i}", Announcement(
        run="t", worker=worker, nonce="n", version=0, codec=codec.name, shards=names,
        sizes=tuple(len(p) for p in payloads), digest=tuple(digest_of(p) for p in payloads),
        samples=8, tokens=8, inner_steps=5, loss=1.0, norm=l2_norm(delta.values()))


def test_a_weighted_reduce_divides_the_scaled_sum_by_the_sum_of_the_weights(tmp_path):
    """sum(w * s * d) / sum(w) against float64 (kills `Reducer.add` 40, 41 and `Reducer.result` 2-15:
    the factors dropped, or the weights' sum or the division changed)."""
    store, codec = open_store(tmp_path.as_uri()), get_codec("fp32")
    gen = torch.Generator().manual_seed(8)
    deltas = [{n: torch.randn(t.shape, generator=gen) for n, t in LIKE.items()} for _ in range(3)]
    anns = [_announced(store, f"w{i}", i, d, codec) for i, d in enumerate(deltas)]
    # mixed weights, and equal weights that are not 1 (tokens: every delta 40), which must not take the
    # unweighted path's divide-by-count (kills `Reducer.result` 8, 9)
    for factors in ([(3.0, 1.0), (1.0, 0.5), (2.0, 3 ** -0.5)], [(40.0, 1.0)] * 3, [(2.0, 1.0)] * 3):
        with ThreadPoolExecutor(2) as pool:
            red = reduce_round(store, codec, LIKE, anns, SHARD_BYTES, pool, factors)
        assert red.factors == factors and [a.worker for a in red.included] == ["w0", "w1", "w2"]
        total = sum(w for w, _ in factors)
        for name in LIKE:
            want = sum(w * s * d[name].double() for (w, s), d in zip(factors, deltas, strict=True)) / total
            torch.testing.assert_close(red.mean[name].double(), want, rtol=1e-6, atol=1e-6)


def test_a_reducer_refuses_a_delta_after_its_mean_and_a_second_mean(tmp_path):
    """The mean is taken in place: a later add or result would corrupt it (kills `Reducer.add` 1-4 and
    `Reducer.result` 1, the errors' messages)."""
    from diloco.reduce import Reducer

    store, codec = open_store(tmp_path.as_uri()), get_codec("fp32")
    entry, ann = _announced(store, "w0", 0, {n: torch.ones(t.shape) for n, t in LIKE.items()}, codec)
    with ThreadPoolExecutor(2) as pool:
        red = Reducer(store, codec, LIKE, SHARD_BYTES, pool)
        assert red.add(entry, ann) is None
        mean = red.result().mean
        assert all(torch.equal(mean[n], torch.ones(t.shape)) for n, t in LIKE.items())
        with pytest.raises(RuntimeError, match=r"^this Reducer's mean was taken: a delta added now would be summed"):
            red.add(entry, ann)
        with pytest.raises(RuntimeError, match=r"^this Reducer's mean was taken already$"):
            red.result()
