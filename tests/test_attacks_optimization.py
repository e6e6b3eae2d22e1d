"""Min-max and min-sum (Shejwalkar & Houmansadr, NDSS 2021): a case worked by hand, the
defining constraints (met, and tight), and the paper's halving search for γ."""

from __future__ import annotations

import math

import pytest
import torch

from metagg.attacks import make_attack, perturbation
from metagg.config import load_config
from metagg.simulation import Simulation

BYZ = torch.tensor([0, 1, 2])


def forge(name: str, honest: torch.Tensor, **kw) -> torch.Tensor:
    return make_attack(name, **kw).forge(honest, BYZ, None, torch.Generator().manual_seed(0))


def test_worked_by_hand():
    # honest rows (1, 1) and (1, -1): μ = (1, 0), max pairwise distance 2, p = (-1, 0).
    # min-max: ‖(1 - γ, 0) - (1, ±1)‖² = γ² + 1 ≤ 4 → γ = √3;
    # min-sum: 2(γ² + 1) ≤ max_i Σ_j D_ij = 4 → γ = 1.
    honest = torch.tensor([[9.0, 9.0], [9.0, 9.0], [9.0, 9.0], [1.0, 1.0], [1.0, -1.0]],
                          dtype=torch.float64)
    want = torch.tensor([1 - math.sqrt(3), 0.0], dtype=torch.float64).expand(3, -1)
    torch.testing.assert_close(forge("min_max", honest), want)
    torch.testing.assert_close(forge("min_sum", honest), torch.zeros(3, 2, dtype=torch.float64))


def sq_dist(a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return (a - rows).square().sum(-1)


@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_constraints_met_and_tight(direction):
    g = torch.Generator().manual_seed(3)
    honest = torch.randn(12, 40, generator=g, dtype=torch.float64) + 0.5
    good = honest[3:]
    pair = torch.cdist(good, good).square()
    m = forge("min_max", honest, direction=direction)
    assert torch.equal(m[0], m[1]) and torch.equal(m[0], m[2])
    assert float(sq_dist(m[0], good).max()) == pytest.approx(float(pair.max()), rel=1e-9)
    s = forge("min_sum", honest, direction=direction)
    assert float(sq_dist(s[0], good).sum()) == pytest.approx(float(pair.sum(1).max()),
                                                                rel=1e-9)
    # along p away from the honest mean: γ > 0 and the row is m = μ + γ p
    p = perturbation(good, direction)
    gamma = float((m[0] - good.mean(0)) @ p / (p @ p))
    assert gamma > 0
    torch.testing.assert_close(m[0], good.mean(0) + gamma * p)


def halving_search(good: torch.Tensor, p: torch.Tensor, ok, start: float = 10.0) -> float:
    """The paper's search for γ, as its code writes it (λ from 10, a step of half the
    last failure size, until the last success is within 1e-5)."""
    gamma, fail, best = start, start, 0.0
    while abs(best - gamma) > 1e-5:
        if ok(good.mean(0) + gamma * p):
            best = gamma
            gamma += fail / 2
        else:
            gamma -= fail / 2
        fail /= 2
    return best


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
def test_matches_the_papers_search(name):
    g = torch.Generator().manual_seed(5)
    honest = torch.randn(10, 30, generator=g, dtype=torch.float64) * 0.2 + 0.1
    good = honest[3:]
    pair = torch.cdist(good, good).square()
    if name == "min_max":
        def ok(m):
            return float(sq_dist(m, good).max()) <= float(pair.max())
    else:
        def ok(m):
            return float(sq_dist(m, good).sum()) <= float(pair.sum(1).max())
    p = perturbation(good, "unit")
    want = halving_search(good, p, ok)
    got = float((forge(name, honest)[0] - good.mean(0)) @ p)  # ‖p‖ = 1
    assert got == pytest.approx(want, abs=1e-4)


def test_degenerate_inputs_send_the_mean():
    same = torch.ones(6, 4)
    torch.testing.assert_close(forge("min_max", same), torch.ones(3, 4))
    one_honest = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(forge("min_sum", one_honest), one_honest[3:].expand(3, -1))


def test_bad_direction():
    with pytest.raises(ValueError, match="min_max: direction must be one of unit, std, sign"):
        make_attack("min_max", direction="up")


@pytest.mark.parametrize("attack", ["min_max", "min_sum"])
def test_runs_in_a_simulation_against_a_robust_rule(attack, one_thread):
    cfg = load_config(None, ["rounds=3", "eval_every=3", f"attack.name={attack}",
                             "attack.num_byzantine=3", "aggregator.name=median"])
    sim = Simulation(cfg)
    for _ in range(3):
        sim.step()
    assert math.isfinite(sim.evaluate()["train_loss"])
    assert sim.dropped_updates == 0


# --------------------------------------------------------------------------- white box


def whitebox_round(agg_name: str, extra: list[str] | None = None):
    """A simulation one round in, and what the whitebox attack needs to forge its rows."""
    from metagg.attacks import Defence

    cfg = load_config(None, ["rounds=2", "attack.name=whitebox", "attack.num_byzantine=3",
                             f"aggregator.name={agg_name}", *(extra or [])])
    sim = Simulation(cfg)
    sim.step()
    out = sim.cluster.compute(sim.params, sim.round)
    ids = torch.arange(cfg.workers.num_workers)
    ctx = sim.context(ids)
    return sim, out.updates, ctx, Defence(sim.aggregator, sim.agg_state)


def first_order_score(defence, honest, byz, rows, ctx) -> float:
    mu = honest[3:].mean(0)
    step, _ = defence.aggregator.step(defence.state, honest.index_put((byz,), rows), ctx)
    return float(step @ mu)


LAGG = ["aggregator.options.init=true", "aggregator.options.step_mode=general",
        "workers.mode=local_sgd", "workers.local_steps=2", "workers.local_lr=0.3"]


@pytest.mark.parametrize("agg, extra", [("mean", []), ("lagg", LAGG)], ids=["mean", "lagg"])
def test_whitebox_descends_through_a_differentiable_aggregator(agg, extra, one_thread):
    sim, honest, ctx, defence = whitebox_round(agg, extra)
    attack = make_attack("whitebox", steps=10)
    before = {k: v.clone() for k, v in vars(sim.agg_state).items()} \
        if hasattr(sim.agg_state, "__dict__") else None
    forged = attack.forge(honest, BYZ, ctx, torch.Generator(), defence=defence)
    assert attack.last_method == "gradient"
    assert forged.shape == (3, honest.shape[1]) and torch.isfinite(forged).all()
    start = (-honest[3:].mean(0)).expand(3, -1)
    assert first_order_score(defence, honest, BYZ, forged, ctx) < \
        first_order_score(defence, honest, BYZ, start, ctx)
    if before is not None:  # the server's state is untouched
        assert all(torch.equal(v, getattr(sim.agg_state, k)) for k, v in before.items())


def test_whitebox_searches_where_the_aggregator_is_not_differentiable(one_thread,
                                                                       monkeypatch):
    _, honest, ctx, defence = whitebox_round("krum", [])
    monkeypatch.setattr(defence.aggregator, "differentiable_step", lambda *a: None)
    attack = make_attack("whitebox")
    forged = attack.forge(honest, BYZ, ctx, torch.Generator(), defence=defence)
    assert attack.last_method == "search"
    want = make_attack("adaptive").forge(honest, BYZ, ctx, torch.Generator(), defence=defence)
    torch.testing.assert_close(forged, want)


def test_whitebox_options_are_checked():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        make_attack("whitebox", steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        make_attack("whitebox", lr=-1.0)


@pytest.mark.parametrize("spec", ["rnn:pretrained/digits-mlp20-lstm",
                                  "arnn:pretrained/digits-mlp20-arnn-lstm"])
def test_rnn_step_is_differentiable_in_the_updates(spec, one_thread):
    _, honest, ctx, defence = whitebox_round(spec, ["model=mlp:20:sigmoid",
                                                      "trusted_samples=64"])
    agg, state = defence
    want, _ = agg.step(state, honest, ctx)
    rows = honest.clone().requires_grad_(True)
    got = agg.differentiable_step(state, rows, ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)  # the same step
    got.sum().backward()
    assert torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0
    assert all(p.grad is None for p in agg.net.parameters())  # φ is left alone
    attack = make_attack("whitebox", steps=5)
    forged = attack.forge(honest, BYZ, ctx, torch.Generator(), defence=defence)
    assert attack.last_method == "gradient"
    start = (-honest[3:].mean(0)).expand(3, -1)
    assert first_order_score(defence, honest, BYZ, forged, ctx) < \
        first_order_score(defence, honest, BYZ, start, ctx)


def test_whitebox_keeps_its_best_rows_when_the_rule_leaves_autograd(monkeypatch, one_thread):
    _, honest, ctx, defence = whitebox_round("mean", [])
    real = defence.aggregator.differentiable_step
    calls = []

    def flaky(*args):  # differentiable on the first two calls only
        calls.append(1)
        return real(*args) if len(calls) <= 2 else None

    monkeypatch.setattr(defence.aggregator, "differentiable_step", flaky)
    attack = make_attack("whitebox", steps=10)
    forged = attack.forge(honest, BYZ, ctx, torch.Generator(), defence=defence)
    assert attack.last_method == "gradient" and len(calls) == 3
    assert torch.isfinite(forged).all()
