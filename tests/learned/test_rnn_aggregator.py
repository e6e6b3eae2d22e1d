"""RNNAggregator: shapes for any d, chunking, both paths, missing workers, output rules."""

from __future__ import annotations

import pytest
import torch

from metagg.aggregators.optimizers import prodigy
from metagg.aggregators.registry import build_aggregator
from metagg.learned.rnn import RNNAggregator, RNNConfig


def run(agg, u, ctx, rounds=2):
    state = agg.init(ctx.layout, ctx.num_workers)
    steps = []
    for _ in range(rounds):
        step, state = agg.step(state, u, ctx)
        steps.append(step)
    return steps, state


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("d", [1, 7, 1510])
def test_shapes_any_d(cell, d, make_ctx):
    m = 4
    agg = RNNAggregator(RNNConfig(num_workers=m, cell=cell))
    steps, state = run(agg, torch.randn(m, d), make_ctx(d, m))
    assert steps[-1].shape == (d,) and steps[-1].dtype == torch.float32
    assert torch.isfinite(steps[-1]).all()
    assert state.h.shape == (2, d, 20)
    assert (state.c is None) == (cell == "gru")


def test_same_weights_transfer_to_another_d(make_ctx):
    agg = RNNAggregator(RNNConfig(num_workers=3))
    for d in (5, 300):
        steps, _ = run(agg, torch.randn(3, d), make_ctx(d, 3))
        assert steps[-1].shape == (d,)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_chunking_and_paths_agree(cell, make_ctx):
    m, d = 5, 1000
    u = torch.randn(m, d)
    cfg = RNNConfig(num_workers=m, cell=cell)
    base = RNNAggregator(cfg, seed=3)
    want, want_state = run(base, u, make_ctx(d, m), rounds=3)
    for agg in (RNNAggregator(cfg, base.net, chunk_size=17),
                RNNAggregator(cfg, base.net, chunk_size=64, differentiable=True)):
        got, got_state = run(agg, u, make_ctx(d, m), rounds=3)
        torch.testing.assert_close(got[-1].detach(), want[-1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_state.h.detach(), want_state.h, atol=1e-6, rtol=1e-5)


def test_differentiable_path_builds_a_graph_and_server_path_does_not(make_ctx):
    m, d = 3, 10
    cfg = RNNConfig(num_workers=m)
    u = torch.randn(m, d)
    steps, state = run(RNNAggregator(cfg, differentiable=True), u, make_ctx(d, m))
    assert steps[-1].requires_grad and state.h.requires_grad
    steps, state = run(RNNAggregator(cfg), u, make_ctx(d, m))
    assert not steps[-1].requires_grad and not state.h.requires_grad


def test_zero_norm_coordinates_get_zero_finite_step(make_ctx):
    m, d = 4, 6
    u = torch.randn(m, d)
    u[:, [1, 4]] = 0.0
    for output in ("normalized", "paper"):
        for clamp_sign in (True, False):
            agg = RNNAggregator(RNNConfig(num_workers=m, output=output, clamp_sign=clamp_sign))
            steps, _ = run(agg, u, make_ctx(d, m), rounds=3)
            assert torch.isfinite(steps[-1]).all()
            assert steps[-1][[1, 4]].tolist() == [0.0, 0.0]
            assert (steps[-1][[0, 2, 3, 5]] != 0).all()


def test_paper_rule_scales_with_the_updates_normalized_does_not(make_ctx):
    m, d = 4, 50
    u = torch.randn(m, d)
    paper = RNNAggregator(RNNConfig(num_workers=m, output="paper"))
    (s1,), _ = run(paper, u, make_ctx(d, m), rounds=1)
    (s2,), _ = run(paper, 3.0 * u, make_ctx(d, m), rounds=1)
    torch.testing.assert_close(s2, 3.0 * s1)  # step = scale · o · A_i, o scale-free
    norm = RNNAggregator(RNNConfig(num_workers=m))
    (s1,), _ = run(norm, u, make_ctx(d, m), rounds=1)
    (s2,), _ = run(norm, 3.0 * u, make_ctx(d, m), rounds=1)
    assert (s1.abs() < 0.1 * 1.5).all()  # |o| is bounded by the head: |step| ≲ scale
    assert not torch.allclose(s2, 3.0 * s1)


def test_missing_workers_fill_their_slots_with_zeros(make_ctx):
    m, d = 4, 9
    u = torch.randn(m, d)
    agg = RNNAggregator(RNNConfig(num_workers=m))
    ids = torch.tensor([0, 2, 3])
    sub, _ = run(agg, u[ids], make_ctx(d, m, worker_ids=ids), rounds=1)
    zeroed = u.clone()
    zeroed[1] = 0
    full, _ = run(agg, zeroed, make_ctx(d, m), rounds=1)
    torch.testing.assert_close(sub[0], full[0])
    shuffled = torch.tensor([3, 0, 2])
    perm, _ = run(agg, u[shuffled], make_ctx(d, m, worker_ids=shuffled), rounds=1)
    torch.testing.assert_close(perm[0], full[0])  # rows go to their worker's slot


def test_float64_updates_give_float64_step(make_ctx):
    agg = RNNAggregator(RNNConfig(num_workers=2))
    steps, _ = run(agg, torch.randn(2, 5, dtype=torch.float64), make_ctx(5, 2), rounds=1)
    assert steps[0].dtype == torch.float64


def test_clear_errors(make_ctx):
    agg = RNNAggregator(RNNConfig(num_workers=3))
    with pytest.raises(ValueError, match="trained for 3 workers"):
        agg.init(make_ctx(4, 5).layout, 5)
    state = agg.init(make_ctx(4, 3).layout, 3)
    with pytest.raises(ValueError, match="state is for d=4"):
        agg.step(state, torch.randn(3, 6), make_ctx(6, 3))
    with pytest.raises(ValueError, match="cell: unknown value 'rnn'; allowed: lstm, gru"):
        RNNConfig(num_workers=3, cell="rnn")
    with pytest.raises(ValueError, match="output: unknown value 'l2l'; allowed: normalized"):
        RNNConfig(num_workers=3, output="l2l")
    with pytest.raises(ValueError, match="p: must be > 0, got 0"):
        RNNConfig(num_workers=3, p=0)
    with pytest.raises(ValueError, match="chunk_size"):
        RNNAggregator(RNNConfig(num_workers=3), chunk_size=0)


@pytest.mark.parametrize("name", ["rnn", "arnn"])
def test_registry_without_path_says_what_to_do(name):
    with pytest.raises(ValueError, match=r"needs trained weights.*meta-train"):
        build_aggregator(name)


def _quadratic(m, d, scale=1.0, seed=0):
    """Worker gradients of scale·½‖x − x*‖²_diag(h) plus noise of the same scale."""
    gen = torch.Generator().manual_seed(seed)
    target, h = torch.randn(d, generator=gen), torch.rand(d, generator=gen) + 0.1
    noise = torch.randn(m, d, generator=gen) * 0.1
    return lambda x: scale * (h * (x - target) + noise)


def _run_prodigy_rnn(agg, grads_at, x, rounds, make_ctx, m=None):
    """The aggregator as a server on the toy problem: its steps, and its last state."""
    m, d = m or agg.config.num_workers, x.numel()
    state, steps = agg.init(make_ctx(d, m).layout, m), []
    for _ in range(rounds):
        step, state = agg.step(state, grads_at(x), make_ctx(d, m, params=x))
        x = x - step
        steps.append(step)
    return steps, state


@pytest.mark.parametrize("differentiable", [False, True])
def test_prodigy_rule_starts_as_mean_plus_prodigy(make_ctx, differentiable):
    m, d = 4, 50
    grads_at = _quadratic(m, d)
    agg = RNNAggregator(RNNConfig(num_workers=m, output="prodigy"), chunk_size=16,
                        differentiable=differentiable)
    assert float(agg.net.w_out.detach().abs().sum() + agg.net.b_out.detach().abs().sum()) == 0
    got, state = _run_prodigy_rnn(agg, grads_at, torch.zeros(d), 30, make_ctx)
    # the server optimizer `prodigy` is checked against a written-out Prodigy in
    # test_optimizers.py
    mean_prodigy = build_aggregator("mean", optimizer=prodigy())
    want, _ = _run_prodigy_rnn(mean_prodigy, grads_at, torch.zeros(d), 30, make_ctx, m=m)
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-9,
                                   msg=lambda e, t=t: f"round {t}: {e}")
    assert float(state.base.d.detach()) > 1e-3  # the distance estimate grew from 1e-6
    # meta-training sees how the steps it learns move D (through θ), the server does not
    assert state.base.d.requires_grad == differentiable
    assert agg.config.feature_names()[-1] == "prodigy_dir"


def test_prodigy_rule_is_invariant_to_the_gradients_scale(make_ctx):
    """No input and no part of the step depends on the gradients' scale: a task whose
    loss is 1000× larger (or 10× smaller) gets the same steps, with a trained (non-zero)
    head — down to where Adam's ε (1e-8 · D) is no longer negligible against √v."""
    m, d = 3, 40
    agg = RNNAggregator(RNNConfig(num_workers=m, output="prodigy", scale=0.5))
    with torch.no_grad():
        agg.net.w_out.normal_(generator=torch.Generator().manual_seed(1))
        agg.net.b_out.fill_(0.3)
    want, _ = _run_prodigy_rnn(agg, _quadratic(m, d), torch.zeros(d), 25, make_ctx)
    for c in (1e3, 0.1):
        got, _ = _run_prodigy_rnn(agg, _quadratic(m, d, scale=c), torch.zeros(d), 25, make_ctx)
        # ε's share differs by c, and 25 rounds amplify it a little
        torch.testing.assert_close(got[-1], want[-1], rtol=1e-2, atol=1e-4)
        assert float(got[-1].norm() / want[-1].norm()) == pytest.approx(1.0, abs=1e-3)
    assert float(want[-1].abs().max()) > 0
    # the default rule feeds log A_i: a trained one's steps change with the scale
    plain = build_aggregator("rnn:pretrained/digits-mlp20-lstm")
    m = plain.config.num_workers
    a, _ = _run_prodigy_rnn(plain, _quadratic(m, d), torch.zeros(d), 5, make_ctx)
    b, _ = _run_prodigy_rnn(plain, _quadratic(m, d, scale=1e3), torch.zeros(d), 5, make_ctx)
    assert float((a[-1] - b[-1]).norm() / a[-1].norm()) > 0.05


def test_a_prodigy_rule_run_resumes_exactly(tmp_path):
    """The base step's state (x0, moments, D, ...) is checkpointed with the RNN's."""
    from metagg.config import load_config
    from metagg.learned.rnn import save_rnn
    from metagg.simulation import Simulation, read_metrics

    save_rnn(tmp_path / "agg", RNNAggregator(RNNConfig(num_workers=3, output="prodigy",
                                                       hidden=4)))
    cfg = load_config(None, ["rounds=8", "eval_every=2", "checkpoint_every=2",
                             "workers.num_workers=3", "workers.mode=gradient",
                             f"aggregator.name=rnn:{tmp_path / 'agg'}"])
    Simulation(cfg).run(tmp_path / "whole")
    Simulation(cfg).run(tmp_path / "cut", stop_after=4)
    Simulation(cfg).run(tmp_path / "cut", resume=True)

    def rows(name):
        return [{k: v for k, v in r.items() if k != "wall_s"}
                for r in read_metrics(tmp_path / name / "metrics.jsonl")]

    assert rows("cut") == rows("whole") and rows("whole")[-1]["round"] == 8
