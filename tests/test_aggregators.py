"""Every registered aggregator through the same checks, plus rule-specific behaviour."""

import pytest
import torch

from metagg.aggregators.base import RoundContext, TooFewUpdates
from metagg.aggregators.registry import (
    aggregator_names,
    aggregator_spec,
    build_aggregator,
    check_aggregator_name,
)
from metagg.aggregators.rules import server_update
from metagg.config import config_from_dict
from metagg.models import build_model
from metagg.simulation import Simulation
from metagg.tasks import Task, TrustedData

SYMMETRIC = {"mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
             "bulyan", "centered_clip", "zeno", "fltrust", "coverage_mean"}
# learned ones: the shipped digits RNN / ARNN (10 input slots), LAgg-A / LOpt-A untrained
# in residual mode (exactly the mean at initialisation, so the descent check applies), and
# the shipped trust rule
LEARNED = {"rnn": ("rnn:pretrained/digits-mlp20-lstm", {}),
           "arnn": ("arnn:pretrained/digits-mlp20-arnn-lstm", {}),
           "lagg": ("lagg", {"init": True, "step_mode": "residual"}),
           "lopt": ("lopt", {"init": True, "step_mode": "residual"}),
           "trust": ("trust:pretrained/robust", {})}


@pytest.fixture(scope="module")
def setting(digits):
    task = Task(build_model("mlp:20:sigmoid", digits.input_shape, 10), num_classes=10)
    theta = task.init_params(0)
    trusted = TrustedData(task, digits.x_train[:64], digits.y_train[:64])
    g = torch.Generator().manual_seed(0)
    base = trusted.grad(theta)
    updates = base + 0.1 * base.norm() / base.numel() ** 0.5 * torch.randn(
        11, task.dim, generator=g)
    return task, theta, trusted, updates


def ctx_for(task, theta, trusted, n, **kw):
    return RoundContext(round=0, params=theta, layout=task.layout, num_workers=n,
                        worker_ids=torch.arange(n), trusted=trusted, **kw)


def test_the_shared_check_covers_every_registered_aggregator():
    assert set(aggregator_names()) == SYMMETRIC | set(LEARNED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", aggregator_names())
def test_every_aggregator_shared_checks(name, dtype, setting):
    task, theta, trusted, updates = setting
    spec, options = LEARNED.get(name, (name, {}))
    agg = build_aggregator(spec, f=2, options=options)
    n = 10 if name in ("rnn", "arnn") else 11  # the shipped RNNs have 10 input slots
    x = updates[:n].to(dtype)
    ctx = ctx_for(task, theta, trusted, n)
    state = agg.init(task.layout, n)
    step, _ = agg.step(state, x, ctx)
    assert step.shape == (task.dim,) and step.dtype == dtype  # the updates' dtype back
    assert torch.isfinite(step).all()
    # a step of every rule here moves θ downhill on the trusted batch for these updates
    assert trusted.loss(theta - 0.5 * step.float()) < trusted.loss(theta)
    if name in SYMMETRIC:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
        step_p, _ = agg.step(agg.init(task.layout, n), x[perm], ctx)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(step_p, step, rtol=tol, atol=tol * 1e-2)
    with pytest.raises(ValueError, match=r"updates must have shape \[n, "):
        agg.step(state, x[:, :-1], ctx)


def test_pre_aggregation_composes(setting):
    task, theta, trusted, updates = setting
    ctx = ctx_for(task, theta, trusted, 11)
    for name in ("nnm+krum", "bucketing+median", "nnm+trimmed_mean"):
        agg = build_aggregator(name, f=2)
        step, _ = agg.step(agg.init(task.layout, 11), updates, ctx)
        assert torch.isfinite(step).all() and agg.name == name
    assert build_aggregator("bucketing+krum", f=1, options={"bucket_size": 2}).min_updates == 10
    assert "unknown pre-aggregation 'foo'" in check_aggregator_name("foo+krum")
    with pytest.raises(ValueError, match="unknown value 'nope'"):
        build_aggregator("nnm+nope")


def test_too_few_updates(setting):
    task, theta, trusted, updates = setting
    agg = build_aggregator("krum", f=3)
    assert agg.min_updates == 9 and agg.requirement == "n > 2f + 2"
    with pytest.raises(TooFewUpdates, match="at least 9"):
        agg.step(agg.init(task.layout, 11), updates[:8], ctx_for(task, theta, trusted, 11))


def test_fltrust_matches_formula(setting):
    task, theta, trusted, updates = setting
    ctx = ctx_for(task, theta, trusted, 11)
    x = updates.clone()
    x[0] = -x[0]  # negative cosine: weight 0
    agg = build_aggregator("fltrust")
    step, _ = agg.step(agg.init(task.layout, 11), x, ctx)
    g0 = trusted.grad(theta)
    num, den = torch.zeros_like(g0), 0.0
    for xi in x:
        ts = max(float(torch.dot(xi, g0) / (xi.norm() * g0.norm())), 0.0)
        num += ts * g0.norm() / xi.norm() * xi
        den += ts
    torch.testing.assert_close(step, num / den, rtol=1e-4, atol=1e-7)


def test_server_update_local_sgd_mode(setting):
    task, theta, trusted, _ = setting
    ctx = ctx_for(task, theta, trusted, 1, mode="local_sgd", local_lr=0.3, local_steps=2)
    p = theta - 0.3 * trusted.grad(theta)
    p = p - 0.3 * trusted.grad(p)
    torch.testing.assert_close(server_update(ctx), theta - p)


def test_zeno_and_fltrust_survive_byzantine_majority(setting):
    task, theta, trusted, updates = setting
    x = updates.clone()
    x[:7] = -5.0 * updates[:7].mean(0)  # 7 of 11 colluding
    ctx = ctx_for(task, theta, trusted, 11)
    for name in ("zeno", "fltrust"):
        agg = build_aggregator(name, f=7)
        step, _ = agg.step(agg.init(task.layout, 11), x, ctx)
        assert torch.dot(step, updates[7:].mean(0)) > 0, name
    mean = build_aggregator("mean")
    mean_step, _ = mean.step(mean.init(task.layout, 11), x, ctx)
    assert torch.dot(mean_step, updates[7:].mean(0)) < 0


def test_zeno_needs_trusted_data(setting):
    task, theta, _, updates = setting
    agg = build_aggregator("zeno", f=2)
    with pytest.raises(ValueError, match="trusted"):
        agg.step(agg.init(task.layout, 11), updates, ctx_for(task, theta, None, 11))


def test_centered_clip_keeps_previous_aggregate(setting):
    task, theta, trusted, updates = setting
    agg = build_aggregator("centered_clip", options={"tau": 1e9})
    state = agg.init(task.layout, 11)
    step1, state = agg.step(state, updates, ctx_for(task, theta, trusted, 11))
    torch.testing.assert_close(step1, updates.mean(0))  # huge tau: plain mean
    torch.testing.assert_close(state.rule.previous, step1)
    agg = build_aggregator("centered_clip", options={"tau": 1e-3})
    state = agg.init(task.layout, 11)
    step, state = agg.step(state, updates, ctx_for(task, theta, trusted, 11))
    assert step.norm() <= 1e-3 + 1e-6  # tiny tau: cannot move far from the previous (0)


def test_rule_outside_guarantee_needs_allow_unsafe(digits):
    base = {"rounds": 2, "attack": {"name": "alie", "num_byzantine": 7}, "aggregator": "krum"}
    with pytest.raises(ValueError, match=r"n > 2f \+ 2\), got 10; set aggregator.options"):
        Simulation(config_from_dict(base), dataset=digits)
    base["aggregator"] = {"name": "krum", "options": {"allow_unsafe": True}}
    sim = Simulation(config_from_dict(base), dataset=digits)
    sim.step()
    assert sim.skipped_rounds == 0


def test_adaptive_attack_hurts_mean_more_than_sign_flip(digits):
    def final_loss(attack):
        cfg = config_from_dict({"rounds": 30, "eval_every": 30,
                                "attack": {"name": attack, "num_byzantine": 2}})
        return Simulation(cfg, dataset=digits).run()["final_train_loss"]

    assert final_loss("adaptive") > final_loss("sign_flip")


def test_bad_kernel_option_fails_at_build_time():
    with pytest.raises(ValueError, match="bad options"):
        build_aggregator("mean", options={"foo": 1})
    with pytest.raises(ValueError, match="bad options"):
        build_aggregator("krum", f=1, options={"tau": 3})


def test_allow_unsafe_reaches_nnm_and_is_ignored_without_guarantee():
    assert build_aggregator("nnm+mean", f=2).min_updates == 5
    unsafe = build_aggregator("nnm+mean", f=2, options={"allow_unsafe": True})
    assert unsafe.min_updates == 3 and unsafe.rule.allow_unsafe
    assert build_aggregator("median", f=2, options={"allow_unsafe": True}).min_updates == 1
    assert build_aggregator("bucketing+median", options={"bucket_size": 3}).rule.bucket_size == 3


def test_registry_entries_are_declarative_specs():
    krum = aggregator_spec("krum")
    assert (krum.min_updates(2), krum.min_updates(2, unsafe=True)) == (7, 5)
    assert krum.requirement == "n > 2f + 2" and krum.build is None
    assert aggregator_spec("mean").min_updates(5) == 1  # no guarantee, no minimum
    assert aggregator_spec("lagg").build == "metagg.learned.lagg.io:build_lagg"
    assert aggregator_spec("zeno").uses_trusted_data and aggregator_spec("arnn").uses_trusted_data
    with pytest.raises(ValueError, match="unknown aggregator 'nope'"):
        aggregator_spec("nope")
    assert "pre-aggregation applies to rule-based" in check_aggregator_name("nnm+lagg")
