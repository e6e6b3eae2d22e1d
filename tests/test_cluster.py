import pytest
import torch

from metagg.cluster import Cluster
from metagg.data import partition
from metagg.models import build_model
from metagg.tasks import Task


def make(digits, mode="gradient", local_steps=1, flip=None, scheme="iid"):
    task = Task(build_model("mlp:20:sigmoid", digits.input_shape, 10), num_classes=10)
    shards = partition(digits.y_train, 5, scheme, seed=1, alpha=0.3)
    cluster = Cluster(task, digits.x_train, digits.y_train, shards, batch_size=16, mode=mode,
                      local_steps=local_steps, local_lr=0.3, seed=3, flip_labels=flip)
    return task, shards, cluster


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_batches_come_from_own_shard(digits, scheme):
    _, shards, cluster = make(digits, scheme=scheme)
    idx = cluster.sample_indices(7)
    assert idx.shape == (5, 1, 16)
    for k, shard in enumerate(shards):
        assert set(idx[k].flatten().tolist()) <= set(shard.tolist())
    assert torch.equal(idx, cluster.sample_indices(7))
    assert not torch.equal(idx, cluster.sample_indices(8))


def test_vmap_gradients_equal_per_worker_loop(digits):
    task, _, cluster = make(digits)
    theta = task.init_params(0)
    out = cluster.compute(theta, round=4)
    xb, yb = cluster.batches(4)
    for k in range(5):
        p = theta.clone().requires_grad_(True)
        loss = task.loss(p, xb[k, 0], yb[k, 0])
        (g,) = torch.autograd.grad(loss, p)
        torch.testing.assert_close(out.updates[k], g, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.losses[k], loss.detach())


def test_local_sgd_equals_per_worker_loop(digits):
    task, _, cluster = make(digits, mode="local_sgd", local_steps=3)
    theta = task.init_params(0)
    out = cluster.compute(theta, round=2)
    xb, yb = cluster.batches(2)
    assert xb.shape[:3] == (5, 3, 16)
    for k in range(5):
        p = theta.clone()
        for h in range(3):
            p.requires_grad_(True)
            (g,) = torch.autograd.grad(task.loss(p, xb[k, h], yb[k, h]), p)
            p = (p - 0.3 * g).detach()
        # pseudo-gradient θ − θ_k points like a gradient
        torch.testing.assert_close(out.updates[k], theta - p, rtol=1e-5, atol=1e-6)


def test_label_flip_only_for_flagged_workers(digits):
    flip = torch.tensor([True, False, False, False, True])
    _, _, cluster = make(digits, flip=flip)
    _, clean = make(digits)[2].batches(0)
    _, yb = cluster.batches(0)
    assert torch.equal(yb[0], 9 - clean[0]) and torch.equal(yb[4], 9 - clean[4])
    assert torch.equal(yb[1:4], clean[1:4])


def test_present_mask(digits):
    _, _, cluster = make(digits)
    assert cluster.present(0, 0.0).all()
    masks = torch.stack([cluster.present(t, 0.5) for t in range(200)])
    assert 0.35 < masks.float().mean() < 0.65
    assert torch.equal(masks[3], cluster.present(3, 0.5))


def test_bad_arguments(digits):
    task, shards, _ = make(digits)
    with pytest.raises(ValueError, match="mode"):
        Cluster(task, digits.x_train, digits.y_train, shards, batch_size=4, mode="async")
    with pytest.raises(ValueError, match="gradient mode"):
        Cluster(task, digits.x_train, digits.y_train, shards, batch_size=4, local_steps=2)
    with pytest.raises(ValueError, match="non-empty"):
        Cluster(task, digits.x_train, digits.y_train, [torch.tensor([], dtype=torch.long)],
                batch_size=4)
