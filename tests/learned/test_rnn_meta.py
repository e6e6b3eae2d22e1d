"""Meta-training by truncated BPTT: where gradients flow, and that training helps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

from metagg.aggregators import optimizers as opt
from metagg.aggregators.base import RoundContext
from metagg.aggregators.registry import build_aggregator
from metagg.config.meta import MetaTrainConfig
from metagg.learned.meta import BPTT, GradientEnv, meta_train, meta_train_rnn, task_envs
from metagg.learned.meta.evaluate import evaluate_aggregator
from metagg.learned.rnn import RNNAggregator, RNNConfig
from metagg.learned.store import read_aggregator_info
from metagg.learned.zoo import load_aggregator
from metagg.models import build_model
from metagg.seeding import MetaStream, derive_seed
from metagg.tasks import Task
from metagg.tasks.families import sample_tasks


@pytest.fixture(scope="module")
def env(digits):
    return GradientEnv(MetaTrainConfig(num_workers=4, batch_size=16, arnn=True), digits)


def _estimator(env, rounds, **over):
    return BPTT(MetaTrainConfig(num_workers=4, batch_size=16, arnn=True, unroll=rounds,
                                truncation=rounds, **over), [env])


def test_meta_gradient_reaches_phi_and_never_the_workers(env):
    est = _estimator(env, 3)
    seen = []
    real_step = est.agg.step

    def spy(state, updates, ctx):
        seen.append((updates.requires_grad, updates.grad_fn, ctx.params.requires_grad))
        return real_step(state, updates, ctx)

    est.agg.step = spy
    out = est.estimate(est.init_phi(0), est.init_state(), 0)
    assert [s[:2] for s in seen] == [(False, None)] * 3  # dashed edges: constants
    assert [s[2] for s in seen] == [False, True, True]  # θ_t stays in the graph
    assert out.metrics["rounds"] == 3 and math.isfinite(out.metrics["meta_loss"])
    for name, g in est.layout.unflatten(out.grad).items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


@pytest.mark.parametrize("meta_loss", ["loss", "log"])
def test_meta_gradient_equals_reference_with_explicitly_detached_updates(env, meta_loss):
    est = _estimator(env, 4, meta_loss=meta_loss)
    phi = est.init_phi(4)
    got = est.estimate(phi, est.init_state(), 0)

    # Reference: the loop written out, worker gradients from θ.detach() by hand, on the
    # inner problem meta-iteration 0 draws.
    seed = derive_seed(0, MetaStream.TRAIN_INIT, 0)
    agg = est.aggregator(phi)
    agg.differentiable = True
    agg.net.requires_grad_(True)
    run = env.inner(seed, agg)
    worker_grads = vmap(grad(env.task.loss), in_dims=(None, 0, 0))
    theta, state, ref_loss = env.task.init_params(seed), agg.init(env.task.layout, 4), 0.0
    for t in range(4):
        xb, yb = run.cluster.batches(t)
        g = worker_grads(theta.detach(), xb[:, 0], yb[:, 0])
        ctx = RoundContext(round=t, params=theta, layout=env.task.layout, num_workers=4,
                           worker_ids=torch.arange(4), trusted=env.trusted)
        step, state = agg.step(state, g, ctx)
        theta = theta - step
        loss = env.batch_loss(run, theta, t + 1)
        # "log": each round by its relative progress, floored at 1e-3·ln C (10 classes)
        ref_loss = ref_loss + (torch.log(loss + 1e-3 * math.log(10)) if meta_loss == "log"
                               else loss)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref_loss,
                                                                 list(agg.net.parameters()))])
    assert got.metrics["meta_loss"] == pytest.approx(float(ref_loss.detach()) / 4, rel=1e-6)
    torch.testing.assert_close(got.grad, want, atol=1e-6, rtol=1e-4)


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown key unrol; allowed: dataset"):
        meta_train_rnn(unrol=20)
    with pytest.raises(ValueError, match=r"num_byzantine: must be in \[0, num_workers=10\)"):
        MetaTrainConfig(num_byzantine=10)
    with pytest.raises(ValueError, match="needs num_byzantine"):
        MetaTrainConfig(attack="ipm")


def _tiny_run(digits, tmp_path, iterations, **extra):
    return meta_train_rnn(
        data=digits, iterations=iterations, unroll=20, truncation=10, validate_every=10,
        validation_seeds=2, long_horizon=0, patience=0, out_dir=str(tmp_path / "rnn"),
        progress=False, **extra)


def _check_training_helped(result, digits, tmp_path, first_last=4):
    metas = [r["meta_loss"] for r in result.history if r.get("meta_loss") is not None]
    early, late = metas[:first_last], metas[-first_last:]
    assert sum(late) / len(late) < sum(early) / len(early) - 0.02, metas
    vals = [r["validation_score"] for r in result.history if "validation_score" in r]
    assert result.best_score < vals[0]  # better than the initial φ on validation
    # held-out seeds: the trained aggregator beats the untrained one and lowers the loss
    env = GradientEnv(MetaTrainConfig(), digits)
    seeds = [derive_seed(123, 9, j) for j in range(2)]
    trained = evaluate_aggregator(result.aggregator, env, seeds, (20,))
    untrained = evaluate_aggregator(RNNAggregator(result.aggregator.config), env, seeds, (20,))
    start = sum(env.task.evaluate(env.task.init_params(s), digits.x_train,
                                  digits.y_train)["loss"] for s in seeds) / 2
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
    env = GradientEnv(MetaTrainConfig(num_workers=4, batch_size=8, attack=attack,
                                      num_byzantine=2, arnn=True), digits)
    run = env.inner(0, RNNAggregator(RNNConfig(num_workers=4, arnn=True)))
    cluster = run.cluster
    theta = env.task.init_params(0)
    honest = cluster.compute(theta, 0).updates
    updates, ctx = env.round_inputs(run, theta, 0, None)
    ids = ctx.worker_ids
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
    assert result.aggregator.uses_trusted_data
    steps = [r for r in result.history if "validation_score" not in r]
    assert [r["iteration"] for r in steps] == [1, 1, 2, 2]  # 2 truncations per unroll


def test_killed_meta_training_resumes_to_the_same_phi(digits, tmp_path):
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
    with pytest.raises(Exception, match="written with a different config"):
        meta_train(MetaTrainConfig(**{**cfg(6, tmp_path / "b").__dict__, "lr": 1e-2}),
                   data=digits, progress=False, resume=True)
    with pytest.raises(Exception, match="nothing to resume"):
        meta_train(cfg(6, tmp_path / "c"), data=digits, progress=False, resume=True)


def test_attack_mixture_cycles_attacks_and_validates_on_all(digits):
    cfg = MetaTrainConfig(attack="ipm,none,sign_flip", num_byzantine=2, num_workers=4,
                          attack_options={"sign_flip": {"scale": 4.0}}, arnn=True,
                          iterations=3, unroll=4, truncation=2, validate_every=3,
                          validation_seeds=1, long_horizon=0, patience=0, hidden=8,
                          batch_size=8)
    assert cfg.attack_settings() == [("ipm", {}, 2), ("none", {}, 0),
                                     ("sign_flip", {"scale": 4.0}, 2)]
    result = meta_train(cfg, data=digits, progress=False)
    last = result.history[-1]
    assert {"ipm/mean_loss@4", "none/mean_loss@4", "sign_flip/mean_loss@4"} <= set(last)
    with pytest.raises(ValueError, match="maps attack name"):
        MetaTrainConfig(attack="ipm,alie", num_byzantine=2, attack_options={"eps": 0.5})


def test_meta_training_rounds_go_through_the_server_round(digits):
    """The gradient env's rows are the server's: a non-finite forged update is dropped
    and counted, as in the simulator, instead of reaching the learned aggregator."""
    env = GradientEnv(MetaTrainConfig(num_workers=4, batch_size=8, attack="gaussian",
                                      num_byzantine=1, attack_options={"sigma": math.inf}),
                      digits)
    run = env.inner(0, RNNAggregator(RNNConfig(num_workers=4)))
    rows, ctx = env.round_inputs(run, env.task.init_params(0), 0, None)
    assert ctx.worker_ids.tolist() == [1, 2, 3] and torch.isfinite(rows).all()
    assert run.server.dropped_updates == 1


def _multitask(**over):
    return MetaTrainConfig(**{"tasks": "synthetic", "num_tasks": 3, "validation_tasks": 2,
                              "iterations": 4, "unroll": 4, "truncation": 2,
                              "validate_every": 2, "validation_seeds": 1, "long_horizon": 0,
                              "patience": 0, "hidden": 4, "layers": 1, "num_workers": 4,
                              **over})


def test_task_envs_build_the_drawn_tasks_with_the_configs_workers():
    cfg = _multitask()
    train, valid = task_envs(cfg)
    specs = sample_tasks(["synthetic"], 3, cfg.seed)
    assert train.names == [s.name for s in specs]  # task i is the family's draw i
    assert not set(train.names) & set(valid.names)  # validation: other draws
    assert task_envs(cfg)[1].names == valid.names  # deterministic by seed
    for i, spec in enumerate(specs):
        env = train[i]
        assert env.num_workers == 4 and env.label == spec.name  # M, whatever the spec's K
        assert env.data.name.startswith(spec.dataset)
        model = build_model(spec.model, env.data.input_shape, env.data.num_classes)
        assert env.task.dim == Task(model, num_classes=env.data.num_classes).dim
        assert env.cfg.batch_size == spec.batch_size
        assert env.cfg.partition == spec.partition and env.cfg.alpha == spec.alpha
    assert train[2] is train[2]  # built once while cached
    with pytest.raises(IndexError):
        train[3]
    with pytest.raises(ValueError, match="one attack"):
        _multitask(attack="ipm,none", num_byzantine=1)


def test_multi_task_meta_training_cycles_tasks_validates_on_others_and_resumes(tmp_path):
    result = meta_train(_multitask(), out_dir=tmp_path / "a", progress=False)
    train, valid = task_envs(_multitask())
    info = read_aggregator_info(tmp_path / "a")
    assert info["trained_on"]["training_task_names"] == train.names
    assert info["trained_on"]["validation_task_names"] == valid.names
    assert info["trained_on"]["tasks"] == "synthetic"
    last = [r for r in result.history if "validation_score" in r][-1]
    assert {f"{name}/mean_loss@4" for name in valid.names} <= set(last)
    assert not any(k.startswith(tuple(train.names)) for k in last)
    # the validation score's references: untuned mean + SGD / Adam on the same tasks
    base = result.summary["baselines"]
    assert set(base) == {"mean+sgd", "mean+adam"}
    assert math.isfinite(base["mean+adam"]["score"])
    assert base["mean+adam"]["score"] != base["mean+sgd"]["score"]
    assert {f"{name}/mean_loss@4" for name in valid.names} <= set(base["mean+adam"])
    # a killed run resumes to the same φ
    meta_train(_multitask(iterations=2), out_dir=tmp_path / "b", progress=False)
    resumed = meta_train(_multitask(), out_dir=tmp_path / "b", progress=False, resume=True)
    a, b = result.aggregator.net.state_dict(), resumed.aggregator.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="draws its own tasks"):
        meta_train(_multitask(), data=object(), progress=False)


def test_a_run_whose_rows_are_all_dropped_counts_as_diverged(env, monkeypatch):
    """A blown-up run leaves the server no finite row (it drops them): the evaluation
    records it diverged (loss inf, accuracy 0) instead of the rule raising TooFewUpdates."""
    real = env.round_inputs

    def blown_up_from_round_2(run, theta, t, agg_state):
        rows, ctx = real(run, theta, t, agg_state)
        return (rows[:0], ctx) if t >= 2 else (rows, ctx)

    monkeypatch.setattr(env, "round_inputs", blown_up_from_round_2)
    res = evaluate_aggregator(build_aggregator("mean", optimizer=opt.sgd(1.0)), env, [5],
                              (2, 4))
    assert math.isfinite(res["loss@2"][0]) and res["loss@4"] == [math.inf]
    assert res["acc@4"] == [0.0]


def test_prodigy_rule_meta_trains_from_mean_plus_prodigy(digits):
    """The head starts at zero (mean + Prodigy); the meta-gradient reaches it, finite, and
    the base step's state stays out of the graph."""
    cfg = MetaTrainConfig(num_workers=4, batch_size=16, output="prodigy", meta_loss="log",
                          unroll=6, truncation=3, prodigy_coef=0.25)
    est = BPTT(cfg, [GradientEnv(cfg, digits)])
    assert est.rnn.prodigy_coef == 0.25 and est.rnn.output == "prodigy"
    phi = est.init_phi(0)
    head = est.layout.unflatten(phi)
    assert float(head["w_out"].abs().sum() + head["b_out"].abs().sum()) == 0.0
    first = est.estimate(phi, est.init_state(), 0)
    grads = est.layout.unflatten(first.grad)
    assert torch.isfinite(first.grad).all() and float(grads["w_out"].abs().sum()) > 0
    base = first.state.agg_state.base
    assert base is not None and not any(t.requires_grad for t in base)
    assert int(base.count) == 3
    second = est.estimate(phi, first.state, 1)  # the second truncation goes on from there
    assert torch.isfinite(second.grad).all() and int(second.state.agg_state.base.count) == 6


def test_validation_with_log_meta_loss_floors_near_zero_losses(digits):
    """A task learned to ~0 loss must not decide a log score by its count of zeros."""
    from metagg.learned.meta.evaluate import score

    res = {"loss@5": [1e-9, 1e-7]}
    assert score(res, (5,)) == pytest.approx((math.log(1e-9) + math.log(1e-7)) / 2)
    assert score(res, (5,), floor=1e-3) == pytest.approx(math.log(1e-3), abs=1e-3)
    cfg = MetaTrainConfig(num_workers=4, batch_size=16, unroll=2, truncation=2)
    assert BPTT(cfg, [GradientEnv(cfg, digits)]).floor == 0.0  # Ji / L2L: plain losses
    cfg = MetaTrainConfig(num_workers=4, batch_size=16, unroll=2, truncation=2,
                          meta_loss="log")
    est = BPTT(cfg, [GradientEnv(cfg, digits)])
    assert est.floor == 1e-3
    assert "log(train loss + 0.001·ln C)" in est.score_definition  # what saved files say
