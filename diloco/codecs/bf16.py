"""bf16: fp32 rounded to bfloat16 (round to nearest even), half the bytes, 8 bits of mantissa.

Pseudo-gradients are differences of weights over H steps, large enough that bf16's relative error
(at most 2^-8) is far below the noise between workers.
"""

from __future__ import annotations

import torch

from diloco.codecs import Codec, expect_part


class Bf16(Codec):
    name = "bf16"
    parts = ("v",)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"v": x.to(torch.bfloat16).contiguous()}

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        return expect_part(parts, "v", torch.bfloat16, numel).to(torch.float32)

    def max_bytes(self, numel: int) -> int:
        return 2 * numel
