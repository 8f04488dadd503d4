"""bf16: fp32 rounded to bfloat16, half the bytes, 8 bits of mantissa.

Pseudo-gradients are differences of weights over H steps, large enough that bf16's relative error
(at most 2^-8) is far below the noise between workers.

By default rounding is to nearest even. With `stochastic=True` it is unbiased stochastic rounding:
a uniform random 16-bit integer is added to the low half of the fp32 bit pattern, which is then
truncated, so x in [lo, hi] (neighbouring bf16 values) becomes hi with probability (|x| - |lo|) /
(|hi| - |lo|): the expectation is exactly x, the relative error below 2^-7. The random bits come
from a torch.Generator per device, seeded with `seed` (fresh entropy when None) at the codec's first
encode on that device and advancing with every encode; two codecs with the same seed make the same
roundings for the same calls (CPU and CUDA streams differ). The caller should keep one instance
across rounds and give workers distinct seeds, or the roundings repeat and stop averaging out.
Non-finite values pass through unchanged; finite values never round to Inf.
Parts: `v` bfloat16 [numel]; bytes = 2 * numel.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from diloco.codecs import Codec, expect_part
from diloco.errors import ConfigError

_HIGH_HALF = -65536  # 0xFFFF0000 as int32
_BF16_MAX = torch.finfo(torch.bfloat16).max


class Bf16(Codec):
    name = "bf16"
    parts = ("v",)
    option_types: ClassVar[dict[str, tuple[type, ...]]] = {"stochastic": (bool,), "seed": (int, type(None))}

    def __init__(self, stochastic: bool = False, seed: int | None = None) -> None:
        if seed is not None and not 0 <= seed < 2**63:
            raise ConfigError(f"bf16 option 'seed' must be in [0, 2^63), got {seed}")
        self.stochastic = stochastic
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device)
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(self.seed)
            self._generators[device] = g
        return g

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.stochastic:
            return {"v": x.to(torch.bfloat16).contiguous()}
        x = x.to(torch.float32).contiguous()
        n = x.numel()
        bits = x.view(torch.int32)
        # 64 uniform bits per word (from = int64 min, to = None), cut into four 16-bit noises
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-(2**63), None, generator=self._generator(x.device))
        noise = words.view(torch.int16)[:n].to(torch.int32).bitwise_and_(0xFFFF)
        rounded = noise.add_(bits).bitwise_and_(_HIGH_HALF).view(torch.float32)  # in place: one buffer
        if n and not bool(torch.maximum(x.amax(), -x.amin()) <= _BF16_MAX):  # NaN, Inf or beyond bf16's top
            finite = torch.isfinite(x)
            truncated = (bits & _HIGH_HALF).view(torch.float32)
            rounded = torch.where(finite & torch.isinf(rounded), truncated, rounded)  # never overflow to Inf
            rounded = torch.where(finite, rounded, x)
        return {"v": rounded.to(torch.bfloat16)}

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        return expect_part(parts, "v", torch.bfloat16, numel).to(torch.float32)

    def max_bytes(self, numel: int) -> int:
        return 2 * numel
