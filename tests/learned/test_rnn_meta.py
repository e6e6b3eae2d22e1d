"""Meta-training by truncated BPTT: where gradients flow, and that training helps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

from metagg.learned.meta_bptt import (
    MetaEnv,
    MetaTrainConfig,
    evaluate_aggregator,
    meta_train_rnn,
    unroll_meta_loss,
)
from metagg.learned.rnn import RNNAggregator
from metagg.learned.store import read_aggregator_info
from metagg.learned.zoo import load_aggregator
from metagg.seeding import derive_seed


@pytest.fixture(scope="module")
def env(digits):
    return MetaEnv(MetaTrainConfig(num_workers=4, batch_size=16, arnn=True), digits)


def test_meta_gradient_reaches_phi_and_never_the_workers(env):
    agg = RNNAggregator(env.cfg.rnn_config(), differentiable=True)
    seen = []
    real_step = agg.step

    def spy(state, updates, ctx):
        seen.append((updates.requires_grad, updates.grad_fn, ctx.params.requires_grad))
        return real_step(state, updates, ctx)

    agg.step = spy
    cluster = env.cluster(0)
    theta = env.task.init_params(0)
    state = agg.init(env.task.layout, 4)
    loss, theta_end, state = unroll_meta_loss(agg, env, cluster, theta, state, range(3))
    assert [s[:2] for s in seen] == [(False, None)] * 3  # dashed edges: constants
    assert [s[2] for s in seen] == [False, True, True]  # θ_t stays in the graph
    assert theta_end.requires_grad and state.h.requires_grad
    loss.backward()
    for name, p in agg.net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_meta_gradient_equals_reference_with_explicitly_detached_updates(env):
    cfg = env.cfg.rnn_config()
    agg = RNNAggregator(cfg, seed=4, differentiable=True)
    cluster = env.cluster(1)
    theta0 = env.task.init_params(1)
    loss, _, _ = unroll_meta_loss(agg, env, cluster, theta0, agg.init(env.task.layout, 4),
                                  range(4))
    got = torch.autograd.grad(loss, list(agg.net.parameters()))

    # Reference: the loop written out, worker gradients from θ.detach() by hand.
    worker_grads = vmap(grad(env.task.loss), in_dims=(None, 0, 0))
    theta, state, ref_loss = theta0, agg.init(env.task.layout, 4), 0.0
    for t in range(4):
        xb, yb = cluster.batches(t)
        g = worker_grads(theta.detach(), xb[:, 0], yb[:, 0])
        step, state = agg.step(state, g, env.context(theta, torch.arange(4), t))
        theta = theta - step
        ref_loss = ref_loss + env.batch_loss(cluster, theta, t + 1)
    want = torch.autograd.grad(ref_loss, list(agg.net.parameters()))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown meta-training option.*unrol"):
        meta_train_rnn(unrol=20)
    with pytest.raises(ValueError, match="num_byzantine must be in"):
        MetaTrainConfig(num_byzantine=10)
    with pytest.raises(ValueError, match="needs num_byzantine"):
        MetaTrainConfig(attack="ipm")


def _tiny_run(digits, tmp_path, iterations, **extra):
    return meta_train_rnn(
        data=digits, iterations=iterations, unroll=20, truncation=10, validate_every=10,
        validation_seeds=2, long_horizon=0, patience=0, out_dir=str(tmp_path / "rnn"),
        progress=False, **extra)


def _check_training_helped(result, digits, tmp_path, first_last=4):
    metas = [r["meta_loss"] for r in result.history if "meta_loss" in r]
    early, late = metas[:first_last], metas[-first_last:]
    assert sum(late) / len(late) < sum(early) / len(early) - 0.02, metas
    vals = [r["validation_score"] for r in result.history if "validation_score" in r]
    assert result.best_score < vals[0]  # better than the initial φ on validation
    # held-out seeds: the trained aggregator beats the untrained one and lowers the loss
    env = MetaEnv(MetaTrainConfig(), digits)
    seeds = [derive_seed(123, 9, j) for j in range(2)]
    trained = evaluate_aggregator(result.aggregator, env, seeds, (20,))
    untrained = evaluate_aggregator(RNNAggregator(result.aggregator.config), env, seeds, (20,))
    start = sum(env.train_loss(env.task.init_params(s)) for s in seeds) / 2
    assert trained["mean_loss@20"] < untrained["mean_loss@20"] - 0.05
    assert trained["mean_loss@20"] < start - 0.1  # sign convention: θ − step descends
    # written with the store, loadable, same steps
    loaded = load_aggregator(tmp_path / "rnn")
    assert evaluate_aggregator(loaded, env, seeds, (20,))["loss@20"] == trained["loss@20"]
    info = read_aggregator_info(tmp_path / "rnn")
    assert info["trained_on"]["dim"] == 1510 and math.isfinite(info["validation"]["score"])
    assert (tmp_path / "rnn" / "meta_train.jsonl").exists()


def test_tiny_meta_training_helps(digits, tmp_path):
    result = _tiny_run(digits, tmp_path, 20, lr=3e-3)
    _check_training_helped(result, digits, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_meta_training_helps_default_lr(digits, tmp_path, cell):
    result = _tiny_run(digits, tmp_path, 40, cell=cell)
    _check_training_helped(result, digits, tmp_path, first_last=8)


@pytest.mark.parametrize("attack", ["sign_flip", "crash", "label_flip", "ipm"])
def test_byzantine_meta_training_environment(digits, attack):
    env = MetaEnv(MetaTrainConfig(num_workers=4, batch_size=8, attack=attack, num_byzantine=2,
                                  arnn=True), digits)
    cluster = env.cluster(0)
    theta = env.task.init_params(0)
    honest = cluster.compute(theta, 0).updates
    updates, ids = env.worker_round(cluster, theta, 0)
    if attack == "crash":
        assert ids.tolist() == [2, 3] and torch.equal(updates, honest[2:])
    else:
        assert ids.tolist() == [0, 1, 2, 3] and torch.equal(updates[2:], honest[2:])
    if attack == "sign_flip":
        assert torch.equal(updates[:2], -honest[:2])
    if attack == "label_flip":  # Byzantine workers train on flipped labels
        assert cluster.flip_labels.tolist() == [True, True, False, False]
    # a couple of meta-iterations run end to end (ARNN + attack)
    result = meta_train_rnn(data=digits, num_workers=4, batch_size=8, attack=attack,
                            num_byzantine=2, arnn=True, iterations=2, unroll=4, truncation=2,
                            validate_every=2, validation_seeds=1, long_horizon=0,
                            progress=False)
    assert result.aggregator.uses_trusted_data and len(result.history) == 4


def test_killed_meta_training_resumes_to_the_same_phi(digits, tmp_path):
    from metagg.learned.meta_bptt import MetaTrainConfig, meta_train

    def cfg(iterations, out):
        return MetaTrainConfig(iterations=iterations, unroll=6, truncation=3, validate_every=2,
                               validation_seeds=1, long_horizon=0, patience=0, lr=3e-3,
                               num_workers=4, batch_size=8, hidden=8, out_dir=str(out))

    straight = meta_train(cfg(6, tmp_path / "a"), data=digits, progress=False)
    meta_train(cfg(4, tmp_path / "b"), data=digits, progress=False)  # "killed" after 4
    resumed = meta_train(cfg(6, tmp_path / "b"), data=digits, progress=False, resume=True)
    a, b = straight.aggregator.net.state_dict(), resumed.aggregator.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_iteration == straight.best_iteration
    assert [r.get("meta_loss") for r in resumed.history] == \
        [r.get("meta_loss") for r in straight.history]
    with pytest.raises(Exception, match="different meta-training config"):
        meta_train(MetaTrainConfig(**{**cfg(6, tmp_path / "b").__dict__, "lr": 1e-2}),
                   data=digits, progress=False, resume=True)
    with pytest.raises(Exception, match="nothing to resume"):
        meta_train(cfg(6, tmp_path / "c"), data=digits, progress=False, resume=True)


def test_attack_mixture_cycles_attacks_and_validates_on_all(digits):
    from metagg.learned.meta_bptt import meta_train

    cfg = MetaTrainConfig(attack="ipm,none,sign_flip", num_byzantine=2, num_workers=4,
                          attack_options={"sign_flip": {"scale": 4.0}}, arnn=True,
                          iterations=3, unroll=4, truncation=2, validate_every=3,
                          validation_seeds=1, long_horizon=0, patience=0, hidden=8,
                          batch_size=8)
    envs = cfg.environments()
    assert [(e.attack, e.num_byzantine, e.attack_options) for e in envs] == [
        ("ipm", 2, {}), ("none", 0, {}), ("sign_flip", 2, {"scale": 4.0})]
    result = meta_train(cfg, data=digits, progress=False)
    last = result.history[-1]
    assert {"ipm/mean_loss@4", "none/mean_loss@4", "sign_flip/mean_loss@4"} <= set(last)
    with pytest.raises(ValueError, match="maps attack name"):
        MetaTrainConfig(attack="ipm,alie", num_byzantine=2, attack_options={"eps": 0.5})
