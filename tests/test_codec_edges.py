"""Codec behaviour at the edges the round-trip tests do not reach, each test killing mutants that
the mutation run (docs/mutation.md) found surviving: input dtypes, bf16's seed range, its random
stream and its overflow path, topk's 2-means split with one element on the lower level, and the
message of a dense codec asked for a sparse decode."""

from __future__ import annotations

import pytest
import torch

from diloco.codecs import CODEC_NAMES, get_codec
from diloco.codecs.bf16 import Bf16
from diloco.codecs.topk import CHUNK
from diloco.errors import ConfigError


def _randn(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


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
