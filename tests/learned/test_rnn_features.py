"""Ji §4.2 preprocessing, the log-norm input, worker slots and ARNN loss features."""

from __future__ import annotations

import math

import pytest
import torch

from metagg.aggregators.base import worker_slots
from metagg.learned.features import gradient_features, log_norm_feature, loss_features
from metagg.learned.rnn import RNNAggregator, RNNConfig
from metagg.models import build_model
from metagg.tasks import Task, TrustedData

E10 = math.exp(-10)

# workers x coordinates: a 3-4-5 column, an all-zero column, a column with a tiny entry
G = torch.tensor([[3.0, 0.0, -1e-6],
                  [4.0, 0.0, -2.0]])


def test_normalisation_and_norm_by_hand():
    x, a = gradient_features(G, p=10.0)
    assert x.shape == (3, 2)
    torch.testing.assert_close(a, torch.tensor([5.0, 0.0, 2.0]))
    torch.testing.assert_close(x[0], torch.tensor([0.6, 0.8]))
    assert x[2, 1] == pytest.approx(-1.0)


def test_zero_norm_coordinate_gets_zero_input_both_clamp_rules():
    for clamp_sign in (True, False):
        x, a = gradient_features(G, p=10.0, clamp_sign=clamp_sign)
        assert a[1] == 0
        assert torch.equal(x[1], torch.zeros(2))
        assert torch.isfinite(x).all()


def test_clamp_keeps_sign_or_follows_paper_literally():
    x, _ = gradient_features(G, p=10.0, clamp_sign=True)
    assert x[2, 0].item() == pytest.approx(-E10)  # −5e-7 → −e^{-10}
    x, _ = gradient_features(G, p=10.0, clamp_sign=False)
    assert x[2, 0].item() == pytest.approx(E10)  # Ji: +e^{-10}, sign lost
    x, _ = gradient_features(G, p=3.0, clamp_sign=True)  # e^{-3} ≈ 0.05
    assert x[2, 0].item() == pytest.approx(-math.exp(-3))
    assert x[0, 0].item() == pytest.approx(0.6)  # large entries untouched


def test_exact_zero_entry_and_missing_slot():
    g = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 0.0]])
    present = torch.tensor([True, True, False])
    x, _ = gradient_features(g, present, p=10.0, clamp_sign=True)
    assert x[0, 0] == 0  # exact zero keeps sign 0
    x, _ = gradient_features(g, present, p=10.0, clamp_sign=False)
    assert x[0, 0].item() == pytest.approx(E10)  # paper rule: +e^{-p} for a present worker
    assert torch.equal(x[:, 2], torch.zeros(2))  # missing worker: zero whatever the rule


def test_log_norm_feature():
    a = torch.tensor([5.0, 0.0, 1e-9, 1.0])
    f = log_norm_feature(a, p=10.0)
    torch.testing.assert_close(f, torch.tensor([math.log(5) / 10, 0.0, -1.0, 0.0]))


def test_worker_slots():
    u = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    slots, present = worker_slots(u, torch.tensor([3, 1]), 4)
    assert present.tolist() == [False, True, False, True]
    assert slots.tolist() == [[0, 0], [3, 4], [0, 0], [1, 2]]
    same, none = worker_slots(u, torch.arange(2), 2)
    assert same is u and none is None
    with pytest.raises(ValueError, match="distinct and in"):
        worker_slots(u, torch.tensor([1, 1]), 4)
    with pytest.raises(ValueError, match="distinct and in"):
        worker_slots(u, torch.tensor([0, 4]), 4)


@pytest.fixture(scope="module")
def digits_small():
    from metagg.data import load_dataset

    ds = load_dataset("digits")
    task = Task(build_model("mlp:20:sigmoid", ds.input_shape, ds.num_classes), num_classes=10)
    theta = task.init_params(0)
    trusted = TrustedData(task, ds.x_train[:64], ds.y_train[:64])
    return task, theta, trusted


def test_loss_features_flag_garbage_and_zero_missing(digits_small):
    _, theta, trusted = digits_small
    g = trusted.grad(theta)
    m = 5
    slots = torch.stack([g, g, g * 1e4, -g * 1e3, g])  # workers 2, 3 send garbage
    feat = loss_features(trusted, theta, slots, probe_lr=1.0)
    assert feat.shape == (m,)
    assert torch.isfinite(feat).all()
    honest = feat[[0, 1, 4]]
    assert (honest < 0).all()  # an honest step lowers the trusted loss
    assert feat[2] > honest.max() + 1 and feat[3] > honest.max() + 1
    present = torch.tensor([True, False, True, True, True])
    slots[1] = 0
    feat = loss_features(trusted, theta, slots, present)
    assert feat[1] == 0
    assert feat[2] > feat[0]


def test_loss_features_nonfinite_loss_is_a_huge_feature(digits_small):
    _, theta, trusted = digits_small
    slots = torch.stack([trusted.grad(theta), torch.full_like(theta, float("inf"))])
    feat = loss_features(trusted, theta, slots)
    assert torch.isfinite(feat).all() and feat[1] > 20


def test_arnn_inputs_and_missing_trusted_data(digits_small, make_ctx):
    task, theta, trusted = digits_small
    d, m = task.dim, 3
    agg = RNNAggregator(RNNConfig(num_workers=m, arnn=True))
    assert agg.uses_trusted_data and agg.config.input_size == 2 * m + 1
    state = agg.init(task.layout, m)
    u = torch.randn(2, d) * 0.01
    ctx = make_ctx(d, m, worker_ids=torch.tensor([0, 2]), trusted=trusted, params=theta)
    ctx.layout = task.layout
    step, _ = agg.step(state, u, ctx)
    assert step.shape == (d,) and torch.isfinite(step).all()
    ctx.trusted = None
    with pytest.raises(ValueError, match="trusted data"):
        agg.step(state, u, ctx)
