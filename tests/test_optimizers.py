import math

import pytest
import torch

from metagg.aggregators import optimizers as opt


def run(o, directions, ctx=None):
    state = o.init(directions[0].numel())
    steps = []
    for g in directions:
        s, state = o.update(state, g, ctx)
        steps.append(s)
    return steps


def test_sgd():
    (s,) = run(opt.sgd(0.5), [torch.tensor([2.0, -4.0])])
    assert torch.equal(s, torch.tensor([1.0, -2.0]))


def assert_matches_torch(ours, make_torch_opt, d=6, steps=5):
    """Our steps equal the parameter changes torch.optim makes for the same gradients."""
    g = [torch.randn(d) for _ in range(steps)]
    p = torch.zeros(d, requires_grad=True)
    ref = make_torch_opt([p])
    for gi, si in zip(g, run(ours, g), strict=True):
        before = p.detach().clone()
        p.grad = gi.clone()
        ref.step()
        torch.testing.assert_close(before - p.detach(), si)


def test_momentum_matches_torch():
    assert_matches_torch(opt.momentum(0.1, 0.9),
                         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert_matches_torch(opt.momentum(0.1, 0.9, nesterov=True),
                         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True))


def test_adam_matches_torch():
    assert_matches_torch(opt.adam(0.01, 0.9, 0.99, 1e-8),
                         lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.9, 0.99), eps=1e-8))


def test_slowmo_reduces_to_fedavg_and_accumulates():
    class Ctx:
        local_lr = 0.5

    g = [torch.randn(3) for _ in range(3)]
    for gi, si in zip(g, run(opt.slowmo(1.0, 0.0), g, Ctx()), strict=True):
        torch.testing.assert_close(si, gi)
    # Wang et al. 2020: u_t = β u_{t-1} + g_t / γ, step = α γ u_t
    steps = run(opt.slowmo(0.3, 0.9), g, Ctx())
    u = torch.zeros(3)
    for gi, si in zip(g, steps, strict=True):
        u = 0.9 * u + gi / 0.5
        torch.testing.assert_close(si, 0.3 * 0.5 * u)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_bad_lr(bad):
    with pytest.raises(ValueError, match="learning rate"):
        opt.sgd(bad)


def test_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        opt.adam(0.1, beta1=1.0)
