import math
from types import SimpleNamespace

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


def prodigy_reference(grads_at, iterates, coef=0.5):
    """Prodigy (Mishchenko & Defazio 2024, Adam version, no bias correction, lr 1) written
    out in float64: the steps it takes at the given iterates (x_0 first). The package's
    own float32 iterates are passed in, so that float32 rounding cannot send the two
    trajectories apart over many steps (it did, past rtol 2e-4, on one CPU)."""
    b1, b2, d0, eps = 0.9, 0.999, 1e-6, 1e-8
    b3 = b2 ** 0.5
    x0 = iterates[0].double()
    d, r = d0, 0.0
    m, v, s = (torch.zeros_like(x0) for _ in range(3))
    steps = []
    for point in iterates:
        x = point.double()
        g = grads_at(point).double()
        r = b3 * r + (d / d0) * d * float(g @ (x0 - x))
        m = b1 * m + (1 - b1) * d * g
        v = b2 * v + (1 - b2) * d * d * g * g
        s = b3 * s + (d / d0) * d * g
        step = d * m / (v.sqrt() + d * eps)
        d = max(d, coef * r / float(s.abs().sum()))
        steps.append(step)
    return steps


def test_prodigy_matches_its_written_out_definition_and_needs_no_lr():
    gen = torch.Generator().manual_seed(0)
    target, h = torch.randn(30, generator=gen), torch.rand(30, generator=gen) + 0.1

    def grads_at(x):  # a noisy quadratic
        return h * (x - target) + 0.01 * torch.sin(7 * x)

    o = opt.prodigy()
    state, x, got, iterates = o.init(30), torch.zeros(30), [], []
    for _ in range(80):
        iterates.append(x)
        step, state = o.update(state, grads_at(x), SimpleNamespace(params=x))
        x = x - step
        got.append(step)
    want = prodigy_reference(grads_at, iterates)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=1e-6)  # float32 vs 64
    assert float(state.d) > 1e-2  # D grew from 1e-6 by itself
    assert float(((x - target) * h).norm()) < 0.05 * float((target * h).norm())  # converges
    assert opt.build_optimizer("prodigy", 1.0)  # by name, as a config's optimizer
    with pytest.raises(ValueError, match="params"):
        o.update(o.init(3), torch.ones(3), None)


def test_prodigy_update_runs_under_vmap_as_in_a_loop():
    """Meta-training vmaps server steps over particles: no Python branch on a tensor."""
    from torch.func import vmap

    from metagg.aggregators.prodigy import init_prodigy, prodigy_update

    grads, params = torch.randn(3, 2, 5), torch.randn(2, 5)
    states = [init_prodigy(5) for _ in range(2)]
    looped, batched = [], vmap(lambda st, g, x: prodigy_update(st, g, x, 0.5))
    stacked = type(states[0])(*(torch.stack(t) for t in zip(*states, strict=True)))
    for g in grads:
        outs = [prodigy_update(st, g[i], params[i], 0.5) for i, st in enumerate(states)]
        states = [o[2] for o in outs]
        looped.append(torch.stack([o[0] for o in outs]))
        u, _, stacked = batched(stacked, g, params)
        torch.testing.assert_close(u, looped[-1])
    torch.testing.assert_close(stacked.d, torch.stack([st.d for st in states]))
