"""fp32: the pseudo-gradient as it is; the lossless reference the other codecs are measured against."""

from __future__ import annotations

import torch

from diloco.codecs import Codec, expect_part


class Fp32(Codec):
    name = "fp32"
    parts = ("v",)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"v": x.to(torch.float32).contiguous()}

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        return expect_part(parts, "v", torch.float32, numel)

    def max_bytes(self, numel: int) -> int:
        return 4 * numel
