"""DiLoCo's outer step and an fp32 delta's shards, computed here without the product's code.

The product's replay (`diloco.replay`) calls the product's own reduce and outer step, so it shows
that the aggregator is consistent with itself, not that either is right. This module is the
independent side: shards are read with safetensors and json alone, the mean and the momentum update
are written out in float64, so a bug shared by the aggregator and the replay shows up against it.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load


def fp32_delta(shards: list[bytes], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A worker's fp32 delta from its shards (format diloco-delta/2), float64, shaped as `like`.

    Each shard holds one part `v`, the slice laid end to end over the segments [name, start, numel]
    listed in its metadata key `diloco`; every element must be written exactly once.
    """
    flat = {n: torch.full((t.numel(),), float("nan"), dtype=torch.float64) for n, t in like.items()}
    for data in shards:
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["diloco"])
        assert meta["codec"] == "fp32", meta
        values = st_load(data)["v"].to(torch.float64)
        pos = 0
        for name, start, numel in meta["segments"]:
            target = flat[name][start:start + numel]
            assert bool(target.isnan().all()), f"{name}[{start}:{start + numel}] written twice"
            target.copy_(values[pos:pos + numel])
            pos += numel
        assert pos == values.numel()
    for name, t in flat.items():
        assert not bool(t.isnan().any()), f"{name} not fully covered by the shards"
    return {n: t.view(like[n].shape) for n, t in flat.items()}


def outer_step(theta: dict[str, torch.Tensor], b: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]],
               *, lr: float, mu: float, nesterov: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(new weights, new momentum), float64: d = mean delta; b = mu*b + d; parameters (the names in
    `b`) take theta - lr*(d + mu*b) with Nesterov, theta - lr*b without; float buffers become
    theta - d; integer buffers keep the global value."""
    new_theta, new_b = {}, {}
    for name, t in theta.items():
        if not t.is_floating_point():
            new_theta[name] = t.clone()
            continue
        d = torch.stack([delta[name].double() for delta in deltas]).mean(0)
        if name in b:
            new_b[name] = mu * b[name].double() + d
            step = d + mu * new_b[name] if nesterov else new_b[name]
            new_theta[name] = t.double() - lr * step
        else:
            new_theta[name] = t.double() - d
    return new_theta, new_b


def weighted_mean(deltas: list[dict[str, torch.Tensor]], weights: list[float], scales: list[float]
                  ) -> dict[str, torch.Tensor]:
    """float64 sum(weight * scale * delta) / sum(weight): the mean with token and staleness weights."""
    total = sum(weights)
    return {name: sum(w * s * d[name].double() for w, s, d in zip(weights, scales, deltas, strict=True)) / total
            for name in deltas[0]}


def delayed_nesterov(theta: dict[str, torch.Tensor], b: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]],
                     *, lr: float, mu: float, n: int, arrivals: list[int] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Delayed Nesterov in float64 (Liu et al. 2024, momentum activation c = 0), one outer step per
    mean delta in `deltas`, which averages arrivals[i] deltas (default 1 each), counted one by one:
    every delta moves theta by lr/n of the mean (a version of k deltas: min(k, n)/n); once n or more
    are buffered, the momentum also moves by their mean and theta by its Nesterov term lr*mu*b."""
    theta = {k: t.double().clone() if t.is_floating_point() else t.clone() for k, t in theta.items()}
    b = {k: t.double().clone() for k, t in b.items()}
    buf = {k: torch.zeros_like(t) for k, t in b.items()}
    count = 0
    for d, k_deltas in zip(deltas, arrivals or [1] * len(deltas), strict=True):
        count += k_deltas
        full = count >= n
        for k in d:               # the floating tensors (integer buffers keep the global value)
            dk = d[k].double()
            if k not in b:           # a float buffer: the workers' average
                theta[k] = theta[k] - dk
                continue
            buf[k] = buf[k] + k_deltas * dk
            theta[k] = theta[k] - lr * min(k_deltas, n) / n * dk
            if full:
                b[k] = mu * b[k] + buf[k] / count
                buf[k] = torch.zeros_like(buf[k])
                theta[k] = theta[k] - lr * mu * b[k]
        if full:
            count = 0
    return theta, b


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Every entry equal to fp32 precision (the product computes in fp32, the reference in fp64)."""
    assert sorted(actual) == sorted(expected), what
    for name, t in expected.items():
        torch.testing.assert_close(actual[name].double(), t.double(), atol=1e-6, rtol=1e-5,
                                   msg=lambda m, n=name: f"{what}, {n}: {m}")
