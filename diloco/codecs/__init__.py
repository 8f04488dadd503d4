"""Pseudo-gradient codecs: one interface, each codec a small module, chosen by the run config.

A codec turns a 1-D fp32 slice of a tensor into named tensors (the parts stored in a shard) and
back. Working on flat slices keeps every shard decodable on its own, so the aggregator reduces
shard by shard. Decoding validates what it reads: parts come from other processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from diloco.errors import BadShard, ConfigError


class Codec(ABC):
    name: str
    parts: tuple[str, ...]      # the names of the tensors one encoded slice consists of

    @abstractmethod
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: 1-D contiguous fp32. Returns the parts to store."""

    @abstractmethod
    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        """The parts of one slice back to 1-D fp32 of `numel` elements; BadShard if malformed."""

    @abstractmethod
    def max_bytes(self, numel: int) -> int:
        """Upper bound on the encoded size of `numel` elements, used to fill shards."""


def expect_part(parts: dict[str, torch.Tensor], name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The part `name`, checked to be 1-D of `numel` elements of `dtype`."""
    t = parts.get(name)
    if t is None:
        raise BadShard(f"part {name!r} is missing")
    if t.dtype != dtype or t.dim() != 1 or t.numel() != numel:
        raise BadShard(
            f"part {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} ({numel},)"
        )
    return t


def get_codec(name: str) -> Codec:
    from diloco.codecs.bf16 import Bf16
    from diloco.codecs.fp32 import Fp32

    codecs: dict[str, Codec] = {"fp32": Fp32(), "bf16": Bf16()}
    try:
        return codecs[name]
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}; known codecs: {', '.join(codecs)}") from None
