"""The outer step against hand computations of Nesterov / heavy-ball SGD on the pseudo-gradient."""

from __future__ import annotations

import pytest
import torch

from diloco.outer import outer_step

F64 = torch.float64


def _hand(theta, b, deltas, *, lr, mu, nesterov=True):
    """Reference in float64: b = mu*b + d; theta -= lr*(d + mu*b) (or lr*b without Nesterov)."""
    theta, b = theta.to(F64).clone(), b.to(F64).clone()
    for d in deltas:
        d = d.to(F64)
        b = mu * b + d
        theta = theta - lr * (d + mu * b if nesterov else b)
    return theta, b


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_three_nesterov_steps_with_exact_numbers():
    # Dyadic values: every intermediate is exact in float32, so the result must match exactly.
    theta = torch.tensor([1.0, -2.0, 0.5, 4.0])
    b = torch.zeros(4)
    deltas = [torch.tensor([0.5, -0.25, 1.0, 0.0]), torch.tensor([0.25, 0.5, -1.0, 2.0]),
              torch.tensor([-0.5, 0.125, 0.0, 1.0])]
    lr, mu = 0.5, 0.5
    w, m = {"p": theta}, {"p": b}
    for d in deltas:
        w, m = outer_step(w, m, {"p": d}, lr=lr, mu=mu)
    want_theta, want_b = _hand(theta, b, deltas, lr=lr, mu=mu)
    assert w["p"].tolist() == want_theta.tolist()
    assert m["p"].tolist() == want_b.tolist()
    # and written out by hand for the first element:
    # b1 = .5, t1 = 1 - .5*(.5 + .25) = .625; b2 = .5, t2 = .625 - .5*(.25 + .25) = .375;
    # b3 = -.25, t3 = .375 - .5*(-.5 - .125) = .6875
    assert w["p"][0].item() == 0.6875 and m["p"][0].item() == -0.25


@pytest.mark.parametrize(("lr", "mu"), [(0.7, 0.9), (1.0, 0.5), (0.1, 0.99)])
def test_three_nesterov_steps_carry_momentum(lr, mu):
    theta = {"a": _randn(5, 3, seed=1), "b": _randn(7, seed=2)}
    b0 = {"a": _randn(5, 3, seed=3) * 0.1, "b": torch.zeros(7)}
    deltas = [{"a": _randn(5, 3, seed=10 + i), "b": _randn(7, seed=20 + i)} for i in range(3)]
    w, m = theta, b0
    for d in deltas:
        w, m = outer_step(w, m, d, lr=lr, mu=mu)
    for n in theta:
        want_theta, want_b = _hand(theta[n], b0[n], [d[n] for d in deltas], lr=lr, mu=mu)
        assert w[n].dtype == torch.float32 and m[n].dtype == torch.float32
        assert w[n].shape == theta[n].shape and m[n].shape == theta[n].shape
        torch.testing.assert_close(w[n].to(F64), want_theta, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m[n].to(F64), want_b, rtol=1e-6, atol=1e-6)


def test_first_step_from_zero_momentum():
    theta, d = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    w, m = outer_step({"p": theta}, {"p": torch.zeros(2)}, {"p": d}, lr=0.5, mu=0.5)
    # b = d; theta - lr*(d + mu*d) = theta - 0.75*d
    assert m["p"].tolist() == [0.5, -1.0]
    assert w["p"].tolist() == [1.0 - 0.375, 2.0 + 0.75]


def test_heavy_ball_without_nesterov():
    theta = torch.tensor([1.0, -1.0, 2.0])
    b = torch.tensor([0.5, 0.25, -1.0])
    deltas = [torch.tensor([0.5, 1.0, 0.25]), torch.tensor([-1.0, 0.5, 0.5]), torch.tensor([0.25, 0.0, -2.0])]
    w, m = {"p": theta}, {"p": b}
    for d in deltas:
        w, m = outer_step(w, m, {"p": d}, lr=0.5, mu=0.5, nesterov=False)
    want_theta, want_b = _hand(theta, b, deltas, lr=0.5, mu=0.5, nesterov=False)
    assert w["p"].tolist() == want_theta.tolist()
    assert m["p"].tolist() == want_b.tolist()
    nest, _ = outer_step({"p": theta}, {"p": b}, {"p": deltas[0]}, lr=0.5, mu=0.5, nesterov=True)
    heavy, _ = outer_step({"p": theta}, {"p": b}, {"p": deltas[0]}, lr=0.5, mu=0.5, nesterov=False)
    assert not torch.equal(nest["p"], heavy["p"])


def test_lr_one_mu_zero_is_fedavg():
    theta = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    locals_ = [torch.tensor([[0.5, 2.5], [3.0, 3.0]]), torch.tensor([[1.5, 1.0], [2.0, 5.0]]),
               torch.tensor([[0.0, 2.5], [1.0, 4.0]]), torch.tensor([[2.0, 2.0], [4.0, 4.0]])]
    mean_delta = torch.stack([theta - loc for loc in locals_]).mean(0)
    w, m = outer_step({"p": theta}, {"p": _randn(2, 2, seed=5)}, {"p": mean_delta}, lr=1.0, mu=0.0)
    assert torch.equal(w["p"], torch.stack(locals_).mean(0))
    assert torch.equal(w["p"], theta - mean_delta)
    # with mu = 0 the stored momentum is b = 0*b + d = d, whatever it was
    assert torch.equal(m["p"], mean_delta)


def test_mu_zero_is_plain_sgd_for_any_lr():
    theta, d = _randn(6, seed=1), _randn(6, seed=2)
    w, _ = outer_step({"p": theta}, {"p": torch.zeros(6)}, {"p": d}, lr=0.3, mu=0.0, nesterov=True)
    torch.testing.assert_close(w["p"], theta - 0.3 * d, rtol=0, atol=1e-6)


def test_buffers():
    weights = {
        "p": torch.tensor([1.0, 2.0]),
        "bn.running_mean": torch.tensor([0.5, 1.5, -1.0]),
        "bn.running_var.half": torch.tensor([2.0, 4.0], dtype=torch.float16),
        "bn.num_batches_tracked": torch.tensor(17),
        "idx": torch.tensor([3, 4, 5], dtype=torch.int32),
    }
    delta = {
        "p": torch.tensor([0.5, 0.5]),
        "bn.running_mean": torch.tensor([0.25, -0.5, 1.0]),
        "bn.running_var.half": torch.tensor([1.0, -2.0]),
        "bn.num_batches_tracked": torch.tensor(999.0),  # must be ignored: integer buffers keep their value
    }
    w, m = outer_step(weights, {"p": torch.zeros(2)}, delta, lr=0.5, mu=0.5)
    assert set(w) == set(weights)
    assert set(m) == {"p"}  # momentum holds parameters only
    # float buffers become theta - d, whatever lr and mu are
    assert w["bn.running_mean"].tolist() == [0.25, 2.0, -2.0]
    assert w["bn.running_var.half"].dtype == torch.float16
    assert w["bn.running_var.half"].tolist() == [1.0, 6.0]
    # integer buffers are unchanged, dtype and all
    assert w["bn.num_batches_tracked"].dtype == torch.int64 and w["bn.num_batches_tracked"].item() == 17
    assert w["idx"].dtype == torch.int32 and w["idx"].tolist() == [3, 4, 5]
    # the parameter took the Nesterov step: b = d; theta - 0.5*(d + 0.5*d)
    assert w["p"].tolist() == [1.0 - 0.375, 2.0 - 0.375]


def test_integer_buffer_needs_no_delta():
    w, _ = outer_step({"p": torch.ones(2), "n": torch.tensor(3)}, {"p": torch.zeros(2)},
                      {"p": torch.ones(2)}, lr=1.0, mu=0.0)
    assert w["n"].item() == 3


def test_parameter_dtype_is_kept():
    theta = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    w, m = outer_step({"p": theta}, {"p": torch.zeros(2)}, {"p": torch.tensor([0.5, 1.0])}, lr=1.0, mu=0.0)
    assert w["p"].dtype == torch.bfloat16 and w["p"].tolist() == [0.5, 1.0]
    assert m["p"].dtype == torch.float32


def test_delta_may_be_flat():
    # The aggregator's mean delta is reshaped to the tensor's shape.
    theta = torch.ones(2, 3)
    w, _ = outer_step({"p": theta}, {"p": torch.zeros(2, 3)}, {"p": torch.arange(6.0)}, lr=1.0, mu=0.0)
    assert w["p"].shape == (2, 3)
    assert w["p"].reshape(-1).tolist() == [1.0, 0.0, -1.0, -2.0, -3.0, -4.0]


@pytest.mark.parametrize(("mu", "nesterov"), [(0.9, True), (0.9, False), (0.0, True)])
def test_inputs_are_not_mutated(mu, nesterov):
    weights = {"p": _randn(4, 3, seed=1), "buf": _randn(3, seed=2), "n": torch.tensor(5)}
    momentum = {"p": _randn(4, 3, seed=3)}
    delta = {"p": _randn(4, 3, seed=4), "buf": _randn(3, seed=5)}
    copies = [{k: v.clone() for k, v in d.items()} for d in (weights, momentum, delta)]
    w, m = outer_step(weights, momentum, delta, lr=0.7, mu=mu, nesterov=nesterov)
    for original, copy in zip((weights, momentum, delta), copies, strict=True):
        assert original.keys() == copy.keys()
        assert all(torch.equal(original[k], copy[k]) for k in copy)
    # and the outputs do not alias the inputs
    w["p"].add_(1.0)
    m["p"].add_(1.0)
    w["n"].add_(1)
    assert all(torch.equal(weights[k], copies[0][k]) for k in weights)
    assert all(torch.equal(momentum[k], copies[1][k]) for k in momentum)
    assert all(torch.equal(delta[k], copies[2][k]) for k in delta)


def test_zero_delta_with_zero_momentum_is_a_fixed_point():
    theta = _randn(8, seed=9)
    w, m = outer_step({"p": theta}, {"p": torch.zeros(8)}, {"p": torch.zeros(8)}, lr=0.7, mu=0.9)
    assert torch.equal(w["p"], theta) and torch.equal(m["p"], torch.zeros(8))


def test_a_delta_and_momentum_of_another_float_dtype_are_taken_in_fp32():
    """A float64 mean delta and momentum (as a reference computation holds them) step like fp32 ones,
    and the new momentum is fp32. Kills the mutants that drop `.to(torch.float32)` from the gradient
    (SGD refuses a grad of another dtype) or from the momentum buffer (the new momentum is float64)."""
    theta, b, d = _randn(5, seed=11), _randn(5, seed=12), _randn(5, seed=13)
    want_w, want_m = outer_step({"p": theta}, {"p": b}, {"p": d}, lr=0.7, mu=0.9)
    w, m = outer_step({"p": theta}, {"p": b.double()}, {"p": d.double()}, lr=0.7, mu=0.9)
    assert m["p"].dtype == torch.float32 and w["p"].dtype == torch.float32
    assert torch.equal(w["p"], want_w["p"]) and torch.equal(m["p"], want_m["p"])


def test_the_in_place_step_defaults_to_nesterov_and_steps_fp32_tensors_where_they_are():
    """Kills outer.x_outer_step___mutmut_1 (the in-place step's default made heavy-ball): every caller
    in the product passes `nesterov`, so only a direct call can tell."""
    from diloco.outer import outer_step_

    theta, b, d = _randn(6, seed=1), _randn(6, seed=2) * 0.1, _randn(6, seed=3)
    w, m = {"p": theta.clone()}, {"p": b.clone()}
    kept_w, kept_m = w["p"], m["p"]
    outer_step_(w, m, {"p": d}, lr=0.7, mu=0.9)
    want_theta, want_b = _hand(theta, b, [d], lr=0.7, mu=0.9, nesterov=True)
    torch.testing.assert_close(w["p"].to(F64), want_theta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["p"].to(F64), want_b, rtol=1e-6, atol=1e-6)
    assert w["p"] is kept_w and m["p"] is kept_m, "fp32 weights and momentum are stepped in place"


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(3,), (70_001,), (300, 700), (5, 0)])
def test_the_in_place_step_gives_the_bits_of_torch_sgd(nesterov, shape):
    """diloco.outer.sgd_step_ runs SGD's operations a chunk at a time; committed runs were stepped by
    torch.optim.SGD itself, and a replay of them must give the same bits."""
    from diloco.outer import outer_step_

    theta, b, d = _randn(*shape, seed=4), _randn(*shape, seed=5), _randn(*shape, seed=6)
    p = torch.nn.Parameter(theta.clone())
    p.grad = d.clone()
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=nesterov)
    opt.state[p]["momentum_buffer"] = b.clone()
    with torch.no_grad():
        opt.step()
    w, m = {"p": theta.clone()}, {"p": b.clone()}
    outer_step_(w, m, {"p": d}, lr=0.7, mu=0.9, nesterov=nesterov)
    assert torch.equal(w["p"], p.detach()) and torch.equal(m["p"], opt.state[p]["momentum_buffer"])


def test_a_non_contiguous_parameter_is_stepped_where_it_is():
    from diloco.outer import outer_step_

    theta, b, d = _randn(40, 30, seed=7), _randn(40, 30, seed=8), _randn(30, 40, seed=9)
    w, m = {"p": theta.clone().t()}, {"p": b.clone().t()}
    kept = w["p"]
    want_w, want_m = outer_step({"p": theta.t()}, {"p": b.t()}, {"p": d}, lr=0.7, mu=0.9)
    outer_step_(w, m, {"p": d}, lr=0.7, mu=0.9)
    assert w["p"] is kept and torch.equal(kept, want_w["p"]) and torch.equal(m["p"], want_m["p"])
