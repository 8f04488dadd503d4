"""safetensors bytes with one copy of the data: the same bytes as `safetensors.torch.save`.

`safetensors.torch.save` copies every tensor into a Python `bytes` and then all of them into the
result: two model-sized copies at once, which were most of the aggregator's peak memory (it
serialises the weights and the momentum side by side) and of a worker's encode time. This writer
lays the header and each tensor's bytes straight into one buffer. tests/test_stbytes.py checks it
against `safetensors.torch.save` byte for byte; reading stays with the safetensors library.

The format: an 8-byte little-endian header length, the JSON header (`__metadata__` first, then
each tensor's dtype, shape and data offsets, compact, padded with spaces to a multiple of 8), then
the tensors' bytes end to end. Tensors are ordered as safetensors orders them: by dtype, larger
kinds first (its Rust enum order, descending), then by name.
"""

from __future__ import annotations

import json
import struct

import torch

# safetensors' dtype names, in the order of its Rust `Dtype` enum (the file lists the last first).
_DTYPES = (
    (torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"), (torch.int16, "I16"), (torch.uint16, "U16"), (torch.float16, "F16"),
    (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.uint32, "U32"), (torch.float32, "F32"),
    (torch.float64, "F64"), (torch.int64, "I64"), (torch.uint64, "U64"),
)
_NAME = {dtype: name for dtype, name in _DTYPES}
_RANK = {dtype: i for i, (dtype, _) in enumerate(_DTYPES)}


def save(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytearray:
    """The safetensors serialisation of `tensors` (on any device; copied to the CPU one at a time)."""
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
    out = bytearray(8 + len(head) + offset)
    out[:8] = struct.pack("<Q", len(head))
    out[8:8 + len(head)] = head
    view = memoryview(out)
    pos = 8 + len(head)
    for name in order:
        t = tensors[name].detach()
        if t.numel():
            flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
            dest = torch.frombuffer(view[pos:pos + flat.numel()], dtype=torch.uint8)
            dest.copy_(flat)
            pos += flat.numel()
    return out
