"""Compressed download: each version also published as an encoded update from the version before.

Workers download the full fp32 weights only when they join, fall behind or find something wrong;
otherwise they fetch the update `theta(v+1) - theta(v)` encoded with the run's `download_codec`
(default: the upload codec; int4 for the sparse topk) and apply it. The *decoded* update is the truth: the aggregator
computes the new weights as `apply(theta(v), decode(update))` with the same code a worker runs, so
a worker holding v reaches v+1 bit for bit, and the full weights object it would otherwise read
holds exactly those bytes. What the codec could not carry stays in an aggregator-side error
feedback residual, added to the next version's update (plain error feedback: every part of the
outer step reaches the workers eventually). The residual is stored in the momentum object, under
names prefixed `RESIDUAL`, so a standby aggregator or a replay continues it.

With an fp32 download codec there is nothing to gain over the full weights (the same bytes), so no
update is published and the weights are exactly the outer step's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from diloco.codecs import Codec, get_codec
from diloco.config import RunConfig
from diloco.shards import DeltaBuffer, encode_with_feedback, max_shard_object_bytes, unflatten
from diloco.store import ObjectStore

RESIDUAL = "residual/"   # prefix of the residual's tensors in the momentum object


SPARSE_DEFAULT = "int4"   # the download codec when the upload codec is sparse (topk) and none is set


def download_codec_spec(cfg: RunConfig) -> tuple[str, dict]:
    """(name, options) of the download codec: `download_codec`, or else the upload codec (int4 for a
    sparse one), with `download_codec_options`, or else the upload codec's options when it is the same.

    Why not topk for topk: the update is the mean of W sparse deltas (up to W times as dense), so at
    the upload's density the download falls behind and the run ends 26% worse (docs/benchmarks.md,
    "Compressed download"); int4 ends level with the full-weights download at 1/7.5 of its bytes."""
    name = cfg.download_codec or (SPARSE_DEFAULT if get_codec(cfg.codec, cfg.codec_options).sparse else cfg.codec)
    options = cfg.download_codec_options or (cfg.codec_options if name == cfg.codec else {})
    return name, options


def download_codec(cfg: RunConfig) -> Codec | None:
    """The codec updates are published with, or None when the run downloads full weights only."""
    name, options = download_codec_spec(cfg)
    return None if name == "fp32" else get_codec(name, options)


def split_momentum(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(momentum, residual) from a momentum object's tensors."""
    momentum = {n: t for n, t in state.items() if not n.startswith(RESIDUAL)}
    residual = {n[len(RESIDUAL):]: t for n, t in state.items() if n.startswith(RESIDUAL)}
    return momentum, residual


def join_momentum(momentum: dict[str, torch.Tensor], residual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**momentum, **{RESIDUAL + n: t for n, t in residual.items()}}


def floats(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors an update covers: the floating ones (integer buffers keep the global value)."""
    return {n: t for n, t in state.items() if t.is_floating_point()}


def encode(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], residual: dict[str, torch.Tensor],
           codec: Codec, shard_bytes: int) -> tuple[list[bytes], dict[str, torch.Tensor]]:
    """Shards of `new - old + residual` and the new residual (what the shards do not carry)."""
    target = {n: new[n].to(torch.float32) - t.to(torch.float32) for n, t in floats(old).items()}
    shards, residual, _ = encode_with_feedback(target, residual, codec, 1.0, shard_bytes)
    return shards, residual


def decode(shards: list[bytes], like: dict[str, torch.Tensor], codec: Codec) -> dict[str, torch.Tensor]:
    """The update the shards hold, fp32 shaped as `like`'s floating tensors; BadShard if malformed or
    incomplete. Workers and the aggregator both decode with this, so they agree to the bit."""
    buf = DeltaBuffer(floats(like))
    for data in shards:
        buf.add_shard(data, codec)
    buf.check_complete()
    return unflatten(buf.buffer, floats(like))


def apply(weights: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights + update` in fp32, cast back to each tensor's dtype; tensors without an update are kept."""
    return {n: (t.to(torch.float32) + update[n]).to(t.dtype) if n in update else t for n, t in weights.items()}


def fetch(store: ObjectStore, keys: tuple[str, ...], digests: tuple[str, ...], shard_bytes: int,
          pool: ThreadPoolExecutor | None = None) -> list[bytes]:
    """The update's shards, each checked against its digest and the shard size limit."""
    limit = max_shard_object_bytes(shard_bytes)

    def get(pair: tuple[str, str]) -> bytes:
        return store.get(pair[0], digest=pair[1], max_bytes=limit)

    pairs = list(zip(keys, digests, strict=True))
    if pool is None:
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(pairs)))) as own:
            return list(own.map(get, pairs))
    return list(pool.map(get, pairs))
