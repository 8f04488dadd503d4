"""int4: blockwise absmax quantization to 4 bits, about an eighth of fp32's bytes.

The slice is cut into blocks of 128 elements (the last one may be shorter). Each block stores one
fp32 scale `absmax / 7` (fp32 rather than fp16 so any fp32 magnitude keeps its range) and its
elements rounded to nearest as `q = round(x / scale)` in [-7, 7]; the error of every element is at
most half its block's scale.

Parts: `q` uint8 [ceil(numel / 2)], two nibbles per byte, element 2i in the low nibble, each nibble
`q + 8` (1..15; 0 is not a value); for odd numel the last byte's high nibble is padding and must be 0.
`scale` float32 [ceil(numel / 128)]. bytes = ceil(numel / 2) + 4 * ceil(numel / 128), 0.53 per parameter.
"""

from __future__ import annotations

import torch

from diloco.codecs import Codec, bitpack, expect_part
from diloco.codecs.int8 import absmax_quantize, check_scales, dequantize
from diloco.errors import BadShard

BLOCK = 128
QMAX = 7


class Int4(Codec):
    name = "int4"
    parts = ("q", "scale")

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = absmax_quantize(x.to(torch.float32), BLOCK, QMAX)
        return {"q": bitpack.pack(q.add_(8).to(torch.uint8), 4), "scale": scale}

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        scale = expect_part(parts, "scale", torch.float32, -(-numel // BLOCK))
        check_scales(scale)
        nibbles = bitpack.unpack(parts.get("q"), numel, 4, "q")
        if bool((nibbles == 0).any()):
            raise BadShard("part 'q' holds the nibble 0 (-8), outside [-7, 7]")
        return dequantize(nibbles, scale, BLOCK, offset=8)

    def max_bytes(self, numel: int) -> int:
        return bitpack.packed_len(numel, 4) + 4 * (-(-numel // BLOCK))
