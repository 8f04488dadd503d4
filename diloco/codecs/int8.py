"""int8: blockwise absmax quantization, about a quarter of fp32's bytes.

The slice is cut into blocks of 256 elements (the last one may be shorter). Each block stores one
fp32 scale `absmax / 127` and its elements rounded to nearest as `round(x / scale)` in [-127, 127],
so the error of every element is at most half its block's scale.

Parts: `q` int8 [numel], `scale` float32 [ceil(numel / 256)];
bytes = numel + 4 * ceil(numel / 256), 1.0156 per parameter.
A non-finite input gives a non-finite scale, which decoding rejects.
"""

from __future__ import annotations

import torch

from diloco.codecs import Codec, expect_part
from diloco.errors import BadShard

BLOCK = 256
QMAX = 127


def absmax_quantize(x: torch.Tensor, block: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q = round(x / scale) as fp32 [numel], |q| <= qmax; scale = block absmax / qmax, fp32 [blocks]."""
    n = x.numel()
    pad = -n % block
    b = (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(-1, block)
    absmax = torch.maximum(b.amax(dim=1), -b.amin(dim=1))
    # A tensor divisor, not a Python number: CUDA divides by a number as a multiply by its reciprocal,
    # which differs in the last bit (found on an H200), and a GPU encode must match the CPU's bits.
    scale = torch.div(absmax, torch.full_like(absmax, qmax)) if n else x.new_zeros(0)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.div(b, safe[:, None]).round_().clamp_(-qmax, qmax)  # divide, not multiply: exact rounding
    return q.view(-1)[:n], scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: int, offset: int = 0) -> torch.Tensor:
    """fp32 [numel] = (q - offset) * the scale of each element's block; one buffer, scaled in place."""
    n = q.numel()
    out = torch.empty(len(scale) * block, dtype=torch.float32, device=q.device)
    out[:n].copy_(q)
    out[n:].zero_()
    if offset:
        out[:n].sub_(offset)
    out.view(-1, block).mul_(scale[:, None])
    return out[:n]


def check_scales(scale: torch.Tensor, what: str = "scale") -> None:
    """BadShard unless every scale is finite and >= 0."""
    if not bool(torch.isfinite(scale).all()):
        raise BadShard(f"part {what!r} holds NaN or Inf")
    if bool((scale < 0).any()):
        raise BadShard(f"part {what!r} holds a negative scale")


class Int8(Codec):
    name = "int8"
    parts = ("q", "scale")

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = absmax_quantize(x.to(torch.float32), BLOCK, QMAX)
        return {"q": q.to(torch.int8), "scale": scale}

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        q = expect_part(parts, "q", torch.int8, numel)
        scale = expect_part(parts, "scale", torch.float32, -(-numel // BLOCK))
        check_scales(scale)
        if bool((q == -128).any()):
            raise BadShard("part 'q' holds -128, outside [-127, 127]")
        return dequantize(q, scale, BLOCK)

    def max_bytes(self, numel: int) -> int:
        return numel + 4 * (-(-numel // BLOCK))
