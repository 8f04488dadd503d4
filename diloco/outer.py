"""The outer optimizer step, applied by the aggregator to the global weights.

A stock `torch.optim.SGD` (Nesterov) on the mean pseudo-gradient, as torchft does:
`b = mu*b + d; theta -= lr*(d + mu*b)`. Parameters take the step; floating buffers (BatchNorm
statistics, say) become the workers' average (`theta - mean delta`); integer buffers keep the
global value. Momentum is loaded from and returned for the object store, so the step is stateless.

`outer_step_` steps in place: the aggregator keeps one copy of the weights and momentum between
rounds, and a model-sized copy of each on every step was most of its peak memory. `outer_step`
(replay, tests) is the same step on copies, so both give the same bits.

Delayed Nesterov (`dn_buffer` N > 1, asynchronous mode; Liu et al. 2024, arXiv 2401.09135) keeps its
state in the momentum dict, under names prefixed `DN` (the buffered pseudo-gradients and how many
there are), so the momentum object carries it to a standby aggregator and to the replay.
"""

from __future__ import annotations

import torch

DN = "dn/"                  # prefix of Delayed Nesterov's state in the momentum dict
DN_COUNT = DN + "count"     # pseudo-gradients buffered since the last momentum update (a float32 scalar)
DN_BUFFER = DN + "buffer/"  # + parameter name: their sum


def outer_step_(weights: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
                mean_delta: dict[str, torch.Tensor], *, lr: float, mu: float, nesterov: bool = True) -> None:
    """Step `weights` and `momentum` in place (fp32 tensors are updated where they are; others are
    replaced in the dicts by their stepped value); `mean_delta` is only read."""
    for n in sorted(n for n in momentum if not n.startswith(DN)):
        # fp32 tensors step where they are (no copy); other dtypes step in an fp32 copy.
        w = weights[n] if weights[n].dtype == torch.float32 else weights[n].to(torch.float32)
        grad = mean_delta[n].reshape(w.shape).to(torch.float32)
        if mu > 0:
            momentum[n] = momentum[n].to(torch.float32)
            sgd_step_(w, momentum[n], grad, lr=lr, mu=mu, nesterov=nesterov)
        else:
            w.add_(grad, alpha=-lr)
            # SGD keeps no buffer at mu = 0; b = 0*b + d = d keeps the formula true for a later mu.
            momentum[n] = grad.clone()
        if weights[n].dtype != torch.float32:
            weights[n] = w.to(weights[n].dtype)
    for n, t in list(weights.items()):
        if n not in momentum and t.is_floating_point():
            if t.dtype == torch.float32:
                t.sub_(mean_delta[n].reshape(t.shape))
            else:
                weights[n] = (t.to(torch.float32) - mean_delta[n].reshape(t.shape)).to(t.dtype)


_STEP_CHUNK = 1 << 16   # elements: the chunk of each tensor stays in the cache across the step's passes


def sgd_step_(param: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor, *, lr: float, mu: float,
              nesterov: bool) -> None:
    """`torch.optim.SGD`'s step with momentum `mu` > 0 (no dampening or weight decay), in place, bit
    for bit: `buf = mu*buf + grad; param -= lr*(grad + mu*buf)` (or `lr*buf` without Nesterov).

    The same elementwise operations as SGD's, run a cache-sized chunk at a time instead of each over
    the whole tensor: SGD's four passes over memory and a model-sized temporary took 0.085 s for the
    sync benchmark's 25M parameters, this 0.037 s (tests/test_outer.py checks the bits)."""
    if not (param.is_contiguous() and buf.is_contiguous()):   # no flat views: the whole tensors at once
        _sgd_pass(param, buf, grad, None, lr=lr, mu=mu, nesterov=nesterov)
        return
    p, b, g = param.view(-1), buf.view(-1), grad.reshape(-1)
    tmp = torch.empty(min(_STEP_CHUNK, p.numel()), dtype=torch.float32, device=p.device) if nesterov else None
    for at in range(0, p.numel(), _STEP_CHUNK):
        end = min(at + _STEP_CHUNK, p.numel())
        out = tmp[:end - at] if tmp is not None else None
        _sgd_pass(p[at:end], b[at:end], g[at:end], out, lr=lr, mu=mu, nesterov=nesterov)


def _sgd_pass(p: torch.Tensor, b: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None, *, lr: float, mu: float,
              nesterov: bool) -> None:
    """torch/optim/sgd.py `_single_tensor_sgd`'s operations, in its order (`out`: room for the Nesterov term)."""
    b.mul_(mu).add_(g)
    step = (torch.add(g, b, alpha=mu, out=out) if out is not None else g.add(b, alpha=mu)) if nesterov else b
    p.add_(step, alpha=-lr)


def outer_step(weights: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
               mean_delta: dict[str, torch.Tensor], *, lr: float, mu: float,
               nesterov: bool = True, dn_buffer: int = 1,
               arrivals: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return (new weights, new momentum); the inputs are left untouched."""
    new_weights = {n: t.clone() for n, t in weights.items()}
    new_momentum = {n: t.to(torch.float32).clone() for n, t in momentum.items()}
    step_(new_weights, new_momentum, mean_delta, lr=lr, mu=mu, nesterov=nesterov, dn_buffer=dn_buffer,
          arrivals=arrivals)
    return new_weights, new_momentum


def delayed_nesterov_step_(weights: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
                           mean_delta: dict[str, torch.Tensor], *, lr: float, mu: float, n: int,
                           arrivals: int = 1) -> None:
    """One Delayed Nesterov step in place (fp32) for a version that includes `arrivals` = k deltas, for
    parameter p with d their mean (Liu et al. 2024, Algorithm "Delayed Nesterov", with its momentum
    activation c = 0), counting deltas, not versions:

        buffer += k*d; count += k; a = min(k, n)/n
        if count >= n:  b = mu*b + buffer/count;  p -= lr*(a*d + mu*b);  buffer = 0; count = 0
        else:           p -= lr*a*d                     (b unchanged: a plain gradient step)

    With one delta a version (k = 1) over n versions p moves by lr*(mean d + mu*b): one Nesterov step
    on the mean of the n pseudo-gradients, as a sync round of n workers would take, but applied as
    they arrive. A grace window that batches n deltas (k = n) takes exactly that Nesterov step. n = 1
    is Nesterov (use `outer_step_` then: it is the bit-for-bit path). Float buffers become `theta - d`
    as in `outer_step_`; integer buffers keep the global value.
    """
    params = sorted(k for k in momentum if not k.startswith(DN))
    count = (int(momentum[DN_COUNT].item()) if DN_COUNT in momentum else 0) + arrivals
    full = count >= n
    share = min(arrivals, n) / n
    for name in params:
        d = mean_delta[name].reshape(weights[name].shape).to(torch.float32)
        buffered = momentum.get(DN_BUFFER + name)
        total = d * arrivals if buffered is None else buffered.to(torch.float32) + d * arrivals
        theta = weights[name].to(torch.float32)
        if full:
            b = momentum[name].to(torch.float32) * mu + total / count
            step = d * share + b * mu
            momentum[name] = b
            momentum[DN_BUFFER + name] = torch.zeros_like(total)
        else:
            step = d * share
            momentum[DN_BUFFER + name] = total
        weights[name] = (theta - step * lr).to(weights[name].dtype)
    momentum[DN_COUNT] = torch.tensor(0.0 if full else float(count))
    for name, t in list(weights.items()):
        if name not in momentum and t.is_floating_point():
            weights[name] = (t.to(torch.float32) - mean_delta[name].reshape(t.shape)).to(t.dtype)


def step_(weights: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor], mean_delta: dict[str, torch.Tensor],
          *, lr: float, mu: float, nesterov: bool, dn_buffer: int, arrivals: int = 1) -> None:
    """The run's outer step in place: Nesterov (`outer_step_`) or, with dn_buffer > 1, Delayed Nesterov
    for a version of `arrivals` deltas."""
    if dn_buffer > 1:
        delayed_nesterov_step_(weights, momentum, mean_delta, lr=lr, mu=mu, n=dn_buffer, arrivals=arrivals)
    else:
        outer_step_(weights, momentum, mean_delta, lr=lr, mu=mu, nesterov=nesterov)
