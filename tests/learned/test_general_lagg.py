"""The general step mode of LAgg-A / LOpt-A: normalised correction, learned schedule,
any number of workers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.func import vmap
from torch.utils._pytree import tree_map

from metagg.aggregators.base import RoundContext
from metagg.config import config_from_dict
from metagg.layout import ParamLayout
from metagg.learned.features import FeaturePlan, init_ada_state
from metagg.learned.lagg import FlatPhi, LAggA, LAggConfig, LOptA, ada_step, load_lagg, save_lagg
from metagg.learned.lagg.model import schedule_features, worker_statistics
from metagg.simulation import Simulation

SHAPES = {"w": (6, 5), "b": (6,), "v": (7, 3)}
LAYOUT = ParamLayout.from_shapes(SHAPES)
PLAN = FeaturePlan.from_layout(LAYOUT)
D = LAYOUT.size


def general(kind: str, **options) -> LAggConfig:
    return LAggConfig(kind=kind, step_mode="general", residual_base="momentum",
                      residual_scale=0.6, correction_scale=0.1, **options)


def agg_of(kind: str, seed: int = 0, **options):
    config = general(kind, **options)
    return (LOptA if kind == "lopt" else LAggA)(config=config, seed=seed)


def rounds(agg, per_round, k):
    state, steps = agg.init(LAYOUT, k), []
    params = torch.linspace(-1, 1, D)
    for t, u in enumerate(per_round):
        ctx = RoundContext(round=t, params=params, layout=LAYOUT, num_workers=k,
                           worker_ids=torch.arange(len(u)), mode="local_sgd")
        step, state = agg.step(state, u, ctx)
        steps.append(step)
        params = params - step
    return steps


def draws(n_rounds, k, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, D, generator=g) * scale for _ in range(n_rounds)]


def per_tensor_rms(x):
    return torch.stack([x[s.slice].square().mean().sqrt() for s in LAYOUT])


def large_output(agg, scale=100.0):
    """An output layer whose direction output has RMS far above 1 (the normalised regime)."""
    with torch.no_grad():
        agg.net.w3.copy_(torch.randn(agg.net.w3.shape,
                                     generator=torch.Generator().manual_seed(7)) * scale)
    return agg


@pytest.mark.parametrize("kind", ["lopt", "lagg"])
def test_step_ignores_the_mlp_output_scale(kind):
    """The correction is RMS-normalised per tensor: once the MLP's output is large,
    scaling its direction output d (w3's and b3's first column) changes nothing."""
    a, b = large_output(agg_of(kind)), large_output(agg_of(kind))
    with torch.no_grad():
        b.net.w3[:, 0].mul_(10.0)
        b.net.b3[0].mul_(10.0)
    for sa, sb in zip(rounds(a, draws(4, 5), 5), rounds(b, draws(4, 5), 5), strict=True):
        torch.testing.assert_close(sa, sb, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["lopt", "lagg"])
def test_correction_has_size_gamma_times_rms_of_the_mean_update(kind):
    agg = large_output(agg_of(kind))
    with torch.no_grad():
        agg.net.log_scale.fill_(-60.0)  # no base step: only the correction
    u = draws(1, 4)[0]
    step = rounds(agg, [u], 4)[0]
    torch.testing.assert_close(per_tensor_rms(step), 0.1 * per_tensor_rms(u.mean(0)),
                               rtol=1e-4, atol=0)


def test_untrained_general_step_is_exactly_slowmo():
    """The output layer starts at zero and the schedule at zero: the step is α·m/(1 − β)."""
    agg = agg_of("lagg")
    assert not agg.net.w3.any()
    per_round = draws(3, 4)
    momentum = torch.zeros(D)
    for u, step in zip(per_round, rounds(agg, per_round, 4), strict=True):
        momentum = 0.9 * momentum + 0.1 * u.mean(0)
        torch.testing.assert_close(step, 0.6 * momentum / 0.1, rtol=1e-5, atol=1e-7)


def test_general_lagg_takes_any_number_of_workers_in_any_order():
    agg = agg_of("lagg")
    assert agg.config.input_size == 41 and agg.config.num_workers == 0
    assert agg.config.feature_names()[:3] == ("g", "spread", "agreement")
    for k in (2, 5, 16):
        assert all(torch.isfinite(s).all() for s in rounds(agg, draws(2, k), k))
    per_round = draws(3, 6)
    shuffled = [u[torch.randperm(6, generator=torch.Generator().manual_seed(i))]
                for i, u in enumerate(per_round)]
    for a, b in zip(rounds(agg, per_round, 6), rounds(agg, shuffled, 6), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_worker_statistics_and_schedule_features():
    same = torch.randn(1, D).expand(4, D)
    stats = worker_statistics(same, same.mean(0))
    torch.testing.assert_close(stats[1], torch.zeros(D), atol=1e-6, rtol=0)  # no spread
    torch.testing.assert_close(stats[2], same[0].sign())  # full agreement
    f = schedule_features(same.mean(0), same.mean(0), same, torch.tensor(999), lopt=False)
    torch.testing.assert_close(f, torch.tensor([1.0, 1.0, 1.0]))
    noise = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    f = schedule_features(noise.mean(0), -noise.mean(0), noise, torch.tensor(0), lopt=False)
    assert f[0] == pytest.approx(-1.0) and 0 < f[1] < 0.1 and f[2] == 0
    f = schedule_features(noise.mean(0), torch.zeros(D), noise, torch.tensor(0), lopt=True)
    assert f[0] == 0 and f[1] == 0


def test_small_outputs_give_a_proportional_correction():
    """Below RMS 1 the correction is linear in the MLP's output (smooth around zero)."""
    small = [large_output(agg_of("lopt"), scale=1e-4), large_output(agg_of("lopt"), scale=2e-4)]
    corrections = []
    for agg in small:
        with torch.no_grad():
            agg.net.log_scale.fill_(-60.0)
        corrections.append(rounds(agg, draws(1, 3), 3)[0])
    assert 0 < float(corrections[0].abs().max())
    torch.testing.assert_close(corrections[1], 2 * corrections[0], rtol=1e-3, atol=1e-12)


def test_the_schedule_moves_the_step_size():
    """A positive weight on the progress feature grows γ over rounds: a learned schedule."""
    agg = large_output(agg_of("lopt"))
    with torch.no_grad():
        agg.net.log_scale.fill_(-60.0)
        agg.net.schedule[1, 2] = 1.0  # log γ += log(1 + t) / log(1000)
    u = draws(1, 3)[0]
    steps = rounds(agg, [u] * 3, 3)
    ratio = [float(per_tensor_rms(s)[0] / (0.1 * per_tensor_rms(u.mean(0))[0])) for s in steps]
    assert ratio == pytest.approx([1.0, math.exp(math.log(2) / math.log(1000)),
                                   math.exp(math.log(3) / math.log(1000))], rel=1e-4)


def test_vmapped_step_equals_one_particle_at_a_time():
    """PES vmaps the step over particles: the general mode's must agree."""
    config = general("lagg")
    fp = FlatPhi(config)
    phis = torch.stack([fp.init(s) for s in range(3)])
    u = torch.stack([draws(1, 4, seed=s)[0] for s in range(3)])
    theta = torch.randn(3, D)
    state = init_ada_state(PLAN)
    acc = type(state)(*(x.expand(3, *x.shape).clone() for x in state))

    def one(phi, acc, theta, upd):
        return ada_step(fp.unflatten(phi), acc, upd, theta, config=config, plan=PLAN)[0]

    batched = vmap(one)(phis, acc, theta, u)
    for i in range(3):
        torch.testing.assert_close(batched[i], one(phis[i], state, theta[i], u[i]),
                                   rtol=1e-5, atol=1e-7)


def test_general_config_rules():
    with pytest.raises(ValueError, match="num_workers"):
        LAggConfig(kind="lagg", step_mode="general", num_workers=8)


def test_saved_general_lagg_runs_with_another_k(tmp_path, digits):
    agg = agg_of("lagg", seed=2)
    save_lagg(tmp_path / "g", agg, trained_on={"k": "any"})
    loaded = load_lagg(tmp_path / "g")
    assert loaded.config == agg.config
    for a, b in zip(rounds(agg, draws(2, 3), 3), rounds(loaded, draws(2, 3), 3), strict=True):
        assert torch.equal(a, b)
    cfg = config_from_dict({"model": "mlp:16:relu", "rounds": 3, "eval_every": 3,
                            "workers": {"num_workers": 5, "mode": "local_sgd",
                                        "local_steps": 2, "local_lr": 0.3},
                            "aggregator": {"name": f"lagg:{tmp_path / 'g'}"}})
    summary = Simulation(cfg, dataset=digits).run()
    assert math.isfinite(summary["final_train_loss"])


# --------------------------------------------------------------------------- the local lr


def lr_rounds(agg, per_round, k):
    """(steps, the lr the aggregator asks for before each round)."""
    state, steps, lrs = agg.init(LAYOUT, k), [], []
    params = torch.linspace(-1, 1, D)
    for t, u in enumerate(per_round):
        ctx = RoundContext(round=t, params=params, layout=LAYOUT, num_workers=k,
                           worker_ids=torch.arange(len(u)), mode="local_sgd", local_lr=0.9)
        lrs.append(agg.requested_local_lr(state, ctx))
        step, state = agg.step(state, u, ctx)
        steps.append(step)
        params = params - step
    return steps, lrs


def test_fixed_controller_keeps_the_local_lr_and_the_steps():
    """Gain and coupling 0: the lr stays where it started and the steps are the
    fixed-lr aggregator's with the same φ."""
    fixed, chosen = agg_of("lagg", seed=3), agg_of("lagg", seed=3, local_lr=0.4)
    u = draws(4, 3)
    want, none = lr_rounds(fixed, u, 3)
    got, lrs = lr_rounds(chosen, u, 3)
    assert none == [None] * 4
    assert lrs == pytest.approx([0.4] * 4)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_controller_raises_the_lr_while_updates_agree_and_stops_at_the_cap():
    """The same update every round: cos(ḡ, m) is 0 in round 0 (m = 0), then 1, so
    log η grows by the gain each round until it reaches log 3."""
    agg = agg_of("lopt", local_lr=0.5, local_lr_gain=0.4)
    u = draws(1, 3)[0]
    _, lrs = lr_rounds(agg, [u] * 8, 3)
    want = [0.5, 0.5] + [min(0.5 * math.exp(0.4 * i), 3.0) for i in range(1, 7)]
    assert lrs == pytest.approx(want, rel=1e-5)
    _, lrs = lr_rounds(agg_of("lopt", local_lr=0.5, local_lr_gain=-0.4), [u] * 3, 3)
    assert lrs[2] == pytest.approx(0.5 * math.exp(-0.4), rel=1e-5)  # a negative gain lowers it


def test_a_relative_range_keeps_the_lr_within_a_factor_of_its_start():
    u = draws(1, 3)[0]
    _, up = lr_rounds(agg_of("lopt", local_lr=0.5, local_lr_gain=0.4, local_lr_range=2.0),
                      [u] * 8, 3)
    assert max(up) == pytest.approx(1.0) and up[-1] == pytest.approx(1.0)
    _, down = lr_rounds(agg_of("lopt", local_lr=0.5, local_lr_gain=-0.4,
                               local_lr_range=2.0), [u] * 8, 3)
    assert min(down) == pytest.approx(0.25) and down[-1] == pytest.approx(0.25)
    # the absolute range still holds inside a wide relative one
    _, capped = lr_rounds(agg_of("lopt", local_lr=2.0, local_lr_gain=0.4, local_lr_range=10.0),
                          [u] * 8, 3)
    assert max(capped) == pytest.approx(3.0)


def test_coupling_scales_the_server_step_with_the_lr_it_moved():
    u = draws(1, 3)[0]
    plain = agg_of("lopt", local_lr=0.5, local_lr_gain=0.4)
    coupled = agg_of("lopt", local_lr=0.5, local_lr_gain=0.4)
    with torch.no_grad():
        coupled.net.lr_coupling.fill_(1.0)
    a, lrs = lr_rounds(plain, [u] * 3, 3)
    b, _ = lr_rounds(coupled, [u] * 3, 3)
    torch.testing.assert_close(b[2], a[2] * lrs[2] / 0.5)  # α · η_t / η_0 (correction 0)


def test_local_lr_config_rules(tmp_path):
    with pytest.raises(ValueError, match="local_lr: only the general"):
        LAggConfig(kind="lopt", step_mode="residual", local_lr=0.5)
    with pytest.raises(ValueError, match=r"local_lr: must be in \[0.01, 3.0\]"):
        general("lopt", local_lr=5.0)
    with pytest.raises(ValueError, match="local_lr_range: must be 0"):
        general("lopt", local_lr=0.5, local_lr_range=0.5)
    with pytest.raises(ValueError, match="local_lr_range: needs local_lr > 0"):
        general("lopt", local_lr_range=4.0)
    agg = agg_of("lagg", local_lr=0.3, local_lr_gain=0.2)
    save_lagg(tmp_path / "g", agg, trained_on={})
    loaded = load_lagg(tmp_path / "g")
    assert loaded.config == agg.config
    assert torch.equal(loaded.net.lr_control, agg.net.lr_control)


def test_simulator_trains_the_workers_with_the_chosen_lr(digits):
    """The simulator's workers use the lr the aggregator asks for, round by round."""
    cfg = config_from_dict({"model": "mlp:8:relu", "rounds": 3, "eval_every": 1,
                            "workers": {"num_workers": 3, "mode": "local_sgd",
                                        "local_steps": 2, "local_lr": 0.3},
                            "aggregator": {"name": "mean"}})
    sim = Simulation(cfg, dataset=digits)
    agg = agg_of("lagg", local_lr=0.05, local_lr_gain=0.5)
    sim.server.aggregator = agg
    sim.reset()
    for t in range(3):
        lr = sim.server.round_local_lr()
        assert lr == agg.requested_local_lr(sim.agg_state, sim.context(torch.arange(3)))
        want = sim.cluster.compute(sim.params, t, lr=lr).updates
        state = sim.agg_state
        step, _ = agg.step(state, want, sim.context(torch.arange(3)))
        before = sim.params
        sim.step()
        torch.testing.assert_close(sim.params, before - step)
    assert sim.server.round_local_lr() != 0.05  # it moved


def test_untrained_general_step_on_a_prodigy_base_is_server_prodigy():
    """residual_base "prodigy": with the zero output layer and α = 1 the step is the
    server optimizer `prodigy` on the mean update (FedAvg + Prodigy); its state is
    carried (the second round differs from a fresh start)."""
    from metagg.aggregators.optimizers import prodigy

    agg = LAggA(config=LAggConfig(kind="lagg", step_mode="general",
                                  residual_base="prodigy"))
    per_round = draws(4, 3)
    opt, params = prodigy(), torch.linspace(-1, 1, D)
    state = opt.init(D)
    for u, step in zip(per_round, rounds(agg, per_round, 3), strict=True):
        want, state = opt.update(state, u.mean(0), SimpleNamespace(params=params))
        torch.testing.assert_close(step, want, rtol=1e-5, atol=1e-9)
        params = params - want
    with pytest.raises(ValueError, match="residual_base"):
        LAggConfig(kind="lagg", step_mode="residual", residual_base="prodigy")
    with pytest.raises(ValueError, match="residual_base"):
        LAggConfig(kind="lagg", step_mode="general", residual_base="prodigy", local_lr=0.5)


def test_prodigy_base_steps_vmapped_over_particles_equal_one_at_a_time():
    from metagg.learned.lagg.model import init_step_state

    config = LAggConfig(kind="lagg", step_mode="general", residual_base="prodigy")
    fp = FlatPhi(config)
    # trained-looking particles: a non-zero output layer, each with its own other weights
    phis = torch.stack([fp.of(large_output(LAggA(config=config, seed=s), 1.0).net)
                        for s in range(3)])
    state = init_step_state(PLAN, config)
    states = tree_map(lambda x: x.expand(3, *x.shape).clone(), state)
    u = torch.stack([draws(1, 4, seed=s)[0] for s in range(3)])
    theta = torch.randn(3, D)

    def one(phi, st, th, upd):
        return ada_step(fp.unflatten(phi), st, upd, th, config=config, plan=PLAN)

    steps, new = vmap(one)(phis, states, theta, u)
    for i in range(3):
        want, want_state = one(phis[i], state, theta[i], u[i])
        torch.testing.assert_close(steps[i], want, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(new.base.d[i], want_state.base.d)


def test_correction_cap_limits_the_correction_to_a_multiple_of_the_base_step():
    """correction_cap c: per tensor, RMS(correction) <= c · RMS(base step); 0 is no cap."""
    u = draws(1, 4)[0]
    base = 0.6 * u.mean(0)  # the momentum base's first step, α m / (1 − β)
    free = rounds(large_output(agg_of("lagg")), [u], 4)[0]
    assert torch.equal(free, rounds(large_output(agg_of("lagg", correction_cap=0.0)), [u], 4)[0])
    # uncapped, the correction is γ · RMS(ḡ) = 0.1 · RMS(ḡ) per tensor, below 0.5 · 0.6
    loose = rounds(large_output(agg_of("lagg", correction_cap=0.5)), [u], 4)[0]
    torch.testing.assert_close(loose, free)
    tight = rounds(large_output(agg_of("lagg", correction_cap=0.1)), [u], 4)[0]
    torch.testing.assert_close(per_tensor_rms(tight - base), 0.1 * per_tensor_rms(base),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close((tight - base) / per_tensor_rms(tight - base).repeat_interleave(
        torch.tensor([s.slice.stop - s.slice.start for s in LAYOUT])),
        (free - base) / per_tensor_rms(free - base).repeat_interleave(
        torch.tensor([s.slice.stop - s.slice.start for s in LAYOUT])), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="correction_cap"):
        LAggConfig(kind="lagg", step_mode="residual", correction_cap=1.0)


def test_capped_correction_fades_when_the_updates_vanish():
    """On a Prodigy base the normalised correction's size is γ·D, whatever the updates:
    once they vanish (a fitted task) it keeps stepping unless capped by the base step."""
    def steps(cap):
        config = LAggConfig(kind="lagg", step_mode="general", residual_base="prodigy",
                            correction_scale=0.1, correction_cap=cap)
        agg = large_output(LAggA(config=config, seed=0))
        return rounds(agg, draws(30, 4) + draws(200, 4, seed=1, scale=1e-9), 4)

    free, capped = steps(0.0), steps(1.0)
    late = slice(-20, None)
    free_late = torch.stack(free[late]).square().mean().sqrt()
    capped_late = torch.stack(capped[late]).square().mean().sqrt()
    early = torch.stack(free[:30]).square().mean().sqrt()
    assert free_late > 0.02 * early  # the uncapped correction walks on
    assert capped_late < 1e-3 * free_late
