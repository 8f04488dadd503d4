"""Pseudo-gradient codecs: round trips and error bounds, exact sizes, shards, malformed parts, options."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diloco.codecs import CODEC_NAMES, Codec, bitpack, get_codec
from diloco.codecs.bf16 import Bf16
from diloco.codecs.topk import CHUNK, TopK
from diloco.errors import BadShard, ConfigError
from diloco.shards import DeltaBuffer, decode_shard, encode_delta, max_shard_object_bytes

SIZES = [0, 1, 2, 3, 7, 127, 128, 129, 255, 256, 257, 4095, 4096, 4097, 3 * 4096 + 101, 100_000]
BLOCKS = {"int8": (256, 127), "int4": (128, 7)}  # block length, largest |q|
MB64 = 64 * 2**20


def _nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def _randn(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def _round_trip(codec: Codec, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    parts = codec.encode(x)
    assert set(parts) == set(codec.parts)
    assert all(t.dim() == 1 for t in parts.values())
    assert _nbytes(parts) == codec.max_bytes(x.numel())
    y = codec.decode(parts, x.numel())
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.isfinite(y).all()
    return parts, y


def _kept(codec: TopK, parts: dict[str, torch.Tensor], n: int) -> list[tuple[int, int, torch.Tensor]]:
    """(chunk start, chunk length, kept indices within the chunk) for every chunk."""
    groups = codec._groups(n)
    idx = bitpack.unpack(parts["idx"], sum(c * k for _, c, _, k in groups), 12, "idx").long()
    out, pos = [], 0
    for offset, chunks, length, k in groups:
        for c in range(chunks):
            out.append((offset + c * length, length, idx[pos:pos + k]))
            pos += k
    return out


def check_bounds(name: str, codec: Codec, x: torch.Tensor, parts: dict[str, torch.Tensor], y: torch.Tensor) -> None:
    """The error bound each codec promises, element by element."""
    if name == "fp32":
        assert torch.equal(y, x)
    elif name == "bf16":
        stochastic = getattr(codec, "stochastic", False)
        assert torch.all((y - x).abs() <= (2.0 ** -7 if stochastic else 2.0 ** -8) * x.abs())
        if not stochastic:
            assert torch.equal(y, x.to(torch.bfloat16).float())
    elif name in BLOCKS:
        block, qmax = BLOCKS[name]
        scale = parts["scale"]
        pad = torch.cat([x, x.new_zeros(-x.numel() % block)]).view(-1, block)
        assert torch.equal(scale, pad.abs().amax(dim=1) / qmax) if x.numel() else scale.numel() == 0
        per_elem = scale.repeat_interleave(block)[:x.numel()]
        assert torch.all((y - x).abs() <= per_elem * (0.5 + qmax * 2.0 ** -22))
    else:
        assert isinstance(codec, TopK)
        levels = parts["scale"].view(-1, 2)
        for c, (start, length, idx) in enumerate(_kept(codec, parts, x.numel())):
            xc, yc = x[start:start + length], y[start:start + length]
            kept = torch.zeros(length, dtype=torch.bool)
            kept[idx] = True
            assert len(idx) == codec._k(length) == int(kept.sum())  # unique
            if not kept.all():
                assert xc[kept].abs().min() >= xc[~kept].abs().max()  # the largest are kept
            assert torch.all(yc[~kept] == 0)
            s1, s2 = levels[c].tolist()
            assert 0 <= s1 <= s2
            assert set(yc[kept].abs().tolist()) <= {s1, s2}
            signed = (xc != 0) & (yc != 0)
            assert torch.equal(torch.sign(yc[signed]), torch.sign(xc[signed]))
            xk = xc[kept].double()
            one_level = (xk.abs() - xk.abs().mean()).square().sum()
            assert (yc[kept].double() - xk).square().sum() <= one_level * (1 + 1e-9) + 1e-300


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_sizes(name, n):
    codec = get_codec(name)
    x = _randn(n, seed=n)
    parts, y = _round_trip(codec, x)
    check_bounds(name, codec, x, parts, y)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("kind", ["zeros", "huge", "tiny", "mixed", "one_hot", "constant"])
def test_round_trip_extreme_values(name, kind):
    n = 2 * CHUNK + 333
    x = {
        "zeros": torch.zeros(n),
        "huge": _randn(n, 1) * 1e30,
        "tiny": _randn(n, 2) * 1e-30,
        # every magnitude from 1e-30 to 1e30 with random signs, side by side in every block
        "mixed": torch.logspace(-30, 30, n) * torch.sign(_randn(n, 3)),
        "one_hot": torch.zeros(n).index_fill_(0, torch.tensor([5, 300, n - 1]), -3.5),
        "constant": torch.full((n,), -0.125),
    }[kind]
    codec = get_codec(name)
    parts, y = _round_trip(codec, x)
    check_bounds(name, codec, x, parts, y)
    if kind == "zeros":
        assert torch.equal(y, x)
    if kind == "one_hot" and name != "bf16":
        assert torch.equal(y, x)  # the spike is its block's scale / its chunk's level, exactly


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(CODEC_NAMES), n=st.integers(0, 9000), seed=st.integers(0, 2**31 - 1),
       exponent=st.integers(-30, 30), density=st.sampled_from([0.015, 0.001, 0.1, 0.5, 1.0]))
def test_round_trip_property(name, n, seed, exponent, density):
    codec = get_codec(name, {"density": density} if name == "topk" else None)
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed, like pseudo-gradients: normal times a log-normal per element
    x = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g)) * 10.0 ** exponent
    parts, y = _round_trip(codec, x)
    check_bounds(name, codec, x, parts, y)
    again = codec.encode(x)
    assert all(torch.equal(again[p], parts[p]) for p in parts)  # deterministic


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encode_leaves_input_untouched(name):
    x = _randn(2 * CHUNK + 5, 9)
    before = x.clone()
    get_codec(name, {"stochastic": True} if name == "bf16" else None).encode(x)
    assert torch.equal(x, before)


@settings(max_examples=50, deadline=None)
@given(name=st.sampled_from(CODEC_NAMES), n=st.integers(0, 50_000))
def test_max_bytes_is_exact_and_monotone(name, n):
    codec = get_codec(name)
    assert _nbytes(codec.encode(torch.ones(n))) == codec.max_bytes(n)
    assert codec.max_bytes(n) <= codec.max_bytes(n + 1)


def test_byte_formulas():
    n = 1_000_003
    assert get_codec("int8").max_bytes(n) == n + 4 * math.ceil(n / 256)
    assert get_codec("int4").max_bytes(n) == math.ceil(n / 2) + 4 * math.ceil(n / 128)
    full, tail = divmod(n, CHUNK)
    k_total = full * 61 + round(0.015 * tail)
    assert get_codec("topk").max_bytes(n) == math.ceil(1.5 * k_total) + math.ceil(k_total / 4) + 8 * (full + 1)
    assert get_codec("topk", {"density": 0.1}).max_bytes(4096) == math.ceil(1.5 * 410) + math.ceil(410 / 4) + 8


@pytest.mark.parametrize(("name", "limit"), [("fp32", 4.01), ("bf16", 2.02), ("int8", 1.05), ("int4", 0.55),
                                             ("topk", 0.08)])
def test_bytes_per_parameter_through_shards(name, limit):
    g = torch.Generator().manual_seed(0)
    delta = {"w": torch.randn(1024, 1000, generator=g), "b": torch.randn(1000, generator=g),
             "e": torch.randn(3, 5, generator=g)}
    numel = sum(t.numel() for t in delta.values())
    shards = encode_delta(delta, get_codec(name), MB64)
    assert sum(len(s) for s in shards) / numel <= limit


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w.big": torch.randn(97, 131, generator=g), "w.odd": torch.randn(7, 3, 5, generator=g),
            "b.scalar": torch.tensor(1.25), "b.empty": torch.zeros(0), "n.one": torch.randn(1, generator=g),
            "n.chunk": torch.randn(4097, generator=g)}


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("shard_bytes", [700, 5000, MB64])
def test_shards_round_trip(name, shard_bytes):
    codec = get_codec(name)
    delta = _delta()
    shards = encode_delta(delta, codec, shard_bytes)
    numels = {n: t.numel() for n, t in delta.items()}
    for s in shards:
        assert len(s) <= max_shard_object_bytes(shard_bytes)
        # a shard is one slice of the tensors laid end to end, encoded in one call
        segments = list(decode_shard(s, codec, numels))
        piece = torch.cat([delta[t].reshape(-1)[start:start + v.numel()] for t, start, v in segments])
        values = torch.cat([v for _, _, v in segments])
        assert torch.equal(values, codec.decode(codec.encode(piece), piece.numel()))
        check_bounds(name, codec, piece, codec.encode(piece), values)
    buf = DeltaBuffer(delta)
    for s in shards:
        buf.add_shard(s, codec)
    buf.check_complete()


# --- topk ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 100, 4096, 3 * 4096 + 777])
@pytest.mark.parametrize("two_levels", [True, False])
def test_topk_exact_on_k_sparse_two_level_vectors(n, two_levels):
    codec = get_codec("topk")
    g = torch.Generator().manual_seed(n)
    x = torch.zeros(n)
    for start in range(0, n, CHUNK):
        length = min(CHUNK, n - start)
        k = codec._k(length)
        where = torch.randperm(length, generator=g)[:k]
        a, b = (torch.rand(2, generator=g) * 10).sort().values.tolist()
        mags = torch.where(torch.rand(k, generator=g) < 0.3, a, b) if two_levels else torch.full((k,), b)
        signs = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
        x[start + where] = mags * signs
    _, y = _round_trip(codec, x)
    assert torch.equal(y, x)


def test_topk_splits_large_slices_over_threads_with_the_same_result():
    # 3 threads' worth of rows plus a short last chunk: the selection runs in a thread pool
    x = _randn(3 * 256 * CHUNK + 1000)
    codec = get_codec("topk")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = codec.encode(x)
        torch.set_num_threads(3)
        split = codec.encode(x)
    finally:
        torch.set_num_threads(threads)
    assert alone.keys() == split.keys() and all(torch.equal(alone[p], split[p]) for p in alone)
    y = codec.decode(split, x.numel())
    kept = y[:CHUNK] != 0  # the first chunk keeps exactly its k largest magnitudes
    assert int(kept.sum()) == codec._k(CHUNK)
    assert x[:CHUNK].abs()[kept].min() >= x[:CHUNK].abs()[~kept].max()


def test_topk_density_option():
    x = _randn(10 * CHUNK)
    sparse = get_codec("topk", {"density": 0.001})
    dense = get_codec("topk", {"density": 0.2})
    assert sparse._k(CHUNK) == 4 and dense._k(CHUNK) == 819
    _, ys = _round_trip(sparse, x)
    _, yd = _round_trip(dense, x)
    assert int((ys != 0).sum()) <= 40 < int((yd != 0).sum())
    assert (yd - x).norm() < (ys - x).norm()
    _, y_all = _round_trip(get_codec("topk", {"density": 1}), x)
    assert torch.all(y_all[x != 0] != 0)


@pytest.mark.parametrize("name", ["topk", "int4"])
def test_error_feedback_transmits_everything_but_the_residual(name):
    codec = get_codec(name)
    g = torch.Generator().manual_seed(7)
    n, rounds = 3 * CHUNK + 5, 30
    residual, sent, total = torch.zeros(n), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for _ in range(rounds):
        x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
        e = x + residual
        y = codec.decode(codec.encode(e), n)
        residual = e - y
        sent += y.double()
        total += x.double()
    assert torch.allclose(sent, total - residual.double(), rtol=0, atol=1e-4)
    # the residual stays bounded instead of growing with the rounds: error feedback catches up
    assert residual.norm() < 0.5 * total.norm()


# --- stochastic bf16 -----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1 + 0.3 * 2**-7, -(1 + 0.85 * 2**-7), 3e-20 * (1 + 0.5 * 2**-7), 1e30])
def test_stochastic_bf16_is_unbiased(value):
    codec = get_codec("bf16", {"stochastic": True, "seed": 1})
    x = torch.full((200_000,), value)
    y = codec.decode(codec.encode(x), x.numel())
    low = x.to(torch.bfloat16).float()[0].item()
    assert len(set(y.tolist())) <= 2
    ulp = 2.0 ** (math.floor(math.log2(abs(value))) - 7)
    assert all(abs(v - value) < ulp for v in set(y.tolist()))
    assert abs(y.double().mean().item() - value) < 0.01 * ulp, low


def test_stochastic_bf16_is_reproducible_and_default_unchanged():
    x = _randn(5000)
    enc = [get_codec("bf16", {"stochastic": True, "seed": s}).encode(x)["v"] for s in (5, 5, 6)]
    assert torch.equal(enc[0], enc[1]) and not torch.equal(enc[0], enc[2])
    assert torch.equal(get_codec("bf16").encode(x)["v"], x.to(torch.bfloat16))
    assert torch.equal(Bf16(stochastic=False).encode(x)["v"], x.to(torch.bfloat16))
    unseeded = Bf16(stochastic=True)
    assert not torch.equal(unseeded.encode(x)["v"], unseeded.encode(x)["v"])  # the stream advances


def test_stochastic_bf16_keeps_exact_values_and_specials():
    codec = Bf16(stochastic=True, seed=0)
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 2.0**-130, 3.3895313892515355e38])
    big = torch.full((1000,), torch.finfo(torch.float32).max)
    for _ in range(20):
        assert torch.equal(codec.encode(exact)["v"].float(), exact)
        assert torch.isfinite(codec.encode(big)["v"]).all()  # never rounds up to Inf
    special = codec.encode(torch.tensor([math.inf, -math.inf, math.nan]))["v"].float()
    assert special[0] == math.inf and special[1] == -math.inf and math.isnan(special[2])


# --- registry and options ------------------------------------------------------------------------

def test_registry():
    assert CODEC_NAMES == ("fp32", "bf16", "int8", "int4", "topk")
    for name in CODEC_NAMES:
        assert get_codec(name).name == name
        assert get_codec(name, {}).name == name
    assert get_codec("topk", {"density": 0.01}).density == 0.01
    codec = get_codec("bf16", {"stochastic": True, "seed": None})
    assert codec.stochastic and codec.seed is None


@pytest.mark.parametrize(("name", "options", "message"), [
    ("int3", None, "unknown codec 'int3'; known codecs: fp32, bf16, int8, int4, topk"),
    ("topk", {"densty": 0.1}, "unknown option 'densty' for codec 'topk'; valid options: density"),
    ("fp32", {"stochastic": True}, "valid options: none"),
    ("bf16", {"seed": 1.5}, "option 'seed' must be int or null"),
    ("bf16", {"stochastic": 1}, "option 'stochastic' must be bool"),
    ("bf16", {"seed": True}, "option 'seed' must be int or null"),
    ("bf16", {"seed": -1}, "seed"),
    ("topk", {"density": "0.1"}, "option 'density' must be float or int"),
    ("topk", {"density": True}, "option 'density' must be float or int"),
    ("topk", {"density": 0}, "topk option 'density' must be a number in (0, 1], got 0"),
    ("topk", {"density": 1.5}, "(0, 1]"),
    ("topk", {"density": math.nan}, "(0, 1]"),
    ("int8", [("a", 1)], "codec options must be a mapping, got list"),
    ("topk", {"dens": 0.1}, "valid options: density, feedback_decay"),
])
def test_bad_codec_config(name, options, message):
    with pytest.raises(ConfigError) as e:
        get_codec(name, options)
    assert message in str(e.value)


# --- malformed parts -----------------------------------------------------------------------------

def _set(parts: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**parts, name: value}


def _repack_idx(parts, n, edit):
    """parts with the topk indices unpacked, edited in place by `edit`, and packed again."""
    codec = get_codec("topk")
    total = sum(c * k for _, c, _, k in codec._groups(n))
    idx = bitpack.unpack(parts["idx"], total, 12, "idx").clone()
    edit(idx)
    return _set(parts, "idx", bitpack.pack(idx, 12))


def _poke(t: torch.Tensor, i: int, value) -> torch.Tensor:
    t = t.clone()
    t[i] = value
    return t


N_ODD = 2 * CHUNK + 301  # topk: 61 + 61 + 5 kept (odd: the idx stream has a padding nibble)
MALFORMED = {
    "bf16 dtype": ("bf16", lambda p: _set(p, "v", p["v"].half()), "expected torch.bfloat16"),
    "bf16 length": ("bf16", lambda p: _set(p, "v", p["v"][1:]), "expected torch.bfloat16"),
    "bf16 missing": ("bf16", lambda p: {}, "missing"),
    "int8 q dtype": ("int8", lambda p: _set(p, "q", p["q"].to(torch.uint8)), "expected torch.int8"),
    "int8 q length": ("int8", lambda p: _set(p, "q", p["q"][:-1]), "expected torch.int8"),
    "int8 q 2-D": ("int8", lambda p: _set(p, "q", p["q"].view(1, -1)), "expected torch.int8"),
    "int8 q -128": ("int8", lambda p: _set(p, "q", _poke(p["q"], 3, -128)), "part 'q' holds -128, outside [-127, 127]"),
    "int8 scale length": ("int8", lambda p: _set(p, "scale", p["scale"][:-1]), "expected torch.float32"),
    "int8 scale fp16": ("int8", lambda p: _set(p, "scale", p["scale"].half()), "expected torch.float32"),
    "int8 scale NaN": ("int8", lambda p: _set(p, "scale", _poke(p["scale"], 0, math.nan)),
                       "part 'scale' holds NaN or Inf"),
    "int8 scale Inf": ("int8", lambda p: _set(p, "scale", _poke(p["scale"], -1, math.inf)), "NaN or Inf"),
    "int8 scale negative": ("int8", lambda p: _set(p, "scale", _poke(p["scale"], 1, -0.5)), "negative"),
    "int8 missing": ("int8", lambda p: {"q": p["q"]}, "missing"),
    "int4 q dtype": ("int4", lambda p: _set(p, "q", p["q"].to(torch.int8)), "expected torch.uint8"),
    "int4 q length": ("int4", lambda p: _set(p, "q", torch.cat([p["q"], p["q"][:1]])), "expected torch.uint8"),
    "int4 padding": ("int4", lambda p: _set(p, "q", _poke(p["q"], -1, int(p["q"][-1]) | 0x80)),
                     "part 'q' has non-zero padding"),
    "int4 nibble 0": ("int4", lambda p: _set(p, "q", _poke(p["q"], 0, int(p["q"][0]) & 0xF0)),
                      "part 'q' holds the nibble 0 (-8), outside [-7, 7]"),
    "int4 scale NaN": ("int4", lambda p: _set(p, "scale", _poke(p["scale"], 0, math.nan)), "NaN or Inf"),
    "int4 scale negative": ("int4", lambda p: _set(p, "scale", _poke(p["scale"], 0, -1.0)), "negative"),
    "int4 missing": ("int4", lambda p: {"scale": p["scale"]}, "missing"),
    "topk idx length": ("topk", lambda p: _set(p, "idx", p["idx"][:-1]), "expected torch.uint8"),
    "topk idx dtype": ("topk", lambda p: _set(p, "idx", p["idx"].to(torch.int8)), "expected torch.uint8"),
    "topk idx padding": ("topk", lambda p: _set(p, "idx", _poke(p["idx"], -1, int(p["idx"][-1]) | 0x10)),
                         "part 'idx' has non-zero padding"),
    "topk code length": ("topk", lambda p: _set(p, "code", torch.cat([p["code"], p["code"][:1]])),
                         "expected torch.uint8"),
    "topk code padding": ("topk", lambda p: _set(p, "code", _poke(p["code"], -1, int(p["code"][-1]) | 0x80)),
                          "part 'code' has non-zero padding"),
    "topk duplicate": ("topk", lambda p: _repack_idx(p, N_ODD, lambda i: i.__setitem__(1, i[0])),
                       "part 'idx' repeats an index within a chunk"),
    "topk duplicate tail": ("topk", lambda p: _repack_idx(p, N_ODD, lambda i: i.__setitem__(-1, i[-2])), "repeats"),
    "topk unsorted": ("topk", lambda p: _repack_idx(p, N_ODD, lambda i: i[60:62].copy_(i[60:62].flip(0))),
                      "part 'idx' is not increasing within a chunk"),
    "topk index range": ("topk", lambda p: _repack_idx(p, N_ODD, lambda i: i.__setitem__(-1, 301)), ">= 301"),
    "topk index 4095 in tail": ("topk", lambda p: _repack_idx(p, N_ODD, lambda i: i.__setitem__(-1, 4095)),
                                ">= 301"),
    "topk scale order": ("topk", lambda p: _set(p, "scale", _poke(p["scale"], 0, 1e9)),
                         "part 'scale' has a chunk whose s1 exceeds its s2"),
    "topk scale NaN": ("topk", lambda p: _set(p, "scale", _poke(p["scale"], 3, math.nan)), "NaN or Inf"),
    "topk scale negative": ("topk", lambda p: _set(p, "scale", _poke(p["scale"], 0, -1e-9)), "negative"),
    "topk scale length": ("topk", lambda p: _set(p, "scale", p["scale"][:-2]), "expected torch.float32"),
    "topk missing": ("topk", lambda p: _set({}, "scale", p["scale"]), "missing"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_parts_are_rejected(case):
    name, corrupt, message = MALFORMED[case]
    codec = get_codec(name)
    parts = codec.encode(_randn(N_ODD, 11))
    codec.decode(parts, N_ODD)  # the intact parts decode
    # a message given from its start ("part '...") must be the error's start, the others may be inside it
    with pytest.raises(BadShard, match=("^" if message.startswith("part '") else "") + re.escape(message)):
        codec.decode(corrupt(parts), N_ODD)


@pytest.mark.parametrize("name", ["int8", "int4", "topk"])
def test_wrong_numel_is_rejected(name):
    codec = get_codec(name)
    parts = codec.encode(_randn(N_ODD))
    # topk's sizes depend on numel only through the chunk count and k, so change one of them
    for n in (N_ODD - 1, N_ODD + 1, N_ODD + 4096 * 4) if name != "topk" else (N_ODD - 250, N_ODD + CHUNK, 2 * CHUNK):
        with pytest.raises(BadShard):
            codec.decode(parts, n)


@pytest.mark.parametrize(("name", "part", "corrupt"), [
    ("topk", "idx", lambda t: _repack_idx({"idx": t}, N_ODD, lambda i: i.__setitem__(2, i[1]))["idx"]),
    ("int8", "scale", lambda t: _poke(t, 0, -1.0)),
    ("int4", "q", lambda t: t[:-1]),
])
def test_malformed_shard_is_rejected_by_the_buffer(name, part, corrupt):
    codec = get_codec(name)
    delta = {"w": _randn(N_ODD, 3)}
    (shard,) = encode_delta(delta, codec, MB64)
    tensors = st_load(shard)
    tensors[part] = corrupt(tensors[part])
    meta = {"diloco": json.dumps(_meta(shard))}
    with pytest.raises(BadShard):
        DeltaBuffer(delta).add_shard(st_save(tensors, metadata=meta), codec)


def _meta(shard: bytes) -> dict:
    header = json.loads(shard[8:8 + int.from_bytes(shard[:8], "little")])
    return json.loads(header["__metadata__"]["diloco"])


# --- devices -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_cuda_matches_cpu(name):
    codec = get_codec(name)
    x = _randn(3 * CHUNK + 999, 5) * torch.exp(_randn(3 * CHUNK + 999, 6))
    on_gpu = {k: v.cpu() for k, v in codec.encode(x.cuda()).items()}
    on_cpu = codec.encode(x)
    y_gpu = codec.decode(on_gpu, x.numel())
    assert torch.equal(codec.decode({k: v.cuda() for k, v in on_gpu.items()}, x.numel()).cpu(), y_gpu)
    check_bounds(name, codec, x, on_gpu, y_gpu)
    if name != "topk":  # topk may break ties differently
        assert all(torch.equal(on_gpu[p], on_cpu[p]) for p in codec.parts)
    seeded = [Bf16(stochastic=True, seed=3).encode(x.cuda())["v"] for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])


# --- edges the round trips do not reach (each kills mutants the mutation run found: docs/mutation.md) ---

@pytest.mark.parametrize("options", [{"name": n} for n in CODEC_NAMES] + [{"name": "bf16", "stochastic": True}])
def test_a_slice_of_another_float_dtype_encodes_as_its_fp32_values(options):
    """Kills the mutants that drop `x.to(torch.float32)` from an encode (fp32, bf16, int8, int4, topk):
    a float64 slice would be stored, or quantized, as float64."""
    name = options.pop("name")
    x = _randn(3 * 300 + 7, seed=1)
    as_fp32 = get_codec(name, {**options, "seed": 5} if options else None).encode(x)
    as_fp64 = get_codec(name, {**options, "seed": 5} if options else None).encode(x.double())
    assert as_fp64.keys() == as_fp32.keys()
    for part, t in as_fp32.items():
        assert as_fp64[part].dtype == t.dtype and torch.equal(as_fp64[part], t), part


def test_bf16_seed_must_fit_63_bits():
    """Kills the mutants of the seed bound (`<=`, `2 * 63`, `3**63`, `2**64`)."""
    for bad in (2**63, 2**64 - 1, -1):
        with pytest.raises(ConfigError, match=r"must be in \[0, 2\^63\)"):
            Bf16(stochastic=True, seed=bad)
    for good in (0, 1000, 2**63 - 1):
        assert Bf16(stochastic=True, seed=good).seed == good


def test_stochastic_bf16_draws_new_noise_for_every_encode_from_one_seeded_stream():
    """Two encodes of the same slice round differently (the stream advances), and a second codec with
    the seed repeats the first's sequence. Kills the mutants that make a new generator on every call
    (the cache lookup or store dropped): every encode would round the same way."""
    x = torch.full((4096,), 1.0 + 2.0**-8)   # halfway between two bf16 neighbours
    first, again = Bf16(stochastic=True, seed=9), Bf16(stochastic=True, seed=9)
    a1, a2 = first.encode(x)["v"], first.encode(x)["v"]
    assert not torch.equal(a1, a2)
    assert torch.equal(again.encode(x)["v"], a1) and torch.equal(again.encode(x)["v"], a2)


def test_stochastic_bf16_of_an_empty_slice_is_empty():
    """Kills the mutant `if n or not ...`: the overflow check would take amax of nothing."""
    assert Bf16(stochastic=True, seed=1).encode(torch.zeros(0))["v"].numel() == 0


def test_stochastic_bf16_never_rounds_a_large_negative_value_to_minus_inf():
    """Kills the mutant that tests `x.amin()` instead of `-x.amin()` for the overflow path."""
    x = torch.full((2000,), -torch.finfo(torch.float32).max)
    assert torch.isfinite(Bf16(stochastic=True, seed=2).encode(x)["v"]).all()


def test_stochastic_bf16_still_rounds_finite_values_in_a_slice_holding_inf():
    """A slice with an Inf takes the slow path; its finite values are still rounded stochastically
    (about half of the halfway values up), not truncated. Kills the mutant `finite | isinf(...)`."""
    x = torch.full((4001,), 1.0 + 2.0**-8)
    x[0] = float("inf")
    v = Bf16(stochastic=True, seed=3).encode(x)["v"].float()
    up = int((v[1:] > 1.0).sum())
    assert v[0] == float("inf") and 1000 < up < 3000, up


def test_topk_splits_one_element_onto_the_lower_level_when_that_is_best():
    """61 kept values, one of magnitude 8 and sixty of 10: two levels, so the round trip is exact.
    Kills the mutant `j.clamp(min=2)`, which halves a one-element low group's gain and sends all
    61 to one level."""
    codec = get_codec("topk")
    assert codec._k(CHUNK) == 61
    x = torch.zeros(CHUNK)
    x[torch.arange(61) * 67] = 10.0
    x[67 * 5] = -8.0
    assert torch.equal(codec.decode(codec.encode(x), CHUNK), x)


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8", "int4"])
def test_a_dense_codec_has_no_sparse_decode(name):
    """Kills the mutant that drops the codec's name from the NotImplementedError."""
    with pytest.raises(NotImplementedError, match=f"the {name} codec is dense"):
        get_codec(name).decode_sparse({}, 0)


def test_bitpack_refuses_a_width_it_does_not_pack():
    """Kills the mutant that drops the width from the error."""
    with pytest.raises(ValueError, match=r"^bit width 3 is not one of \(2, 4, 12\)$"):
        bitpack.pack(torch.zeros(4, dtype=torch.int64), 3)
