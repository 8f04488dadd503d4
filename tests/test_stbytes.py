"""diloco.stbytes writes the bytes safetensors writes (weights, momentum and shards are hashed, so
any difference would split one object into two)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diloco import stbytes

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
NAMES = st.text(alphabet=st.sampled_from("abzAZ09._/é-"), min_size=1, max_size=6)


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:
    out = {}
    for name in draw(st.lists(NAMES, min_size=0, max_size=8, unique=True)):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
        t = torch.randn(shape) * 10 if shape else torch.tensor(draw(st.floats(-5, 5)))
        out[name] = t.to(dtype)
    return out


@settings(max_examples=200, deadline=None)
@given(state_dicts(), st.one_of(st.none(), st.dictionaries(st.sampled_from(["diloco", "k"]), st.text(max_size=12),
                                                            min_size=1, max_size=1)))
def test_the_bytes_equal_safetensors_own(tensors, metadata):
    """One metadata key, as diloco writes: safetensors itself orders several keys at random."""
    ours = stbytes.save(tensors, metadata)
    assert bytes(ours) == st_save(tensors, metadata=metadata)


def test_a_model_sized_state_round_trips_and_matches():
    state = {f"layer{i}.weight": torch.randn(64, 32) for i in range(5)} | {"step": torch.tensor(3)}
    meta = {"diloco": json.dumps({"format": "diloco-weights/1", "version": "7"})}
    data = bytes(stbytes.save(state, meta))
    assert data == st_save(state, metadata=meta)
    back = st_load(data)
    assert all(torch.equal(back[n], t) for n, t in state.items())


def test_a_view_and_a_non_contiguous_tensor_are_written_as_their_values():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.t(), "v": base[1]}
    assert bytes(stbytes.save(tensors)) == st_save({n: t.contiguous() for n, t in tensors.items()})


def test_a_dtype_safetensors_cannot_store_is_refused_by_name():
    with pytest.raises(TypeError, match=r"tensor 'c' has dtype torch\.complex64"):
        stbytes.save({"c": torch.zeros(2, dtype=torch.complex64)})
