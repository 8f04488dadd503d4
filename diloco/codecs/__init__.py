"""Pseudo-gradient codecs: one interface, each codec a small module, chosen by the run config.

A codec turns a 1-D fp32 slice of a tensor into named tensors (the parts stored in a shard) and
back. Working on flat slices keeps every shard decodable on its own, so the aggregator reduces
shard by shard. Decoding validates what it reads: parts come from other processes.

`get_codec(name, options)` builds one of `CODEC_NAMES` (fp32, bf16, int8, int4, topk) with the run's
codec options as constructor keywords; every worker and the aggregator must use the same ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from diloco.errors import BadShard, ConfigError


class Codec(ABC):
    name: str
    parts: tuple[str, ...]      # the names of the tensors one encoded slice consists of
    # constructor keywords a run config may set, with the types each accepts (bool is never an int here)
    option_types: ClassVar[dict[str, tuple[type, ...]]] = {}
    # The worker's error feedback sends delta + feedback_decay * residual (SparseLoCo's beta); 1 = plain
    # error feedback, where everything left out is sent later in full.
    feedback_decay: float = 1.0

    @abstractmethod
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: 1-D contiguous fp32. Returns the parts to store."""

    @abstractmethod
    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        """The parts of one slice back to 1-D fp32 of `numel` elements; BadShard if malformed."""

    @abstractmethod
    def max_bytes(self, numel: int) -> int:
        """Upper bound on the encoded size of `numel` elements, used to fill shards."""

    # A sparse codec decodes to the few elements it sent (`decode_sparse`), so the aggregator and the
    # worker's error feedback scatter-add them instead of writing, adding and measuring a dense slice.
    sparse: ClassVar[bool] = False

    def decode_sparse(self, parts: dict[str, torch.Tensor], numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions int64, values fp32) of the elements a slice of `numel` decodes to that may be
        nonzero, positions unique; every other element is 0. Only codecs with `sparse` set have one."""
        raise NotImplementedError(f"the {self.name} codec is dense")


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


CODEC_NAMES = ("fp32", "bf16", "int8", "int4", "topk")


def _codec_class(name: str) -> type[Codec]:
    from diloco.codecs.bf16 import Bf16
    from diloco.codecs.fp32 import Fp32
    from diloco.codecs.int4 import Int4
    from diloco.codecs.int8 import Int8
    from diloco.codecs.topk import TopK

    return {"fp32": Fp32, "bf16": Bf16, "int8": Int8, "int4": Int4, "topk": TopK}[name]


def get_codec(name: str, options: dict[str, Any] | None = None) -> Codec:
    """The codec `name` built with `options` as constructor keywords; ConfigError if either is unknown or ill-typed."""
    if name not in CODEC_NAMES:
        raise ConfigError(f"unknown codec {name!r}; known codecs: {', '.join(CODEC_NAMES)}")
    cls = _codec_class(name)
    options = options or {}
    if not isinstance(options, dict):
        raise ConfigError(f"codec options must be a mapping, got {type(options).__name__}")
    valid = ", ".join(cls.option_types) or "none"
    for key, value in options.items():
        types = cls.option_types.get(key)
        if types is None:
            raise ConfigError(f"unknown option {key!r} for codec {name!r}; valid options: {valid}")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"codec {name!r} option {key!r} must be {want}, got {value!r}")
    return cls(**options)
