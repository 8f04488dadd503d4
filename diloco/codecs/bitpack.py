"""Bit packing shared by the sub-byte codecs: unsigned fields of 2, 4 or 12 bits in a uint8 stream.

Fields are packed little-endian: field 0 takes the lowest bits of byte 0. `n` fields of `bits` bits
take `ceil(n * bits / 8)` bytes; the bits past the last field (the padding) are zero, and `unpack`
rejects a stream whose padding is not. Pure tensor ops, so it runs on any device.
"""

from __future__ import annotations

import torch

from diloco.errors import BadShard

WIDTHS = (2, 4, 12)


def packed_len(n: int, bits: int) -> int:
    """Bytes that `n` fields of `bits` bits take."""
    return (n * bits + 7) // 8


def _group(bits: int) -> tuple[int, int]:
    """(fields, bytes) of the smallest whole group: 8 // bits fields in a byte, or 2 fields of 12 bits in 3."""
    if bits not in WIDTHS:
        raise ValueError(f"bit width {bits} is not one of {WIDTHS}")
    return (2, 3) if bits == 12 else (8 // bits, 1)


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """1-D integers in [0, 2**bits) to `packed_len(n, bits)` uint8 bytes (values are not range-checked)."""
    fields, _ = _group(bits)
    n = values.numel()
    pad = -n % fields
    dtype = torch.int32 if bits == 12 else torch.uint8
    v = values.reshape(-1).to(dtype)
    v = (torch.cat([v, v.new_zeros(pad)]) if pad else v).view(-1, fields)
    if bits == 12:
        a, b = v[:, 0], v[:, 1]
        out = torch.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], dim=1).to(torch.uint8)
    else:
        out = v[:, 0].clone()
        for j in range(1, fields):
            out.bitwise_or_(v[:, j] << (bits * j))
    return out.reshape(-1)[:packed_len(n, bits)]


def unpack(data: torch.Tensor | None, n: int, bits: int, what: str) -> torch.Tensor:
    """The `n` fields packed in part `what` (int32 for 12 bits, else uint8); BadShard if the part is
    missing, is not uint8 of `packed_len(n, bits)` bytes, or has non-zero padding bits."""
    fields, nbytes = _group(bits)
    want = packed_len(n, bits)
    if data is None:
        raise BadShard(f"part {what!r} is missing")
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != want:
        raise BadShard(f"part {what!r} is {data.dtype} {tuple(data.shape)}, expected torch.uint8 ({want},)")
    if bits == 12:
        b = data.to(torch.int32)
        pad = -want % nbytes
        b = (torch.cat([b, b.new_zeros(pad)]) if pad else b).view(-1, 3)
        v = torch.stack([b[:, 0] | ((b[:, 1] & 0xF) << 8), (b[:, 1] >> 4) | (b[:, 2] << 4)], dim=1)
    else:
        mask = (1 << bits) - 1
        v = torch.stack([(data >> (bits * j)) & mask for j in range(fields)], dim=1)
    v = v.reshape(-1)
    if bool((v[n:] != 0).any()):
        raise BadShard(f"part {what!r} has non-zero padding bits after its {n} fields")
    return v[:n]
