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


@settings(max_examples=200, deadline=None)
@given(state_dicts())
def test_parts_are_the_same_bytes_and_views_read_them_back(tensors):
    pieces = stbytes.parts(tensors, {"diloco": "x"})
    data = bytes(stbytes.join(pieces))
    assert data == st_save(tensors, metadata={"diloco": "x"})
    back, meta = stbytes.views(data)
    assert meta == {"diloco": "x"}
    assert set(back) == set(tensors)
    assert all(back[n].dtype == t.dtype and torch.equal(back[n], t) for n, t in tensors.items())


def test_parts_alias_a_contiguous_tensor_instead_of_copying_it():
    t = torch.zeros(1000)
    _head, body = stbytes.parts({"t": t})
    t += 1   # the piece is the tensor's memory, not a snapshot of it
    assert bytes(body) == torch.ones(1000).numpy().tobytes()


def test_views_share_the_bytes_they_read():
    data = bytearray(stbytes.save({"t": torch.arange(4, dtype=torch.float32)}))
    back, _ = stbytes.views(data)
    data[-4:] = torch.tensor([9.0]).numpy().tobytes()
    assert back["t"].tolist() == [0.0, 1.0, 2.0, 9.0]


def _object(header: dict, body: bytes) -> bytes:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + body


@pytest.mark.parametrize(("data", "match"), [
    (b"\x01\x02", r"shorter than the 8-byte header length"),
    ((500).to_bytes(8, "little") + b"{}", r"header length 500 exceeds the 2 bytes"),
    ((2).to_bytes(8, "little") + b"{x", r"header is not JSON"),
    (_object([1], b""), r"header is not a JSON object"),
    (_object({"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), r"unknown dtype 'Q9'"),
    (_object({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), r"malformed shape"),
    (_object({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), r"do not fit shape \[2\]"),
    (_object({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), r"hold 4 bytes, the object 8"),
    (_object({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), r"overlaps or leaves a gap"),
    (_object({"__metadata__": {"k": 1}}, b""), r"__metadata__ is not a map of strings"),
])
def test_views_refuse_what_safetensors_refuses_with_the_reason(data, match):
    with pytest.raises(stbytes.FormatError, match=match):
        stbytes.views(data)
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own errors vary by version)
        st_load(data)


def test_views_refuse_misaligned_data():
    head = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]},
                       "u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    head += b" " * (-len(head) % 8)
    with pytest.raises(stbytes.FormatError, match=r"not aligned"):
        stbytes.views(len(head).to_bytes(8, "little") + head + b"\0" * 5)


@settings(max_examples=100, deadline=None)
@given(state_dicts())
def test_from_bytes_of_a_bytearray_is_safetensors_load_in_memory_of_its_own(tensors):
    """The file store's direct reads return a bytearray: loaded through views and one copy, the same
    tensors as safetensors' own load of the bytes, none of them aliasing the buffer (which is freed)."""
    from diloco import model

    data = bytearray(stbytes.save(tensors, None))
    got, want = model.from_bytes(data, "w"), st_load(bytes(data))
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    data[:] = bytes(len(data))
    assert all(torch.equal(got[n], t) for n, t in want.items()), "a tensor still reads the buffer"


def test_from_bytes_of_a_bytearray_refuses_garbage_as_bad_input():
    from diloco import model
    from diloco.errors import BadInput

    with pytest.raises(BadInput, match="w is not a valid safetensors object"):
        model.from_bytes(bytearray(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"), "w")
