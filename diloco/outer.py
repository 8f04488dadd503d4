"""The outer optimizer step, applied by the aggregator to the global weights.

A stock `torch.optim.SGD` (Nesterov) on the mean pseudo-gradient, as torchft does:
`b = mu*b + d; theta -= lr*(d + mu*b)`. Parameters take the step; floating buffers (BatchNorm
statistics, say) become the workers' average (`theta - mean delta`); integer buffers keep the
global value. Momentum is loaded from and returned for the object store, so the step is stateless.

`outer_step_` steps in place: the aggregator keeps one copy of the weights and momentum between
rounds, and a model-sized copy of each on every step was most of its peak memory. `outer_step`
(replay, tests) is the same step on copies, so both give the same bits.
"""

from __future__ import annotations

import torch


def outer_step_(weights: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
                mean_delta: dict[str, torch.Tensor], *, lr: float, mu: float, nesterov: bool = True) -> None:
    """Step `weights` and `momentum` in place (fp32 tensors are updated where they are; others are
    replaced in the dicts by their stepped value); `mean_delta` is only read."""
    params = sorted(momentum)
    # fp32 tensors become the parameters themselves (no copy); other dtypes step in an fp32 copy.
    tensors = [torch.nn.Parameter(weights[n] if weights[n].dtype == torch.float32 else weights[n].to(torch.float32))
               for n in params]
    for p, n in zip(tensors, params, strict=True):
        p.grad = mean_delta[n].reshape(p.shape).to(torch.float32)
    opt = torch.optim.SGD(tensors, lr=lr, momentum=mu, nesterov=nesterov and mu > 0)
    if mu > 0:
        for p, n in zip(tensors, params, strict=True):
            momentum[n] = momentum[n].to(torch.float32)
            opt.state[p]["momentum_buffer"] = momentum[n]   # SGD updates it in place
    with torch.no_grad():
        opt.step()
    for p, n in zip(tensors, params, strict=True):
        if weights[n].dtype != torch.float32:
            weights[n] = p.detach().to(weights[n].dtype)
        # With mu = 0 SGD keeps no buffer; b = 0*b + d = d keeps the formula true for a later mu.
        if mu == 0:
            momentum[n] = p.grad.clone()
    for n, t in list(weights.items()):
        if n not in momentum and t.is_floating_point():
            if t.dtype == torch.float32:
                t.sub_(mean_delta[n].reshape(t.shape))
            else:
                weights[n] = (t.to(torch.float32) - mean_delta[n].reshape(t.shape)).to(t.dtype)


def outer_step(weights: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
               mean_delta: dict[str, torch.Tensor], *, lr: float, mu: float,
               nesterov: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return (new weights, new momentum); the inputs are left untouched."""
    new_weights = {n: t.clone() for n, t in weights.items()}
    new_momentum = {n: t.to(torch.float32).clone() for n, t in momentum.items()}
    outer_step_(new_weights, new_momentum, mean_delta, lr=lr, mu=mu, nesterov=nesterov)
    return new_weights, new_momentum
