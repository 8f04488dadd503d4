"""safetensors bytes without extra copies: the same bytes as `safetensors.torch.save`.

`safetensors.torch.save` copies every tensor into a Python `bytes` and then all of them into the
result: two model-sized copies at once, which were most of the aggregator's peak memory (it
serialises the weights and the momentum side by side) and of a worker's encode time. `parts` gives
the header and then each tensor's own memory (no copy for a contiguous CPU tensor), which the object
store hashes and writes piece by piece; `save` joins them into one buffer (one copy).
tests/test_stbytes.py checks both against `safetensors.torch.save` byte for byte.

`views` reads an object without copying it: each tensor is a read-only view of the bytes, after
the checks safetensors itself makes (a header that parses, known dtypes, offsets that match the
shapes and tile the data exactly). The reduce reads a delta shard's values straight from the bytes
it fetched (docs/architecture.md, "The sync path").

The format: an 8-byte little-endian header length, the JSON header (`__metadata__` first, then
each tensor's dtype, shape and data offsets, compact, padded with spaces to a multiple of 8), then
the tensors' bytes end to end. Tensors are ordered as safetensors orders them: by dtype, larger
kinds first (its Rust enum order, descending), then by name.
"""

from __future__ import annotations

import json
import math
import struct
import warnings

import torch

from diloco.store import Buffer, Payload, pieces

# safetensors' dtype names, in the order of its Rust `Dtype` enum (the file lists the last first).
_DTYPES = (
    (torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"), (torch.int16, "I16"), (torch.uint16, "U16"), (torch.float16, "F16"),
    (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.uint32, "U32"), (torch.float32, "F32"),
    (torch.float64, "F64"), (torch.int64, "I64"), (torch.uint64, "U64"),
)
_NAME = {dtype: name for dtype, name in _DTYPES}
_DTYPE = {name: dtype for dtype, name in _DTYPES}
_RANK = {dtype: i for i, (dtype, _) in enumerate(_DTYPES)}


class FormatError(ValueError):
    """The bytes are not a safetensors object."""


def parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list[Buffer]:
    """The safetensors serialisation of `tensors` as pieces: the header, then each tensor's bytes
    (its own memory if it is a contiguous CPU tensor, else a contiguous CPU copy). The pieces
    alias the tensors: write them out before changing the tensors."""
    for name, t in tensors.items():
        if t.dtype not in _NAME:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors does not store")
    order = sorted(tensors, key=lambda n: (-_RANK[tensors[n].dtype], n.encode()))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    out: list[Buffer] = [struct.pack("<Q", len(head)) + head]
    for name in order:
        t = tensors[name].detach()
        if t.numel():
            out.append(_memory(t))
    return out


def _memory(t: torch.Tensor) -> memoryview:
    flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())   # the array keeps the tensor (and its storage) alive


def save(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytearray:
    """The safetensors serialisation of `tensors` (on any device) in one buffer."""
    return join(parts(tensors, metadata))


def join(data: Payload) -> bytearray:
    """Pieces (as `parts` gives them) laid end to end in one buffer: one copy."""
    return bytearray().join(pieces(data))


def views(data: Buffer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors object, each tensor a read-only view of `data`.

    FormatError for anything safetensors would refuse to load. The views must not be written to."""
    header, base = header_of(data)
    size = len(data) - base
    meta, entries = layout(header, base, size)
    out = {name: _view(data, dtype, base + begin, math.prod(shape)).view(shape)
           for name, (dtype, shape, begin, _) in entries.items()}
    return out, meta


Entry = tuple[torch.dtype, list[int], int, int]   # dtype, shape, data begin and end (after the header)


def layout(header: dict, base: int, size: int | None) -> tuple[dict[str, str], dict[str, Entry]]:
    """(metadata, each tensor's entry) of a parsed header, after the checks `views` makes; `size`: the
    bytes after the header, None where they are not known yet (a streamed read checks them at its end)."""
    header = dict(header)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError("__metadata__ is not a map of strings")
    spans, out = [], {}
    for name, info in header.items():
        dtype, shape, (begin, end) = _entry(name, info)
        itemsize = dtype.itemsize
        if (not 0 <= begin <= end or (size is not None and end > size)
                or end - begin != math.prod(shape) * itemsize):
            raise FormatError(f"tensor {name!r}: data_offsets {[begin, end]} do not fit shape {shape} "
                              f"of {_NAME[dtype]} in {size} bytes")
        if (base + begin) % itemsize:   # safetensors' own layout never is: refuse, not read unaligned
            raise FormatError(f"tensor {name!r}: its data is not aligned to its {itemsize}-byte elements")
        spans.append((begin, end))
        out[name] = (dtype, shape, begin, end)
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise FormatError(f"tensor data overlaps or leaves a gap at byte {pos}")
        pos = end
    if size is not None and pos != size:
        raise FormatError(f"the tensors hold {pos} bytes, the object {size} after its header")
    return meta, out


def header_length(prefix: Buffer, size: int | None = None) -> int:
    """The JSON header's length from an object's first 8 bytes; `size`: the object's, if known."""
    if len(prefix) < 8:
        raise FormatError(f"{len(prefix)} bytes: shorter than the 8-byte header length")
    n = struct.unpack_from("<Q", prefix)[0]
    if size is not None and n > size - 8:
        raise FormatError(f"header length {n} exceeds the {size - 8} bytes that follow")
    return n


def header_of(data: Buffer) -> tuple[dict, int]:
    """(the parsed JSON header, where the data starts) of an object whose first bytes are `data`."""
    n = header_length(data, len(data))
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    return header, 8 + n


def _entry(name: str, info: object) -> tuple[torch.dtype, list[int], tuple[int, int]]:
    if not isinstance(info, dict):
        raise FormatError(f"tensor {name!r}: entry is not an object")
    dtype = _DTYPE.get(info.get("dtype"))  # type: ignore[arg-type]
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if dtype is None:
        raise FormatError(f"tensor {name!r}: unknown dtype {str(info.get('dtype'))[:20]!r}")
    ints = lambda xs, n=None: (isinstance(xs, list) and (n is None or len(xs) == n)  # noqa: E731
                               and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in xs))
    if not ints(shape) or not ints(offsets, 2):
        raise FormatError(f"tensor {name!r}: malformed shape or data_offsets")
    return dtype, shape, (offsets[0], offsets[1])


def _view(data: Buffer, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # bytes are read-only: so are the views (never written to)
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype, count=count, offset=offset)
