"""LOpt-A / LAgg-A aggregators: widths, sign convention, K-identical-workers identity,
residual variant, save/load, registry and a local-SGD Simulation run."""

from __future__ import annotations

import pytest
import torch

from metagg.aggregators import optimizers as opt
from metagg.aggregators.base import RoundContext
from metagg.aggregators.registry import build_aggregator
from metagg.checkpoint import CheckpointError
from metagg.config import config_from_dict
from metagg.layout import ParamLayout
from metagg.learned.lagg import LAggA, LAggConfig, LOptA, load_lagg, save_lagg
from metagg.simulation import Simulation

SHAPES = {"conv": (4, 3, 2, 2), "w": (6, 5), "b": (6,)}
LAYOUT = ParamLayout.from_shapes(SHAPES)
D = LAYOUT.size


def ctx(t: int, params: torch.Tensor, k: int, ids: torch.Tensor | None = None) -> RoundContext:
    return RoundContext(round=t, params=params, layout=LAYOUT, num_workers=k,
                        worker_ids=torch.arange(k) if ids is None else ids, mode="local_sgd")


def run(agg, updates_per_round: list[torch.Tensor], k: int, ids=None) -> list[torch.Tensor]:
    state, steps = agg.init(LAYOUT, k), []
    params = torch.linspace(-1, 1, D)
    for t, u in enumerate(updates_per_round):
        step, state = agg.step(state, u, ctx(t, params, k, ids))
        steps.append(step)
        params = params - step
    return steps


def updates(rounds: int, k: int, seed: int = 0, identical: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rounds):
        u = torch.randn(1 if identical else k, D, generator=gen) * 0.1
        out.append(u.expand(k, D).clone() if identical else u)
    return out


def test_input_widths():
    assert LAggA(8).config.input_size == 46 and len(LAggA(8).config.feature_names()) == 46
    assert LOptA().config.input_size == 39 and LOptA().net.w1.shape == (39, 32)
    assert LAggA(8).net.w1.shape == (46, 32)


def test_reference_initialisation():
    net = LAggA(8, seed=3).net
    for name, fan_in in (("w1", 46), ("w2", 32), ("w3", 32)):
        w = getattr(net, name).detach()
        assert float(w.abs().max()) <= 2 / fan_in ** 0.5 + 1e-7  # truncated at ±2σ
        assert 0.5 < float(w.std()) * fan_in ** 0.5 < 1.0  # σ = 1/√fan_in, truncation shrinks
    assert all(float(getattr(net, f"b{i}").detach().abs().sum()) == 0 for i in (1, 2, 3))
    assert float(net.decay_offsets.detach().abs().sum()) == 0


def _route_gbar_to_d(net, first: int) -> None:
    """Set φ so that d = sum of the `first` normalised leading channels, g = 0."""
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.w1[:first, 0] = 1.0
        net.w1[:first, 1] = -1.0
        net.w2[0, 0] = net.w2[1, 1] = 1.0
        net.w3[0, 0], net.w3[1, 0] = 1.0, -1.0  # d = relu(x) − relu(−x) = x


@pytest.mark.parametrize("kind", ["lopt", "lagg"])
def test_sign_descent_direction_moves_theta_like_fedavg(kind):
    """Workers on f(θ) = ½‖θ − θ*‖² send u_k = θ − θ_k (a descent direction): with
    d = +normalised ḡ the server's θ − step must move every coordinate like FedAvg."""
    k = 4
    agg = LOptA() if kind == "lopt" else LAggA(k)
    _route_gbar_to_d(agg.net, 1 if kind == "lopt" else k)
    gen = torch.Generator().manual_seed(0)
    theta, target = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    u = 0.5 * (theta - target) + 0.01 * torch.randn(k, D, generator=gen)
    state = agg.init(LAYOUT, k)
    step, _ = agg.step(state, u, ctx(0, theta, k))
    fedavg = u.mean(0)
    assert torch.equal(torch.sign(step), torch.sign(fedavg))
    assert float(torch.nn.functional.cosine_similarity(step, fedavg, dim=0)) > 0.5

    def loss(x):
        return 0.5 * float((x - target).square().sum())

    assert loss(theta - step) < loss(theta)


def test_sign_positive_d_gives_positive_step():
    """Output bias d = +1 (everything else 0): step = +0.001 everywhere, so θ decreases,
    as FedAvg does for a positive update."""
    agg = LOptA()
    with torch.no_grad():
        for p in agg.net.parameters():
            p.zero_()
        agg.net.b3[0] = 1.0
    step, _ = agg.step(agg.init(LAYOUT, 2), torch.ones(2, D), ctx(0, torch.zeros(D), 2))
    torch.testing.assert_close(step, torch.full((D,), 1e-3))


def test_reference_init_step_is_small_and_finite():
    """The spec's prototype: reference-initialised steps are ~0.001·O(1), whatever ḡ's size."""
    steps = run(LOptA(seed=1), updates(3, 4), 4)
    assert all(bool(torch.isfinite(s).all()) for s in steps)
    assert 1e-5 < float(steps[-1].abs().mean()) < 1e-2


def test_lagg_with_identical_workers_is_lopt_with_spread_weights():
    """K identical workers: every worker channel is normalised ḡ, so LAgg-A with W₁ rows
    w/K on the K worker channels computes exactly LOpt-A with row w on its ḡ channel."""
    k = 5
    lopt, lagg = LOptA(seed=2), LAggA(k, seed=7)
    with torch.no_grad():
        for name, p in lagg.net.named_parameters():
            src = getattr(lopt.net, name)
            if name == "w1":
                p[:k] = src[0] / k
                p[k:] = src[1:]
            else:
                p.copy_(src)
    us = updates(4, k, identical=True)
    for a, b in zip(run(lopt, us, k), run(lagg, us, k), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_lagg_worker_k_feeds_channel_k_and_missing_channels_are_zero():
    k = 4
    agg = LAggA(k, seed=0)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(2, D, generator=gen)
    a = run(agg, [rows], k, ids=torch.tensor([0, 2]))[0]
    b = run(agg, [rows.flip(0)], k, ids=torch.tensor([2, 0]))[0]  # same workers, other order
    c = run(agg, [rows], k, ids=torch.tensor([1, 3]))[0]  # other workers
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    full = torch.zeros(k, D)
    full[0], full[2] = rows[0], rows[1]
    agg_x = LAggA(k, seed=0)
    # with all four present the zero rows change ḡ (mean over 4, not 2): outputs differ
    assert not torch.allclose(run(agg_x, [full], k)[0], a)


def test_lagg_checks_worker_count():
    agg = LAggA(4)
    with pytest.raises(ValueError, match="4 workers"):
        agg.init(LAYOUT, 3)


def test_residual_mean_starts_at_fedavg():
    agg = LOptA(step_mode="residual")
    us = updates(3, 4, seed=3)
    for u, step in zip(us, run(agg, us, 4), strict=True):
        torch.testing.assert_close(step, u.mean(0))


def test_residual_momentum_starts_at_slowmo():
    """base m_0.9/(1 − 0.9) = Σ 0.9^i ḡ; α = 0.3 equals metagg's slowmo(0.3, 0.9)."""
    agg = LAggA(4, step_mode="residual", residual_base="momentum", residual_scale=0.3)
    slow = opt.slowmo(0.3, 0.9)
    state = slow.init(D)
    us = updates(4, 4, seed=4)
    for u, step in zip(us, run(agg, us, 4), strict=True):
        want, state = slow.update(state, u.mean(0), ctx(0, torch.zeros(D), 4))
        torch.testing.assert_close(step, want, rtol=1e-5, atol=1e-7)


def test_residual_correction_scales_with_gbar_rms():
    agg = LOptA(step_mode="residual", correction_scale=0.5)
    with torch.no_grad():
        agg.net.b3[0] = 1.0  # d = 1 → correction = 0.5·rms_T(ḡ)
    u = updates(1, 2, seed=5)[0]
    step = run(agg, [u], 2)[0]
    g = u.mean(0)
    for spec in LAYOUT:
        gt = g[spec.slice]
        torch.testing.assert_close(step[spec.slice], gt + 0.5 * gt.square().mean().sqrt())


@pytest.mark.parametrize("make", [lambda: LOptA(seed=4),
                                  lambda: LAggA(3, seed=5, step_mode="residual")])
def test_save_load_round_trip(tmp_path, make):
    agg = make()
    with torch.no_grad():
        agg.net.decay_offsets.fill_(0.01)
    stem = save_lagg(tmp_path / "x", agg, trained_on={"task": "test"})
    again = load_lagg(tmp_path / "x")
    assert type(again) is type(agg) and again.config == agg.config
    us = updates(3, 3, seed=6)
    for a, b in zip(run(agg, us, 3), run(again, us, 3), strict=True):
        assert torch.equal(a, b)
    kind = agg.config.kind
    assert build_aggregator(f"{kind}:{tmp_path / 'x'}").config == agg.config
    other = "lagg" if kind == "lopt" else "lopt"
    with pytest.raises(ValueError, match=f"use '{kind}:"):
        build_aggregator(f"{other}:{tmp_path / 'x'}")
    stem.with_suffix(".safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_lagg(tmp_path / "x")


def test_load_rejects_other_formats(tmp_path):
    with pytest.raises(CheckpointError, match="no "):
        load_lagg(tmp_path / "missing")
    from metagg.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "rnn" / "aggregator", {"x": torch.zeros(1)},
                    {"format": "metagg.rnn_aggregator", "format_version": 1})
    with pytest.raises(CheckpointError, match="not a LOpt-A/LAgg-A file"):
        load_lagg(tmp_path / "rnn")


def test_registry_needs_path_or_init():
    with pytest.raises(ValueError, match="meta-trained weights"):
        build_aggregator("lopt")
    with pytest.raises(ValueError, match="meta-trained weights"):
        build_aggregator("lagg")
    assert isinstance(build_aggregator("lopt", options={"init": True}), LOptA)
    lagg = build_aggregator("lagg", options={"init": True, "init_seed": 1})
    lagg.init(LAYOUT, 6)  # K taken from the run
    assert lagg.config.num_workers == 6 and lagg.net.w1.shape[0] == 44
    with pytest.raises(ValueError, match="step_mode"):
        build_aggregator("lopt", options={"init": True, "step_mode": "bogus"})
    with pytest.raises(ValueError, match="num_workers"):
        LAggConfig(kind="lopt", num_workers=3)


@pytest.mark.parametrize("name", ["lopt", "lagg"])
def test_runs_through_simulation_local_sgd(digits, name):
    cfg = config_from_dict({
        "rounds": 3, "eval_every": 3, "model": "mlp:16:relu",
        "workers": {"num_workers": 4, "mode": "local_sgd", "local_steps": 2, "local_lr": 0.5,
                    "batch_size": 32},
        "aggregator": {"name": name, "options": {"init": True}},
    })
    sim = Simulation(cfg, dataset=digits)
    before = sim.params.clone()
    for _ in range(3):
        sim.step()
    assert sim.round == 3 and sim.skipped_rounds == 0
    assert int(sim.agg_state.t) == 3
    moved = (sim.params - before).abs()
    assert bool(torch.isfinite(sim.params).all()) and 0 < float(moved.max()) < 0.1
