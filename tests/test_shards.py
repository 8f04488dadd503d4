"""The delta shard format: encode/decode round trip, shard sizes, and every malformed shard rejected."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diloco.codecs import get_codec
from diloco.errors import BadInput, BadShard, ConfigError
from diloco.shards import (
    FORMAT,
    DeltaBuffer,
    decode_shard,
    encode_delta,
    encode_delta_parts,
    encode_with_feedback,
    flat_delta,
    max_shard_object_bytes,
    plan_segments,
)

FP32, BF16 = get_codec("fp32"), get_codec("bf16")
BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits; round to nearest halves the last one


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w.big": torch.randn(37, 29, generator=g),
        "w.odd": torch.randn(7, 3, 5, generator=g),
        "b.scalar": torch.tensor(1.25),
        "b.empty": torch.zeros(0),
        "b.empty2d": torch.zeros(3, 0),
        "n.one": torch.randn(1, generator=g),
        "n.prime": torch.randn(101, generator=g),
    }


def _decode(shards: list[bytes], codec, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buf = DeltaBuffer(like)
    for s in shards:
        buf.add_shard(s, codec)
    buf.check_complete()
    return {n: buf.flat[n].reshape(t.shape) for n, t in like.items()}


def _shard(tensors: dict[str, torch.Tensor], segments=None, *, codec: str = "fp32", fmt: str = FORMAT,
           meta: dict[str, str] | None = None) -> bytes:
    """A shard built by hand; `segments` as a str is spliced in raw, to write malformed JSON."""
    if meta is not None:
        body = {k: json.loads(v) if k == "segments" else v for k, v in meta.items()}
        return st_save(tensors, metadata={"diloco": json.dumps(body)})
    raw = segments if isinstance(segments, str) else json.dumps(segments)
    head = json.dumps({"format": fmt, "codec": codec})[:-1]
    return st_save(tensors, metadata={"diloco": f'{head}, "segments": {raw}}}'})


NUMELS = {"a": 4, "b": 2}


def _good_tensors() -> dict[str, torch.Tensor]:
    return {"v": torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 2.0])}


GOOD_SEGMENTS = [["a", 0, 4], ["b", 0, 2]]


# --- round trip --------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", [FP32, BF16, get_codec("int8"), get_codec("topk")])
@pytest.mark.parametrize("shard_bytes", [40, 1000, 1 << 20])
def test_a_flat_delta_encodes_to_the_bytes_of_a_delta_of_separate_tensors(codec, shard_bytes):
    base, local = _delta(1), _delta(2)
    separate = {n: base[n] - local[n] for n in base}
    flat = flat_delta(base, local)
    assert all(torch.equal(flat[n], separate[n]) and flat[n].shape == separate[n].shape for n in base)
    expected = encode_delta(separate, codec, shard_bytes)
    assert [b"".join(p) for p in encode_delta_parts(flat, codec, shard_bytes)] == expected
    assert encode_delta(flat, codec, shard_bytes) == expected


def test_an_fp32_shard_of_a_flat_delta_is_a_view_of_it_not_a_copy():
    """Its slice spans several tensors, yet the shard's data is the delta's own memory."""
    flat = flat_delta(_delta(1), _delta(2))
    (header, body), = encode_delta_parts(flat, FP32, 1 << 20)
    before = bytes(body)
    for t in flat.values():
        t.add_(1.0)
    assert bytes(body) != before
    assert b"".join([header, body]) == encode_delta(flat, FP32, 1 << 20)[0]


def test_fp32_round_trip_is_exact():
    delta = _delta()
    out = _decode(encode_delta(delta, FP32, 64 * 1024), FP32, delta)
    for n, t in delta.items():
        assert out[n].shape == t.shape
        assert torch.equal(out[n], t), n


def test_bf16_round_trip_within_bf16_error():
    delta = _delta(1)
    out = _decode(encode_delta(delta, BF16, 64 * 1024), BF16, delta)
    for n, t in delta.items():
        assert out[n].dtype == torch.float32
        assert torch.equal(out[n], t.to(torch.bfloat16).to(torch.float32)), n
        assert torch.all((out[n] - t).abs() <= BF16_UNIT_ROUNDOFF * t.abs()), n


def test_bf16_rounds_to_nearest_even():
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, -(1 + 2**-8)])
    out = _decode(encode_delta({"x": x}, BF16, 1024), BF16, {"x": x})["x"]
    assert out.tolist() == [1.0, 1 + 2**-6, 1.0, -1.0]


def test_non_float32_inputs_are_encoded_as_float32():
    delta = {"h": torch.tensor([0.5, -1.5], dtype=torch.float16),
             "d": torch.tensor([0.25], dtype=torch.float64)}
    out = _decode(encode_delta(delta, FP32, 1024), FP32, delta)
    assert out["h"].tolist() == [0.5, -1.5] and out["d"].tolist() == [0.25]


def test_many_tiny_tensors():
    delta = {f"t{i:04d}": torch.tensor([float(i)]) for i in range(300)}
    shards = encode_delta(delta, FP32, 4096)
    out = _decode(shards, FP32, delta)
    assert all(torch.equal(out[n], t) for n, t in delta.items())


def test_only_empty_tensors():
    delta = {"e": torch.zeros(0), "f": torch.zeros(2, 0, 3)}
    shards = encode_delta(delta, FP32, 1000)
    assert len(shards) == 1
    out = _decode(shards, FP32, delta)
    assert out["f"].shape == (2, 0, 3)


def test_no_tensors_gives_no_shards():
    assert encode_delta({}, FP32, 1000) == []


@pytest.mark.parametrize("codec", [FP32, BF16], ids=["fp32", "bf16"])
def test_small_shard_bytes_splits_tensors_and_every_shard_decodes_alone(codec):
    delta = _delta(2)
    shard_bytes = 1000
    shards = encode_delta(delta, codec, shard_bytes)
    numels = {n: t.numel() for n, t in delta.items()}
    total = sum(numels.values())
    assert len(shards) >= codec.max_bytes(total) // shard_bytes
    split, sizes = set(), []
    for s in shards:
        numel = 0
        for name, start, values in decode_shard(s, codec, numels):
            expect = delta[name].reshape(-1)[start:start + values.numel()]
            assert torch.equal(values, expect.to(torch.bfloat16).float() if codec is BF16 else expect)
            numel += values.numel()
            if values.numel() < numels[name]:
                split.add(name)
        sizes.append(codec.max_bytes(numel))
        assert len(s) <= max_shard_object_bytes(shard_bytes)
    assert all(size <= shard_bytes for size in sizes)
    assert all(size > shard_bytes // 2 for size in sizes[:-1]), f"shards are filled before the next: {sizes}"
    assert "w.big" in split  # larger than one shard
    out = _decode(shards, codec, delta)
    want = delta["w.odd"].to(torch.bfloat16).float() if codec is BF16 else delta["w.odd"]
    assert torch.equal(out["w.odd"], want)


def test_shard_bytes_smaller_than_one_element():
    delta = {"x": torch.arange(5, dtype=torch.float32)}
    shards = encode_delta(delta, FP32, 1)
    assert len(shards) == 5
    assert torch.equal(_decode(shards, FP32, delta)["x"], delta["x"])


def _layout(shard: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    header = json.loads(shard[8:8 + int.from_bytes(shard[:8], "little")])
    return header.pop("__metadata__"), st_load(shard)


def test_encoding_is_deterministic_up_to_metadata_order():
    delta = _delta(3)
    reordered = dict(reversed(list(delta.items())))
    runs = [encode_delta(d, BF16, 1000) for d in (delta, delta, reordered)]
    assert len({len(r) for r in runs}) == 1
    for shards in zip(*runs, strict=True):
        (meta0, t0), *rest = [_layout(s) for s in shards]
        assert all(len(s) == len(shards[0]) for s in shards)
        for meta, t in rest:
            assert meta == meta0
            assert t.keys() == t0.keys() and all(torch.equal(t[k], t0[k]) for k in t0)


def test_encoding_is_byte_deterministic():
    delta = {"a": torch.ones(3), "b": torch.ones(2)}
    outputs = {encode_delta(delta, FP32, 1000)[0] for _ in range(20)}
    assert len(outputs) == 1


def test_weights_bytes_are_deterministic():
    from diloco import model

    state = {"w": torch.ones(3)}
    assert len({bytes(model.to_bytes(state, run="r1", version="0")) for _ in range(20)}) == 1


def test_encode_leaves_input_untouched():
    delta = _delta(4)
    before = {n: t.clone() for n, t in delta.items()}
    encode_delta(delta, BF16, 500)
    assert all(torch.equal(delta[n], before[n]) for n in delta)


_shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)


@settings(max_examples=50, deadline=None)
@given(
    shapes=st.dictionaries(st.from_regex(r"\A[a-z][a-z0-9._]{0,12}\Z"), _shapes, min_size=1, max_size=8),
    shard_bytes=st.integers(1, 600), seed=st.integers(0, 2**31 - 1), codec=st.sampled_from(["fp32", "bf16"]),
)
def test_round_trip_property(shapes, shard_bytes, seed, codec):
    c = get_codec(codec)
    g = torch.Generator().manual_seed(seed)
    delta = {n: torch.randn(shape, generator=g) for n, shape in shapes.items()}
    shards = encode_delta(delta, c, shard_bytes)
    assert all(len(s) <= max_shard_object_bytes(shard_bytes) for s in shards)
    out = _decode(shards, c, delta)
    for n, t in delta.items():
        want = t if codec == "fp32" else t.to(torch.bfloat16).float()
        assert torch.equal(out[n], want)


def test_many_small_tensors_stay_within_the_object_limit():
    shard_bytes = 8000
    delta = {f"model.layers.{i:04d}.norm.weight": torch.ones(1) for i in range(2000)}
    shards = encode_delta(delta, FP32, shard_bytes)
    assert all(len(s) <= max_shard_object_bytes(shard_bytes) for s in shards), [len(s) for s in shards]


@pytest.mark.parametrize("shapes", [{"a": (70, 33), "b": (5,), "c": (4096 + 9,)}, {"a": (0,), "b": (3, 0)}, {}])
@pytest.mark.parametrize("shard_bytes", [300, 64 << 20])
def test_encode_with_feedback_is_what_the_aggregator_decodes(shapes, shard_bytes):
    # the worker's path (slices as views, parts decoded before serialisation) against the aggregator's
    g = torch.Generator().manual_seed(3)
    delta = {n: torch.randn(shape, generator=g) for n, shape in shapes.items()}
    residual = {n: torch.randn(shape, generator=g) for n, shape in shapes.items()}
    codec = get_codec("topk", {"density": 0.05})
    shards, new_residual, norm = encode_with_feedback(delta, residual, codec, 0.5, shard_bytes)
    target = {n: delta[n] + 0.5 * residual[n] for n in delta}
    assert shards == encode_delta(target, codec, shard_bytes)
    sent = _decode(shards, codec, target) if shards else {}
    assert new_residual.keys() == target.keys()
    for n in target:
        assert new_residual[n].shape == target[n].shape
        torch.testing.assert_close(new_residual[n], target[n] - sent[n], rtol=0, atol=1e-6)
    assert norm == pytest.approx(float(sum(t.double().pow(2).sum() for t in sent.values()) ** 0.5))
    if shard_bytes == 300 and "c" in shapes:
        assert len(shards) > 1, "slices as views of one buffer, across shards"


@pytest.mark.parametrize("names", [["w"], ["a", "b"]])
def test_encode_with_feedback_leaves_delta_and_residual_untouched(names):
    delta = {n: torch.randn(5000, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(names)}
    residual = {n: torch.ones(5000) for n in names}
    before = {n: (delta[n].clone(), residual[n].clone()) for n in names}
    encode_with_feedback(delta, residual, get_codec("topk"), 1.0, 1 << 20)
    for n in names:
        assert torch.equal(delta[n], before[n][0]) and torch.equal(residual[n], before[n][1])


def test_shard_layout():
    s = encode_delta({"b": torch.ones(3), "a": torch.ones(2)}, FP32, 1000)
    assert len(s) == 1
    tensors = st_load(s[0])
    assert set(tensors) == {"v"}
    assert tensors["v"].tolist() == [1.0] * 5
    header_len = int.from_bytes(s[0][:8], "little")
    meta = json.loads(json.loads(s[0][8:8 + header_len])["__metadata__"]["diloco"])
    assert meta["format"] == FORMAT == "diloco-delta/2"
    assert meta["codec"] == "fp32"
    assert meta["segments"] == [["a", 0, 2], ["b", 0, 3]]


def test_max_shard_object_bytes():
    assert max_shard_object_bytes(1000) == 1000 + 64 * 1024


def test_get_codec():
    assert get_codec("fp32").name == "fp32" and get_codec("bf16").name == "bf16"
    with pytest.raises(ConfigError, match="int3"):
        get_codec("int3")


# --- decode rejections -------------------------------------------------------------------------

def test_hand_made_good_shard_decodes():
    out = list(decode_shard(_shard(_good_tensors(), GOOD_SEGMENTS), FP32, NUMELS))
    assert [(n, s, v.tolist()) for n, s, v in out] == [("a", 0, [1.0] * 4), ("b", 0, [2.0, 2.0])]


@pytest.mark.parametrize("data", [
    b"", b"garbage", b"\x00" * 8, b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}",
])
def test_garbage_bytes(data):
    with pytest.raises(BadShard):
        list(decode_shard(data, FP32, NUMELS))


def test_truncated_shard():
    data = _shard(_good_tensors(), GOOD_SEGMENTS)
    with pytest.raises(BadShard):
        list(decode_shard(data[:-3], FP32, NUMELS))


def test_bad_shard_is_bad_input():
    assert issubclass(BadShard, BadInput)


def test_wrong_codec():
    data = encode_delta({"a": torch.ones(4)}, BF16, 1000)[0]
    with pytest.raises(BadShard, match="codec"):
        list(decode_shard(data, FP32, NUMELS))


@pytest.mark.parametrize("meta", [
    {"format": "diloco-delta/1", "codec": "fp32", "segments": json.dumps(GOOD_SEGMENTS)},
    {"codec": "fp32", "segments": json.dumps(GOOD_SEGMENTS)},
    {"format": "diloco-weights/1", "codec": "fp32", "segments": json.dumps(GOOD_SEGMENTS)},
])
def test_wrong_format(meta):
    with pytest.raises(BadShard, match="format"):
        list(decode_shard(_shard(_good_tensors(), meta=meta), FP32, NUMELS))


def test_no_metadata_at_all():
    with pytest.raises(BadShard, match="format"):
        list(decode_shard(st_save(_good_tensors()), FP32, NUMELS))


@pytest.mark.parametrize(("segments", "match"), [
    ("not json", "not JSON"),
    ("", "not JSON"),
    (json.dumps({"a": [0, 4]}), "not a non-empty list"),
    (json.dumps([]), "not a non-empty list"),
    (json.dumps([[["a", 0, 4]]]), "malformed"),
    (json.dumps([["a", 0]]), "malformed"),
    (json.dumps([["a", 0, 4, 1]]), "malformed"),
    (json.dumps([[1, 0, 4]]), "malformed"),
    (json.dumps([["a", "0", 4]]), "malformed"),
    (json.dumps([["a", 0, 4.0]]), "malformed"),
    (json.dumps([["a", False, 4]]), "malformed"),
    (json.dumps(["a"]), "malformed"),
])
def test_bad_segments(segments, match):
    with pytest.raises(BadShard, match=match):
        list(decode_shard(_shard({"v": torch.ones(4)}, segments), FP32, NUMELS))


def test_segment_naming_unknown_tensor():
    with pytest.raises(BadShard, match="'zzz'"):
        list(decode_shard(_shard({"v": torch.ones(4)}, [["zzz", 0, 4]]), FP32, NUMELS))


@pytest.mark.parametrize("segment", [["a", 1, 4], ["a", 4, 1], ["a", -1, 1], ["a", 0, -1], ["b", 0, 3]])
def test_slice_out_of_bounds(segment):
    n = max(segment[2], 0)
    with pytest.raises(BadShard, match="out of bounds"):
        list(decode_shard(_shard({"v": torch.ones(n)}, [segment]), FP32, NUMELS))


def test_segments_longer_than_the_slice():
    with pytest.raises(BadShard, match=r"expected torch.float32 \(6,\)"):
        list(decode_shard(_shard({"v": torch.ones(5)}, GOOD_SEGMENTS), FP32, NUMELS))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("codec", [FP32, BF16], ids=["fp32", "bf16"])
def test_non_finite_values(bad, codec):
    x = torch.tensor([1.0, bad, 3.0, 4.0])
    data = _shard(codec.encode(x), [["a", 0, 4]], codec=codec.name)
    with pytest.raises(BadShard, match=r"a\[0:4\] holds NaN or Inf"):
        list(decode_shard(data, codec, NUMELS))


def test_stray_tensor():
    tensors = {**_good_tensors(), "2.v": torch.ones(1)}
    with pytest.raises(BadShard, match=r"has parts \['2.v', 'v'\], the fp32 codec has \['v'\]"):
        list(decode_shard(_shard(tensors, GOOD_SEGMENTS), FP32, NUMELS))


def test_stray_tensor_without_index():
    tensors = {**_good_tensors(), "extra": torch.ones(1)}
    with pytest.raises(BadShard, match=r"has parts \['extra', 'v'\]"):
        list(decode_shard(_shard(tensors, GOOD_SEGMENTS), FP32, NUMELS))


@pytest.mark.parametrize(("part", "match"), [
    (torch.ones(4, dtype=torch.float64), "float64"),
    (torch.ones(4, dtype=torch.bfloat16), "bfloat16"),
    (torch.ones(3), r"\(3,\)"),
    (torch.ones(5), r"\(5,\)"),
    (torch.ones(2, 2), r"\(2, 2\)"),
    (torch.tensor(1.0), r"\(\)"),
])
def test_part_with_wrong_dtype_or_shape(part, match):
    with pytest.raises(BadShard, match=match):
        list(decode_shard(_shard({"v": part}, [["a", 0, 4]]), FP32, NUMELS))


def test_missing_part():
    with pytest.raises(BadShard, match=r"has parts \['w'\], the fp32 codec has \['v'\]"):
        list(decode_shard(_shard({"w": torch.ones(4)}, [["a", 0, 4]]), FP32, NUMELS))


def test_bf16_part_must_be_bf16():
    with pytest.raises(BadShard, match="bfloat16"):
        list(decode_shard(_shard({"v": torch.ones(4)}, [["a", 0, 4]], codec="bf16"), BF16, NUMELS))


# --- DeltaBuffer completeness ------------------------------------------------------------------

def _split(delta, n_min: int = 3) -> list[bytes]:
    shards = encode_delta(delta, FP32, 40)
    assert len(shards) >= n_min
    return shards


def test_check_complete_detects_a_gap():
    delta = {"a": torch.arange(30, dtype=torch.float32)}
    shards = _split(delta)
    buf = DeltaBuffer(delta)
    for s in shards[:1] + shards[2:]:
        buf.add_shard(s, FP32)
    with pytest.raises(BadShard, match="gap"):
        buf.check_complete()


def test_check_complete_detects_a_missing_last_shard():
    delta = {"a": torch.arange(30, dtype=torch.float32)}
    shards = _split(delta)
    buf = DeltaBuffer(delta)
    for s in shards[:-1]:
        buf.add_shard(s, FP32)
    with pytest.raises(BadShard, match="covers 20 of 30"):
        buf.check_complete()


def test_check_complete_detects_a_missing_tensor():
    like = {"a": torch.zeros(3), "b": torch.zeros(2)}
    buf = DeltaBuffer(like)
    buf.add_shard(encode_delta({"a": torch.ones(3)}, FP32, 1000)[0], FP32)
    with pytest.raises(BadShard, match="'b' covers 0 of 2"):
        buf.check_complete()


def test_check_complete_detects_a_duplicated_shard():
    delta = {"a": torch.arange(30, dtype=torch.float32)}
    shards = _split(delta)
    buf = DeltaBuffer(delta)
    for s in [*shards, shards[1]]:
        buf.add_shard(s, FP32)
    with pytest.raises(BadShard, match="overlap"):
        buf.check_complete()


def test_check_complete_detects_overlap_within_a_shard():
    buf = DeltaBuffer({"a": torch.zeros(4)})
    data = _shard({"v": torch.ones(5)}, [["a", 0, 3], ["a", 2, 2]])
    buf.add_shard(data, FP32)
    with pytest.raises(BadShard, match="overlap"):
        buf.check_complete()


def test_shards_in_any_order_are_complete():
    delta = {"a": torch.arange(30, dtype=torch.float32), "b": torch.ones(7)}
    shards = _split(delta)
    buf = DeltaBuffer(delta)
    for s in reversed(shards):
        buf.add_shard(s, FP32)
    buf.check_complete()
    assert torch.equal(buf.flat["a"], delta["a"])


def test_segments_in_any_order_land_where_they_name():
    # encode_delta writes segments in buffer order (one copy); a hand-made shard may not
    buf = DeltaBuffer({"a": torch.zeros(4), "b": torch.zeros(2)})
    buf.add_shard(_shard({"v": torch.tensor([5.0, 6.0, 1.0, 2.0, 3.0, 4.0])}, [["b", 0, 2], ["a", 0, 4]]), FP32)
    buf.check_complete()
    assert buf.flat["a"].tolist() == [1.0, 2.0, 3.0, 4.0] and buf.flat["b"].tolist() == [5.0, 6.0]


@pytest.mark.parametrize("shard_bytes", [1 << 20, 300])
def test_sparse_delta_adds_what_it_decodes_to(shard_bytes):
    # topk's shards are scatter-added: the same sum and norm as adding the dense decoded delta
    delta = _delta(3)
    codec = get_codec("topk", {"density": 0.2})
    shards = encode_delta(delta, codec, shard_bytes)
    assert (len(shards) > 1) == (shard_bytes == 300)
    buf = DeltaBuffer(delta)
    for s in shards:
        buf.add_shard(s, codec)
    buf.check_complete()
    numels = {n: t.numel() for n, t in delta.items()}
    decoded = {n: torch.zeros(k) for n, k in numels.items()}
    for s in shards:  # the dense path: codec.decode, placed by segments
        for name, start, values in decode_shard(s, codec, numels):
            decoded[name][start:start + values.numel()] = values
    dense = torch.cat([decoded[n] for n in sorted(decoded)])
    acc = torch.randn(dense.numel(), generator=torch.Generator().manual_seed(4))
    expected = acc + dense
    buf.add_to(acc)
    assert torch.equal(acc, expected)
    assert buf.norm() == pytest.approx(float(torch.linalg.vector_norm(dense.double())), rel=1e-6)
    assert torch.equal(buf.buffer, dense)


def test_sparse_segments_in_any_order_land_where_they_name():
    codec = get_codec("topk", {"density": 1.0})  # keeps every element; values on 2 levels
    x = torch.tensor([5.0, 6.0, 1.0, 2.0, 3.0, 4.0])
    sent = codec.decode(codec.encode(x), 6)
    buf = DeltaBuffer({"a": torch.zeros(4), "b": torch.zeros(2)})
    buf.add_shard(_shard(codec.encode(x), [["b", 0, 2], ["a", 0, 4]], codec="topk"), codec)
    buf.check_complete()
    acc = torch.zeros(6)
    buf.add_to(acc)
    assert torch.equal(acc, torch.cat([sent[2:], sent[:2]]))
    assert torch.equal(buf.flat["a"], sent[2:]) and torch.equal(buf.flat["b"], sent[:2])



@pytest.mark.parametrize("codec_name", ["fp32", "topk"])
def test_add_to_scales_the_delta_by_alpha(codec_name):
    """A weighted mean (aggregation=tokens, staleness weights) adds alpha * delta; kills
    shards.xǁDeltaBufferǁadd_to__mutmut_9 (sparse) and _16 (dense), which drop alpha."""
    delta = _delta(5)
    codec = get_codec(codec_name, {"density": 0.2} if codec_name == "topk" else {})
    buf = DeltaBuffer(delta)
    for s in encode_delta(delta, codec, 1 << 20):
        buf.add_shard(s, codec)
    buf.check_complete()
    dense = buf.buffer.clone()
    acc = torch.ones(dense.numel())
    buf.add_to(acc, alpha=0.25)
    assert torch.equal(acc, torch.ones(dense.numel()) + 0.25 * dense)

def test_one_shard_of_many_tensors_is_one_codec_call(monkeypatch):
    delta = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(20)}
    calls = []
    encode = FP32.encode
    monkeypatch.setattr(FP32, "encode", lambda x: calls.append(x.numel()) or encode(x))
    (shard,) = encode_delta(delta, FP32, 1 << 20)
    assert calls == [sum(range(1, 21))]
    out = _decode([shard], FP32, delta)
    assert all(torch.equal(out[n], t) for n, t in delta.items())


def test_slices_are_capped_in_elements(monkeypatch):
    # topk packs so densely that shard_bytes alone would let one slice copy billions of elements
    monkeypatch.setattr("diloco.shards.MAX_SLICE_ELEMENTS", 100)
    delta = {"a": torch.arange(150, dtype=torch.float32), "b": torch.ones(120)}
    topk = get_codec("topk")
    plan = plan_segments({n: t.numel() for n, t in delta.items()}, topk, 1 << 20)
    assert [sum(seg[2] for seg in shard) for shard in plan] == [100, 100, 70]
    buf = DeltaBuffer(delta)
    for s in encode_delta(delta, topk, 1 << 20):
        buf.add_shard(s, topk)
    buf.check_complete()


# --- edges the mutation run found untested (docs/mutation.md) --------------------------------------

def test_a_shard_whose_segments_are_not_end_to_end_lands_where_they_name():
    """Segments b[0:2] then a[4:6] are adjacent in the buffer only backwards; a[0:4] and b[2:4] come in
    a second shard of three segments. Kills the mutants of `_begin` that would take the first shard
    as contiguous (`begin - pos`, `pos -= numel`) and of `_write` that lose a segment's place in the
    slice (`pos = numel`)."""
    like = {"a": torch.zeros(6), "b": torch.zeros(4)}
    buf = DeltaBuffer(like)
    buf.add_shard(_shard({"v": torch.tensor([60.0, 61.0, 4.0, 5.0])}, [["b", 0, 2], ["a", 4, 2]]), FP32)
    buf.add_shard(_shard({"v": torch.tensor([62.0, 0.0, 1.0, 2.0, 63.0, 3.0])},
                         [["b", 2, 1], ["a", 0, 3], ["b", 3, 1], ["a", 3, 1]]), FP32)
    buf.check_complete()
    assert buf.flat["a"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert buf.flat["b"].tolist() == [60.0, 61.0, 62.0, 63.0]


def test_a_sparse_shard_with_segments_starting_inside_tensors_lands_where_they_name():
    """Kills the mutant of `_buffer_positions` that subtracts a segment's start (`offsets - start`)."""
    codec = get_codec("topk", {"density": 1.0})
    x = torch.tensor([7.0, 8.0, 9.0, 1.0, 2.0])
    sent = codec.decode(codec.encode(x), 5)
    buf = DeltaBuffer({"a": torch.zeros(3), "b": torch.zeros(4)})
    buf.add_shard(_shard(codec.encode(x), [["b", 1, 3], ["a", 1, 2]], codec="topk"), codec)
    assert buf.flat["b"][1:].tolist() == sent[:3].tolist() and buf.flat["a"][1:].tolist() == sent[3:].tolist()


def test_a_non_finite_value_is_reported_in_the_segment_that_holds_it():
    """Kills the mutants of `_segment_at` and `_check_finite` that name another segment (or none)."""
    like = {"a": torch.zeros(4), "b": torch.zeros(3), "c": torch.zeros(2)}
    numels = {n: t.numel() for n, t in like.items()}
    for index, named in ((0, r"a\[1:3\]"), (1, r"a\[1:3\]"), (2, r"b\[0:3\]"), (4, r"b\[0:3\]"), (5, r"c\[1:2\]")):
        x = torch.arange(6.0)
        x[index] = float("nan")
        data = _shard({"v": x}, [["a", 1, 2], ["b", 0, 3], ["c", 1, 1]])
        with pytest.raises(BadShard, match=rf"^slice {named} holds NaN or Inf$"):
            list(decode_shard(data, FP32, numels))


def test_malformed_segments_are_quoted_in_the_error():
    """Kills the mutants that change what the segment errors quote (the segment, 80 characters of a
    name, the slice's end)."""
    long = "t" * 100
    numels = {"a": 4, long: 3}
    with pytest.raises(BadShard, match=r"^malformed segment \['a', 0\]$"):
        list(decode_shard(_shard({"v": torch.ones(4)}, [["a", 0]]), FP32, numels))
    with pytest.raises(BadShard, match=rf"^malformed segment \['{'y' * 78}$"):
        list(decode_shard(_shard({"v": torch.ones(4)}, [["y" * 100, 0]]), FP32, numels))
    with pytest.raises(BadShard, match=rf"^tensor '{'x' * 80}' is not a floating tensor of the model$"):
        list(decode_shard(_shard({"v": torch.ones(4)}, [["x" * 100, 0, 4]]), FP32, numels))
    with pytest.raises(BadShard, match=r"^slice a\[3:5\] is out of bounds \(numel 4\)$"):
        list(decode_shard(_shard({"v": torch.ones(2)}, [["a", 3, 2]]), FP32, numels))


def test_encode_with_feedback_of_a_dense_lossy_codec():
    """int8 sends delta + decay * residual quantized; the new residual is what it did not send, the
    norm that of what it sent. A float64 delta is taken as fp32; a tensor the residual lacks starts
    from zero. Kills the mutants of the dense branch of `encode_with_feedback` (the decoded values
    dropped or misplaced) and of its residual and dtype handling."""
    g = torch.Generator().manual_seed(8)
    delta = {"a": torch.randn(700, generator=g).double(), "b": torch.randn(5, 3, generator=g)}
    residual = {"a": torch.randn(700, generator=g)}
    codec = get_codec("int8")
    shards, new_residual, norm = encode_with_feedback(delta, residual, codec, 0.5, 600)
    assert len(shards) > 1
    target = {"a": delta["a"].float() + 0.5 * residual["a"], "b": delta["b"]}
    sent = _decode(shards, codec, target)
    assert not torch.equal(sent["a"], target["a"]), "int8 is lossy: something is left for the residual"
    for n in target:
        assert new_residual[n].dtype == torch.float32 and new_residual[n].shape == target[n].shape
        torch.testing.assert_close(new_residual[n], target[n] - sent[n], rtol=0, atol=1e-6)
    assert norm == pytest.approx(float(sum(t.double().pow(2).sum() for t in sent.values()) ** 0.5), rel=1e-6)


def test_encode_delta_takes_a_float64_delta_as_fp32():
    """Kills the mutant that drops `.to(torch.float32)` from encode_delta's slices."""
    delta = {"a": torch.randn(300, generator=torch.Generator().manual_seed(2))}
    for codec in (FP32, get_codec("int8"), get_codec("topk")):
        assert encode_delta({"a": delta["a"].double()}, codec, 1 << 20) == encode_delta(delta, codec, 1 << 20)


def test_shard_errors_say_exactly_what_is_wrong():
    """Kills the mutants that change what these errors say (the found format and codec, the reason)."""
    cases = [
        (b"garbage", r"^not a safetensors object: "),
        (_shard(_good_tensors(), meta={"format": "diloco-delta/1", "codec": "fp32",
                                       "segments": json.dumps(GOOD_SEGMENTS)}),
         r"^shard format is 'diloco-delta/1', expected 'diloco-delta/2'$"),
        (encode_delta({"a": torch.ones(4)}, BF16, 1000)[0], r"^shard codec is 'bf16', the run's codec is 'fp32'$"),
        (_shard({"v": torch.ones(4)}, json.dumps([])), r"^shard metadata 'segments' is not a non-empty list$"),
        (st_save(_good_tensors(), metadata={"diloco": "{not json"}), r"^shard metadata 'diloco' is not JSON$"),
    ]
    for data, message in cases:
        with pytest.raises(BadShard, match=message):
            list(decode_shard(data, FP32, NUMELS))


def test_shard_metadata_is_compact_json():
    """One key holding JSON without spaces (shards are compared byte for byte). Kills the mutants that
    drop `separators=(",", ":")`."""
    [shard] = encode_delta({"a": torch.ones(3), "b": torch.ones(2)}, FP32, 1 << 20)
    header = json.loads(shard[8:8 + int.from_bytes(shard[:8], "little")])
    assert header["__metadata__"]["diloco"] == \
        '{"format":"diloco-delta/2","codec":"fp32","segments":[["a",0,3],["b",0,2]]}'


def test_long_tensor_names_count_against_the_shard_limit():
    """300 one-element tensors with 2000-character names: their segments' header bytes, not their
    values, fill the shards, and every shard stays within the object limit. Kills the mutants that
    shrink a segment's header cost (`64 - 2 * len`, `2 / len`): all would go in one shard of ~1 MB."""
    delta = {f"{i:03d}" + "n" * 1997: torch.ones(1) for i in range(300)}
    shards = encode_delta(delta, FP32, 4096)
    assert len(shards) > 10
    assert max(len(s) for s in shards) <= max_shard_object_bytes(4096)
    assert _decode(shards, FP32, delta) == delta


def test_l2_norm_agrees_with_float64_on_a_large_delta_and_does_not_overflow():
    """A single fp32 pass over 25M elements was off by 1e-3 (the aggregator allows 1e-4): the
    per-run fp32 norms summed in float64 stay within 1e-8; a huge finite delta is not measured as inf."""
    from diloco.shards import l2_norm

    g = torch.Generator().manual_seed(0)
    big = torch.randn(4_000_003, generator=g) * 3
    parts = [big[:1000], big[1000:]]
    exact = float(torch.linalg.vector_norm(big.double()))
    assert l2_norm(parts) == pytest.approx(exact, rel=1e-8)
    huge = torch.full((3000,), 1e20)
    assert l2_norm([huge]) == pytest.approx(float(torch.linalg.vector_norm(huge.double())), rel=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 0.37, 1 / 3])
def test_adding_a_delta_piece_by_piece_gives_the_bits_of_one_add_of_the_whole(alpha):
    """The reduce adds each shard's piece where it lies; runs committed before summed the delta as
    one buffer: the same bits, or a replay of those runs would not match."""
    g = torch.Generator().manual_seed(3)
    like = {"a": torch.zeros(100_003), "b": torch.zeros(77, 13), "c": torch.zeros(5)}
    delta = {n: torch.randn(t.shape, generator=g) for n, t in like.items()}
    buf = DeltaBuffer(like)
    for shard in encode_delta(delta, FP32, 40_000):
        buf.add_shard(shard, FP32)
    buf.check_complete()
    acc = torch.randn(sum(t.numel() for t in like.values()), generator=g)
    whole = acc.clone().add_(torch.cat([delta[n].reshape(-1) for n in sorted(delta)]), alpha=alpha)
    buf.add_to(acc, alpha)
    assert torch.equal(acc, whole)


def test_an_fp32_delta_is_read_from_the_shard_bytes_without_a_staging_copy():
    delta = {"a": torch.arange(6, dtype=torch.float32)}
    shard = bytearray(encode_delta(delta, FP32, 1 << 20)[0])
    buf = DeltaBuffer(delta)
    buf.add_shard(shard, FP32)
    shard[-4:] = torch.tensor([50.0]).numpy().tobytes()   # the piece is the fetched bytes themselves
    acc = torch.zeros(6)
    buf.add_to(acc)
    assert acc.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 50.0]


# --- the streamed read (fp32 deltas, diloco/reduce.py): DeltaBuffer.stream_shard --------------------

def _stream(data: bytes, monkeypatch, *, limit: int = 1 << 20, alpha: float = 1.0) -> tuple[DeltaBuffer, torch.Tensor]:
    """Stream `data` in 5-byte chunks, 4 elements a block, into a fresh accumulator."""
    from diloco import shards

    monkeypatch.setattr(shards, "STREAM_BLOCK", 4)   # the good shard's 6 values: a block of 4, then 2
    buf, acc = DeltaBuffer({"a": torch.zeros(4), "b": torch.zeros(2)}), torch.zeros(6)
    chunks = (memoryview(data)[at:at + 5] for at in range(0, len(data), 5))
    buf.stream_shard(chunks, FP32, limit, acc, alpha, lambda: None)
    return buf, acc


def test_a_streamed_shard_adds_alpha_times_its_values_a_block_at_a_time(monkeypatch):
    """Kills `stream_shard` 32, 36, 45, 63, 66 and `_Chunks.read_into` 22: a block's length, where the
    next starts, alpha and the norm summed over the blocks."""
    buf, acc = _stream(_shard(_good_tensors(), GOOD_SEGMENTS), monkeypatch, alpha=0.5)
    buf.check_complete()
    assert acc.tolist() == [0.5] * 4 + [1.0] * 2
    assert buf.norm() == pytest.approx(12 ** 0.5, rel=1e-6)   # 4 * 1 + 2 * 4, over both blocks


def _header_length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


@pytest.mark.parametrize(("spoil", "message"), [
    (lambda d: d[:-4], "not a safetensors object: the object ends at value 5 of the 6 its header lists"),
    (lambda d: d + b"\0" * 4, "not a safetensors object: it holds bytes after the tensors its header lists"),
    (lambda d: d[:8 + _header_length(d) // 2], "not a safetensors object: the object ends inside its header"),
    (lambda d: _shard({"v": torch.ones(6, dtype=torch.float64)}, GOOD_SEGMENTS),
     "part 'v' is torch.float64 (6,), expected torch.float32 (6,)"),
    (lambda d: _shard({"v": torch.ones(2, 3)}, GOOD_SEGMENTS),
     "part 'v' is torch.float32 (2, 3), expected torch.float32 (6,)"),
    (lambda d: _shard({"v": torch.tensor([1.0, 1.0, 1.0, 1.0, float("nan"), 2.0])}, GOOD_SEGMENTS),
     "slice b[0:2] holds NaN or Inf"),   # in the second block: found at its place in the slice
], ids=["truncated", "trailing", "header-cut", "dtype", "shape", "nan-second-block"])
def test_a_streamed_shard_says_exactly_what_is_wrong(spoil, message, monkeypatch):
    """Kills `stream_shard` 40-43, 47, 52, 69-71, `_stream_header` 21-23, 28, 41, 44-46 and
    `_Chunks.read_into` 8, 10: each message, and a shard ending early."""
    with pytest.raises(BadShard) as e:
        _stream(spoil(_shard(_good_tensors(), GOOD_SEGMENTS)), monkeypatch)
    assert str(e.value) == message


def test_a_streamed_shard_header_may_fill_the_limit_less_its_length_prefix(monkeypatch):
    """Kills `_stream_header` 9-13: the bound, and what its error says."""
    data = _shard(_good_tensors(), GOOD_SEGMENTS)
    n = _header_length(data)
    _stream(data, monkeypatch, limit=n + 8)   # the header fills the limit: read
    with pytest.raises(BadShard) as e:
        _stream(data, monkeypatch, limit=n + 7)
    assert str(e.value) == f"not a safetensors object: header length {n} exceeds the {n - 1} bytes a shard may have"


def test_chunks_at_end_counts_what_is_left_in_every_chunk():
    """Kills `_Chunks.at_end` 5, 6: a short chunk after the one being read, or an empty one last."""
    from diloco.shards import _Chunks

    for pieces in ([b"abcd", b"ef"], [b"abcd", b""]):
        src = _Chunks(iter(pieces))
        assert src.read_into(memoryview(bytearray(2))) == 2
        assert not src.at_end()
    src = _Chunks(iter([b"ab", b"cd"]))
    assert src.read_into(memoryview(bytearray(4))) == 4 and src.at_end()


def test_a_streamed_shard_whose_segments_are_not_end_to_end_lands_where_they_name(monkeypatch):
    """a[0:2], b, a[2:4]: the second block holds the third segment only (kills `_sub_segments` 19, where
    the next segment starts)."""
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    buf, acc = _stream(_shard({"v": values}, [["a", 0, 2], ["b", 0, 2], ["a", 2, 2]]), monkeypatch)
    buf.check_complete()
    assert acc.tolist() == [1.0, 2.0, 5.0, 6.0, 3.0, 4.0]   # a, then b, as the buffer lays them out


def test_views_of_one_buffer_out_of_name_order_encode_as_separate_tensors():
    """Pieces in one storage but not end to end in the shard's order are copied, not viewed as one run
    (kills `_end_to_end` 8: adjacency dropped when the storage is the same)."""
    flat = torch.arange(7, dtype=torch.float32)
    delta = {"a": flat[4:], "b": flat[:4]}   # sorted names: a first, which lies after b
    separate = {n: t.clone() for n, t in delta.items()}
    for codec in (FP32, BF16):
        assert encode_delta(delta, codec, 1 << 20) == encode_delta(separate, codec, 1 << 20)
