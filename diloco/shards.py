"""The delta shard format: a pseudo-gradient cut into safetensors objects of at most `shard_bytes`.

Each tensor is flattened and cut into slices; each slice is encoded by the run's codec and stored
as tensors named `{i}.{part}`. The safetensors metadata has one key, `diloco`, holding JSON:
`{"format", "codec", "entries": [[name, start, numel], ...]}` (entry `i` says which slice `{i}.*`
is). One key, because safetensors writes several metadata keys in a random order and shards must be
byte-identical when re-encoded. Every shard decodes on its own, so the aggregator can verify and
reduce shard by shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diloco.codecs import Codec
from diloco.errors import BadShard

FORMAT = "diloco-delta/1"
_HEADER_SLACK = 64 * 1024  # safetensors JSON header; bounds how far a shard may exceed shard_bytes
_PART_HEADER = 128         # upper bound on one tensor's entry in the safetensors header
_ENTRY_HEADER = 64         # upper bound on one [name, start, numel] entry, besides the name


def max_shard_object_bytes(shard_bytes: int) -> int:
    """The largest shard object the aggregator accepts for a run's `shard_bytes`."""
    return shard_bytes + _HEADER_SLACK


def encode_delta(delta: dict[str, torch.Tensor], codec: Codec, shard_bytes: int) -> list[bytes]:
    """Encode fp32 tensors into shards; names in sorted order so the output is deterministic."""
    shards: list[bytes] = []
    tensors: dict[str, torch.Tensor] = {}
    entries: list[list] = []
    used = 0
    max_slice = _max_slice(codec, shard_bytes)

    def flush() -> None:
        nonlocal tensors, entries, used
        if entries:
            meta = json.dumps({"format": FORMAT, "codec": codec.name, "entries": entries}, separators=(",", ":"))
            shards.append(st_save(tensors, metadata={"diloco": meta}))
        tensors, entries, used = {}, [], 0

    for name in sorted(delta):
        flat = delta[name].detach().reshape(-1).to(torch.float32)
        for start in range(0, max(flat.numel(), 1), max_slice):
            piece = flat[start:start + max_slice]
            parts = codec.encode(piece.contiguous())
            # Count header bytes too: many tiny tensors would otherwise overflow the object limit.
            size = sum(t.numel() * t.element_size() + _PART_HEADER for t in parts.values())
            size += _ENTRY_HEADER + 2 * len(name.encode())
            if entries and used + size > shard_bytes:
                flush()
            i = len(entries)
            for part, t in parts.items():
                tensors[f"{i}.{part}"] = t.cpu().contiguous()
            entries.append([name, start, piece.numel()])
            used += size
    flush()
    return shards


def _max_slice(codec: Codec, shard_bytes: int) -> int:
    """The most elements whose encoding fits `shard_bytes` (max_bytes is monotone: double, then bisect)."""
    hi = 1
    while codec.max_bytes(hi * 2) <= shard_bytes and hi < 1 << 40:
        hi *= 2
    lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if codec.max_bytes(mid) <= shard_bytes else (lo, mid)
    # Align to 4096 so slices line up with the block and chunk sizes of int8, int4 and topk.
    return lo - lo % 4096 if lo >= 4096 else lo


def decode_shard(data: bytes, codec: Codec, numels: dict[str, int]) -> Iterator[tuple[str, int, torch.Tensor]]:
    """Yield (name, start, fp32 slice) for each entry; BadShard on anything malformed.

    `numels` maps each tensor the delta may hold to its element count; a name outside it, a slice
    out of bounds, a codec other than the run's, or a stray tensor is rejected.
    """
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise BadShard(f"not a safetensors object: {e}") from None
    meta = _metadata(data)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise BadShard(f"shard format is {found!r}, expected {FORMAT!r}")
    if meta.get("codec") != codec.name:
        raise BadShard(f"shard codec is {meta.get('codec')!r}, the run's codec is {codec.name!r}")
    entries = meta.get("entries")
    if not isinstance(entries, list):
        raise BadShard("shard metadata 'entries' is not a list")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        name, start, numel = _check_entry(entry, numels)
        prefix = f"{i}."
        parts = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(parts) != set(codec.parts):
            raise BadShard(f"entry {i} has parts {sorted(parts)[:5]}, the {codec.name} codec has {list(codec.parts)}")
        seen.update(prefix + p for p in parts)
        values = codec.decode(parts, numel)
        if not torch.isfinite(values).all():
            raise BadShard(f"slice {name}[{start}:{start + numel}] holds NaN or Inf")
        yield name, start, values
    stray = sorted(set(tensors) - seen)
    if stray:
        raise BadShard(f"shard holds tensors no entry names: {stray[:3]}")


def _check_entry(entry: object, numels: dict[str, int]) -> tuple[str, int, int]:
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in entry[1:])):
        raise BadShard(f"malformed entry {str(entry)[:80]}")
    name, start, numel = entry
    if name not in numels:
        raise BadShard(f"tensor {name[:80]!r} is not a floating tensor of the model")
    if start < 0 or numel < 0 or start + numel > numels[name]:
        raise BadShard(f"slice {name}[{start}:{start + numel}] is out of bounds (numel {numels[name]})")
    return name, start, numel


def _metadata(data: bytes) -> object:
    # safetensors: 8-byte little-endian header length, then the JSON header holding __metadata__.
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    if not isinstance(meta, dict) or "diloco" not in meta:
        return None
    try:
        return json.loads(meta["diloco"])
    except json.JSONDecodeError:
        raise BadShard("shard metadata 'diloco' is not JSON") from None


class DeltaBuffer:
    """One worker's decoded delta, checked to cover every float tensor exactly once."""

    def __init__(self, like: dict[str, torch.Tensor]) -> None:
        self.numels = {name: t.numel() for name, t in like.items()}
        self.flat = {name: torch.zeros(t.numel(), dtype=torch.float32) for name, t in like.items()}
        self.covered: dict[str, list[tuple[int, int]]] = {name: [] for name in like}

    def add_shard(self, data: bytes, codec: Codec) -> None:
        for name, start, values in decode_shard(data, codec, self.numels):
            self.flat[name][start:start + values.numel()] = values
            self.covered[name].append((start, values.numel()))

    def check_complete(self) -> None:
        for name, spans in self.covered.items():
            pos = 0
            for start, numel in sorted(spans):
                if start != pos:
                    raise BadShard(f"tensor {name!r} slices overlap or leave a gap at element {pos}")
                pos += numel
            if pos != self.numels[name]:
                raise BadShard(f"tensor {name!r} covers {pos} of {self.numels[name]} elements")


def l2_norm(tensors) -> float:
    """L2 norm over several tensors, accumulated in float64 so workers and aggregator agree."""
    return float(sum(t.double().pow(2).sum() for t in tensors) ** 0.5)
