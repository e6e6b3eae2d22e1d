"""Heterogeneous worker groups (Ji et al. 2019 §5.5): mapping rule, shapes, equivalence."""

import pytest
import torch

from metagg.aggregators import optimizers as opt
from metagg.aggregators.registry import build_aggregator
from metagg.cluster import (
    PAPER_GROUPS,
    Cluster,
    HeteroCluster,
    WorkerGroup,
    prefix_correspondence,
)
from metagg.data import partition
from metagg.layout import ParamLayout
from metagg.learned import RNNAggregator, RNNConfig, evaluate_aggregator
from metagg.learned.meta import HeteroEnv
from metagg.models import build_model
from metagg.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")


def task(spec, digits):
    return Task(build_model(spec, digits.input_shape, 10), num_classes=10)


def test_prefix_correspondence_on_a_hand_built_example():
    target = ParamLayout.from_shapes({"w": (2, 3), "b": (2,), "only_target": (1,)})
    source = ParamLayout.from_shapes({"b": (4,), "w": (3, 2), "extra": (5,),
                                      "only_target": (1, 1)})
    # target flat: w = 0..5 (row-major 2x3), b = 6, 7, only_target = 8
    # source flat: b = 0..3, w = 4..9 (row-major 3x2), extra = 10..14, only_target = 15
    m = prefix_correspondence(target, source)
    pairs = sorted(zip(m.target_index.tolist(), m.source_index.tolist(), strict=True))
    # shared block of w is [:2, :2]: target (i, j) -> 3i + j, source (i, j) -> 4 + 2i + j;
    # b shares its first 2 entries; only_target differs in rank -> no counterpart.
    assert pairs == [(0, 4), (1, 5), (3, 6), (4, 7), (6, 0), (7, 1)]
    assert m.coverage.tolist() == [True, True, False, True, True, False, True, True, False]
    assert m.shared.nonzero().squeeze(1).tolist() == [0, 1, 4, 5, 6, 7]

    src = torch.arange(16.0) + 100
    assert m.to_target(src).tolist() == [104, 105, 0, 106, 107, 0, 100, 101, 0]
    stacked = m.to_target(torch.stack([src, -src]))
    assert stacked.shape == (2, 9) and torch.equal(stacked[1], -stacked[0])
    theta = -torch.arange(9.0) - 1  # -1 .. -9
    emb = m.embed(theta, src)
    expected = src.clone()
    expected[[4, 5, 6, 7, 0, 1]] = torch.tensor([-1.0, -2, -4, -5, -7, -8])
    assert torch.equal(emb, expected)


def test_paper_models_map_onto_mlp20_by_leading_units(digits):
    target = task("mlp:20:sigmoid", digits).layout
    m40 = prefix_correspondence(target, task("mlp:40:sigmoid", digits).layout)
    assert m40.coverage.all()  # the target is the smaller model: fully covered
    src = task("mlp:40:sigmoid", digits).layout
    vec = torch.arange(float(src.size))
    mapped = target.unflatten(m40.to_target(vec))
    full = src.unflatten(vec)
    assert torch.equal(mapped["hidden0.weight"], full["hidden0.weight"][:20])
    assert torch.equal(mapped["output.weight"], full["output.weight"][:, :20])
    two = prefix_correspondence(target, task("mlp:20,20:sigmoid", digits).layout)
    assert two.coverage.all() and len(two.source_index) == target.size  # hidden1.* private
    small = prefix_correspondence(target, task("mlp:10:sigmoid", digits).layout)
    cover = target.unflatten(small.coverage)
    assert cover["hidden0.weight"][:10].all() and not cover["hidden0.weight"][10:].any()
    assert cover["output.bias"].all()


def test_homogeneous_group_reproduces_the_cluster(digits):
    target = task("mlp:20:sigmoid", digits)
    shards = partition(digits.y_train, 5, "iid", seed=1)
    cluster = Cluster(target, digits.x_train, digits.y_train, shards, batch_size=16, seed=3)
    hetero = HeteroCluster(target, [WorkerGroup("mlp:20:sigmoid", 5)],
                           [task("mlp:20:sigmoid", digits)], digits.x_train, digits.y_train,
                           shards, batch_size=16, seed=3)
    theta = target.init_params(0)
    for t in (0, 4):
        out = hetero.compute(theta, t)
        ref = cluster.compute(theta, t)
        assert torch.equal(out.updates, ref.updates)
        assert torch.equal(out.losses, ref.losses)
        assert out.worker_ids.tolist() == list(range(5))
        theta = theta - out.updates.mean(0)


def test_group_gradients_are_their_models_gradients_at_the_anchored_params(digits):
    target = task("mlp:20:sigmoid", digits)
    groups = [WorkerGroup("mlp:20:sigmoid", 2), WorkerGroup("mlp:40:sigmoid", 3)]
    tasks = [task(g.model, digits) for g in groups]
    shards = partition(digits.y_train, 5, "iid", seed=0)
    hc = HeteroCluster(target, groups, tasks, digits.x_train, digits.y_train, shards,
                       batch_size=8, seed=2, private_lr=0.5)
    theta = target.init_params(1)
    private_before = hc.private[1].clone()
    out = hc.compute(theta, 0)
    assert out.updates.shape == (5, target.dim) and out.losses.shape == (5,)
    xb, yb = hc.batches(0)
    m = hc.maps[1]
    local = m.embed(theta, private_before)
    # the MLP40 sees the target's 20 units as its units 0-19
    assert torch.equal(tasks[1].layout.unflatten(local)["hidden0.weight"][:20],
                       target.layout.unflatten(theta)["hidden0.weight"])
    grads = []
    for k in (2, 3, 4):
        p = local.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(tasks[1].loss(p, xb[k, 0], yb[k, 0]), p)
        grads.append(g)
        torch.testing.assert_close(out.updates[k], m.to_target(g), rtol=1e-5, atol=1e-6)
    # the group trained its private units (20-39) with SGD on its mean gradient
    mean = torch.stack(grads).mean(0)
    private = ~m.shared
    torch.testing.assert_close(hc.private[1][private], (local - 0.5 * mean)[private])


def test_active_groups_and_coverage_mean(digits):
    env = HeteroEnv(digits, [WorkerGroup("mlp:20:sigmoid", 2), WorkerGroup("mlp:10:sigmoid", 2)])
    assert env.coverage.shape == (4, env.task.dim)
    assert env.coverage[:2].all() and not env.coverage[2:].all()
    theta = env.task.init_params(0)
    agg = build_aggregator("coverage_mean", optimizer=opt.sgd(1.0))
    updates, ctx = env.round_inputs(env.inner(0, agg), theta, 0, None)
    assert updates.shape == (4, env.task.dim)
    assert torch.equal(updates[~env.coverage], torch.zeros(int((~env.coverage).sum())))
    step, _ = agg.step(agg.init(env.task.layout, 4), updates, ctx)
    cover = env.coverage
    expected = updates.sum(0) / cover.sum(0)
    torch.testing.assert_close(step, expected)
    # where only the MLP20 workers cover a coordinate, it is their mean (not diluted by 0s)
    only = ~cover[2]
    torch.testing.assert_close(step[only], updates[:2, only].mean(0))

    env0 = HeteroEnv(digits, [WorkerGroup("mlp:20:sigmoid", 2), WorkerGroup("mlp:10:sigmoid", 2)],
                     active_groups=(1,))
    updates, ctx = env0.round_inputs(env0.inner(0, agg), theta, 0, None)
    assert ctx.worker_ids.tolist() == [2, 3] and updates.shape == (2, env0.task.dim)
    with pytest.raises(ValueError, match="active_groups"):
        HeteroEnv(digits, PAPER_GROUPS, active_groups=(4,))


def test_rnn_runs_on_the_paper_groups(digits):
    env = HeteroEnv(digits, PAPER_GROUPS)
    assert env.cfg.num_workers == 12
    agg = RNNAggregator(RNNConfig(num_workers=12))
    res = evaluate_aggregator(agg, env, [5], (3,))
    assert len(res["loss@3"]) == 1 and res["mean_loss@3"] > 0
    base, again = (evaluate_aggregator(build_aggregator("coverage_mean", optimizer=opt.sgd(1.0)),
                                       env, [5], (3,)) for _ in range(2))
    assert base["loss@3"] == again["loss@3"]  # a run is a function of its seed
