"""The outer optimizer step, applied by the aggregator to the global weights.

A stock `torch.optim.SGD` (Nesterov) on the mean pseudo-gradient, as torchft does:
`b = mu*b + d; theta -= lr*(d + mu*b)`. Parameters take the step; floating buffers (BatchNorm
statistics, say) become the workers' average (`theta - mean delta`); integer buffers keep the
global value. Momentum is loaded from and returned for the object store, so the step is stateless.
"""

from __future__ import annotations

import torch


def outer_step(weights: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
               mean_delta: dict[str, torch.Tensor], *, lr: float, mu: float,
               nesterov: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return (new weights, new momentum); the inputs are left untouched."""
    params = sorted(momentum)
    new_weights = {n: t.clone() for n, t in weights.items()}
    tensors = [torch.nn.Parameter(weights[n].to(torch.float32).clone()) for n in params]
    for p, n in zip(tensors, params, strict=True):
        p.grad = mean_delta[n].reshape(p.shape).to(torch.float32)
    opt = torch.optim.SGD(tensors, lr=lr, momentum=mu, nesterov=nesterov and mu > 0)
    if mu > 0:
        for p, n in zip(tensors, params, strict=True):
            opt.state[p]["momentum_buffer"] = momentum[n].to(torch.float32).clone()
    opt.step()
    new_momentum = {}
    for p, n in zip(tensors, params, strict=True):
        new_weights[n] = p.detach().to(weights[n].dtype)
        # With mu = 0 SGD keeps no buffer; b = 0*b + d = d keeps the formula true for a later mu.
        new_momentum[n] = opt.state[p]["momentum_buffer"].clone() if mu > 0 else p.grad.clone()
    for n, t in weights.items():
        if n not in momentum and t.is_floating_point():
            new_weights[n] = (t.to(torch.float32) - mean_delta[n].reshape(t.shape)).to(t.dtype)
    return new_weights, new_momentum
