"""`reduce_round` against a real file store: the mean of the valid deltas, and each shard downloaded
once (the next delta's shards are fetched while one is decoded, never fetched again)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from diloco import keys
from diloco.codecs import get_codec
from diloco.errors import ChecksumMismatch
from diloco.messages import Announcement
from diloco.reduce import reduce_round
from diloco.shards import encode_delta, l2_norm, max_shard_object_bytes
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
    codec = get_codec("bf16")   # fp32 deltas stream instead (tests below)
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
            run="t", worker=worker, nonce="n", version=0, codec="bf16", shards=names,
            sizes=tuple(len(p) for p in payloads), digest=tuple(digest_of(p) for p in payloads),
            samples=8, tokens=8, inner_steps=5, loss=1.0,
            norm=lie * l2_norm([t.bfloat16().float() for t in delta.values()]))))
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
        expected = sum(d[name].bfloat16().float() for d in deltas) / 3
        torch.testing.assert_close(red.mean[name], expected, rtol=1e-6, atol=1e-6)


def _announced(store, worker: str, i: int, delta: dict[str, torch.Tensor], codec,
               shard_bytes: int = SHARD_BYTES) -> tuple[str, Announcement]:
    payloads = encode_delta(delta, codec, shard_bytes)
    names = tuple(keys.delta_shard("t", 0, worker, "n", j) for j in range(len(payloads)))
    for key, data in zip(names, payloads, strict=True):
        store.put(key, data)
    return f"1-{i}", Announcement(
        run="t", worker=worker, nonce="n", version=0, codec=codec.name, shards=names,
        sizes=tuple(len(p) for p in payloads), digest=tuple(digest_of(p) for p in payloads),
        samples=8, tokens=8, inner_steps=5, loss=1.0, norm=l2_norm(delta.values()))


@pytest.mark.parametrize(("how", "reason"), [("flip", "ChecksumMismatch"), ("big", "ObjectTooLarge")])
def test_a_whole_shard_delta_is_checked_against_its_digest_and_the_shard_limit(tmp_path, how, reason):
    """The whole-shard path (every codec but fp32) fetches with the announced digest and the run's
    shard limit: a shard with other bytes, or one larger than `shard_bytes` allows, rejects its delta
    (kills `Reducer.fetch` 11, 12, 15, 16: the digest or the limit not passed to the store)."""
    store, codec, shard_bytes = open_store(tmp_path.as_uri()), get_codec("bf16"), 4096
    like = {"w": torch.zeros(200, 200)}
    gen = torch.Generator().manual_seed(6)
    deltas = [{"w": torch.randn(200, 200, generator=gen).bfloat16().float()} for _ in range(2)]   # bf16's norm
    anns = [_announced(store, f"w{i}", i, d, codec, shard_bytes) for i, d in enumerate(deltas)]
    if how == "flip":
        path = store.root / anns[1][1].shards[0]
        path.chmod(0o644)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01   # a value's lowest bit: a valid shard, other bytes than announced
        path.write_bytes(bytes(data))
    else:   # w1's delta in one shard, valid and honestly announced, but over the run's limit
        entry, ann = anns[1]
        (payload,) = encode_delta(deltas[1], codec, 1 << 20)
        assert len(payload) > max_shard_object_bytes(shard_bytes)
        key = keys.delta_shard("t", 0, "w1", "whole", 0)
        store.put(key, payload)
        anns[1] = (entry, dataclasses.replace(ann, shards=(key,), sizes=(len(payload),),
                                              digest=(digest_of(payload),)))
    with ThreadPoolExecutor(2) as pool:
        red = reduce_round(store, codec, like, anns, shard_bytes, pool)
    assert [a.worker for a in red.included] == ["w0"], [r for _, _, r in red.rejected]
    assert [(e, a.worker) for e, a, _ in red.rejected] == [("1-1", "w1")]
    assert red.rejected[0][2].startswith(f"{reason}: "), red.rejected[0][2]
    torch.testing.assert_close(red.mean["w"], deltas[0]["w"])
    # the aggregator's pipelined reduce adds without prefetched shards: `add` fetches them itself
    # (kills `Reducer.add` 8)
    from diloco.reduce import Reducer

    with ThreadPoolExecutor(2) as pool:
        direct = Reducer(store, codec, like, shard_bytes, pool)
        assert direct.add(*anns[0]) is None and direct.add(*anns[1]).startswith(f"{reason}: ")
        assert torch.equal(direct.result().mean["w"], red.mean["w"])


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


# --- the streamed reduce (fp32): shards read a chunk at a time, added a block at a time ---------------

BIG = {"a.weight": torch.zeros(37, 11), "b.bias": torch.zeros(29), "c.weight": torch.zeros(5, 23)}


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 13 elements (not a divisor of any tensor or shard) and 64-byte chunks: a delta of a few
    hundred elements crosses every boundary a 100 MB one does."""
    from diloco import shards

    monkeypatch.setattr(shards, "STREAM_BLOCK", 13)
    real = open_store

    def chunked(url):
        store = real(url)
        whole = store.get

        def get_chunks(key, *, digest=None, max_bytes=None):   # checked at the end, as the real ones
            data = whole(key, max_bytes=max_bytes)
            for at in range(0, len(data), 64):
                yield memoryview(data)[at:at + 64]
            if digest is not None and digest_of(data, like=digest) != digest:
                raise ChecksumMismatch(f"object {key!r} has another digest")

        store.get_chunks = get_chunks
        return store

    return chunked


def _deltas(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(t.shape, generator=gen) for k, t in BIG.items()} for _ in range(n)]


def _reduce(store, anns, factors=None, *, streamed=True, monkeypatch=None):
    from diloco import reduce

    if not streamed:
        monkeypatch.setattr(reduce, "STREAMED", ())
    try:
        with ThreadPoolExecutor(2) as pool:
            return reduce_round(store, get_codec("fp32"), BIG, anns, 256, pool, factors)
    finally:
        if not streamed:
            monkeypatch.undo()


@pytest.mark.parametrize("factors", [None, [(3.0, 1.0), (1.0, 0.37), (2.0, 3 ** -0.5)]])
def test_a_streamed_reduce_gives_the_bits_of_the_whole_shard_reduce(tmp_path, small_blocks, monkeypatch, factors):
    """A redo or a replay by either path commits the same weights: each element gets the same adds."""
    store = small_blocks(tmp_path.as_uri())
    anns = [_announced_big(store, f"w{i}", i, d) for i, d in enumerate(_deltas(3, 11))]
    assert all(len(a.shards) > 2 for _, a in anns)
    streamed = _reduce(store, anns, factors)
    whole = _reduce(store, anns, factors, streamed=False, monkeypatch=monkeypatch)
    assert [a.worker for a in streamed.included] == ["w0", "w1", "w2"]
    for name in BIG:
        assert torch.equal(streamed.mean[name], whole.mean[name]), name


def _announced_big(store, worker: str, i: int, delta, shard_bytes: int = 256):
    return _announced(store, worker, i, delta, get_codec("fp32"), shard_bytes)


def _spoil(store, ann: Announcement, how: str) -> Announcement:
    """Make the delta's last shard bad in a way only its last blocks (or its end) show; the announcement
    as the worker would have made it ("nan": a worker that sent, and announced, a NaN)."""
    key = ann.shards[-1]
    path = store.root / key
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    if how == "nan":
        data[-4:] = torch.tensor([float("nan")]).numpy().tobytes()
    elif how == "flip":
        data[-4] ^= 0x01   # the last value's lowest bit: only the digest tells
    elif how == "missing":
        path.unlink()
        return ann
    path.write_bytes(bytes(data))
    if how == "nan":
        return dataclasses.replace(ann, digest=(*ann.digest[:-1], digest_of(bytes(data))))
    return ann


@pytest.mark.parametrize(("how", "reason"), [
    ("nan", "holds NaN or Inf"), ("flip", "ChecksumMismatch"), ("missing", "ObjectMissing"), ("norm", "claims"),
])
def test_a_delta_found_bad_after_some_of_it_was_added_leaves_the_bits_of_the_good_ones(
        tmp_path, small_blocks, how, reason):
    store = small_blocks(tmp_path.as_uri())
    deltas = _deltas(3, 12)
    anns = [_announced_big(store, f"w{i}", i, d) for i, d in enumerate(deltas)]
    good = [anns[0], anns[2]]
    want = _reduce(store, good)
    if how == "norm":
        entry, ann = anns[1]
        anns[1] = (entry, dataclasses.replace(ann, norm=ann.norm * 1.01))
    else:
        anns[1] = (anns[1][0], _spoil(store, anns[1][1], how))
    got = _reduce(store, anns)
    assert [a.worker for a in got.included] == ["w0", "w2"]
    assert [(e, a.worker) for e, a, _ in got.rejected] == [("1-1", "w1")] and reason in got.rejected[0][2]
    for name in BIG:
        assert torch.equal(got.mean[name], want.mean[name]), name


def test_a_kept_delta_that_fails_when_summed_again_is_rejected_in_turn(tmp_path, small_blocks, caplog):
    """Summing again re-reads the kept deltas, each with its weight and scale: one changed in the store
    since is dropped, not summed, its bytes no longer count, and the log says which (kills
    `Reducer._sum_again` 24, 27, 28, 32, 35, 36: the scale divided, the warning's worker, error or
    text, the reason's error type, the bytes of the round)."""
    from diloco.reduce import Reducer

    store = small_blocks(tmp_path.as_uri())
    deltas = _deltas(4, 13)
    anns = [_announced_big(store, f"w{i}", i, d) for i, d in enumerate(deltas)]
    factors = {0: (1.0, 1.0), 1: (2.0, 0.5), 3: (1.0, 0.25)}
    with ThreadPoolExecutor(2) as pool:
        red = Reducer(store, get_codec("fp32"), BIG, 256, pool)
        assert all(red.add(*anns[i], factors=factors[i]) is None for i in (0, 1, 3))
        _spoil(store, anns[0][1], "missing")
        assert "NaN" in red.add(anns[2][0], _spoil(store, anns[2][1], "nan"))
        got = red.result()
    assert [a.worker for a in got.included] == ["w1", "w3"]
    assert [a.worker for _, a, _ in got.rejected] == ["w2", "w0"]
    assert got.rejected[1][2].startswith("ObjectMissing: "), got.rejected[1][2]
    warned = [r.getMessage() for r in caplog.records if "summed before" in r.getMessage()]
    error = got.rejected[1][2].removeprefix("ObjectMissing: ")
    assert warned == [f"delta of w0, summed before in this round, now fails: {error}"]
    assert got.nbytes == anns[1][1].nbytes + anns[3][1].nbytes
    want = _reduce(store, [anns[1], anns[3]], [factors[1], factors[3]])
    for name in BIG:
        assert torch.equal(got.mean[name], want.mean[name]), name


def test_a_streamed_delta_is_read_once_and_never_whole(tmp_path):
    """The aggregator never holds a delta's bytes: each shard is read once, through get_chunks."""
    store = open_store(tmp_path.as_uri())
    reads: list[str] = []
    real_chunks = store.get_chunks
    store.get = lambda key, **kw: pytest.fail(f"{key} read whole")

    def counted(key, **kw):
        reads.append(key)
        return real_chunks(key, **kw)

    store.get_chunks = counted
    anns = [_announced_big(store, f"w{i}", i, d) for i, d in enumerate(_deltas(2, 14))]
    red = _reduce(store, anns)
    assert sorted(reads) == sorted(k for _, a in anns for k in a.shards)
    assert [a.worker for a in red.included] == ["w0", "w1"]
