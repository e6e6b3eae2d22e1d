"""Simulated workers, all computed at once with `torch.func.vmap`.

Each of the M workers holds a shard of the training set. Per round:

- gradient mode: worker k sends its minibatch gradient g_k at θ;
- local-SGD mode: worker k takes H SGD steps from θ on its own minibatches and
  sends the pseudo-gradient θ − θ_k (FedOpt sign convention).

The honest work is one vmapped `grad` call per local step, never a Python loop
over workers. Every random choice of round t (minibatches, who is missing) comes
from a generator seeded by (seed, t), so a round is a pure function of the
seed, the round index and θ: runs are reproducible, resumable from a checkpoint,
and a distributed worker can draw exactly the batch the simulator would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.func import grad_and_value, vmap

from metagg.seeding import RoundStream, round_generator
from metagg.tasks import Task

__all__ = ["Cluster", "GradFn", "WorkerOutput", "local_sgd"]

#: `fn(params [N, d], x [N, B, ...], y [N, B]) -> (grads [N, d], losses [N])`: N models'
#: minibatch gradients at once (a vmapped autograd, or a hand-written backward).
GradFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def local_sgd(grad_fn: GradFn, theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
              lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H local SGD steps of N workers at once: (updates θ − θ_H [N, d], losses at θ [N]).

    θ [N, d]; minibatches xb [N, H, B, ...], yb [N, H, B] (step h uses xb[:, h]). The one
    local-SGD loop of metagg: the simulator, a worker process and meta-training run it.
    """
    local, first = theta, None
    for h in range(xb.shape[1]):
        grads, losses = grad_fn(local, xb[:, h], yb[:, h])
        local = local - lr * grads
        if first is None:
            first = losses
    assert first is not None, "local_sgd needs at least one local step"
    return theta - local, first


@dataclass
class WorkerOutput:
    updates: torch.Tensor  # [M, d] every worker's honest update
    losses: torch.Tensor  # [M] mean minibatch loss seen by each worker (first local step)


class Cluster:
    """M workers with their data shards and minibatch streams.

    Args:
        task: the model + loss as pure functions of flat parameters.
        x, y: the full training set (stays where it is; workers index into it).
        shards: one int64 index tensor per worker (see `metagg.data.partition`).
        batch_size: minibatch size B per worker and local step (drawn with replacement).
        mode: "gradient" or "local_sgd".
        local_steps: H, local SGD steps per round (local-SGD mode).
        local_lr: local SGD learning rate.
        seed: run seed; round t's randomness is a function of (seed, t).
        flip_labels: bool [M]; workers whose labels are flipped y → C − 1 − y.
    """

    def __init__(
        self,
        task: Task,
        x: torch.Tensor,
        y: torch.Tensor,
        shards: Sequence[torch.Tensor],
        *,
        batch_size: int,
        mode: str = "gradient",
        local_steps: int = 1,
        local_lr: float = 0.1,
        seed: int = 0,
        flip_labels: torch.Tensor | None = None,
    ):
        if mode not in ("gradient", "local_sgd"):
            raise ValueError(f"mode must be 'gradient' or 'local_sgd', got {mode!r}")
        if mode == "gradient" and local_steps != 1:
            raise ValueError("gradient mode takes exactly one step per round (local_steps=1)")
        if not shards or any(len(s) == 0 for s in shards):
            raise ValueError("every worker needs a non-empty shard")
        self.task = task
        self.x, self.y = x, y
        self.num_workers = len(shards)
        self.batch_size = batch_size
        self.mode = mode
        self.local_steps = local_steps
        self.local_lr = local_lr
        self.seed = seed
        # Padded [M, max_shard] table of global indices: sampling for every worker is
        # one vectorised gather even when shards differ in size (Dirichlet).
        sizes = torch.tensor([len(s) for s in shards])
        table = torch.zeros(self.num_workers, int(sizes.max()), dtype=torch.int64)
        for k, s in enumerate(shards):
            table[k, : len(s)] = s
        self.shard_sizes, self.shard_table = sizes, table
        if flip_labels is None:
            flip_labels = torch.zeros(self.num_workers, dtype=torch.bool)
        self.flip_labels = flip_labels
        self._any_flipped = bool(flip_labels.any())
        self._grad = vmap(grad_and_value(task.loss), in_dims=(0, 0, 0))
        self._grad_shared = vmap(grad_and_value(task.loss), in_dims=(None, 0, 0))
        # one contiguous [N, features] table: index_select is ~6× faster than x[idx]
        self._x_flat = x.reshape(len(x), -1).contiguous()

    def sample_indices(self, round: int, workers: torch.Tensor | None = None, *,
                       seed: int | None = None) -> torch.Tensor:
        """Global example indices for round `round`: int64 [M, H, B] (or [len(workers), H, B]).

        `seed` overrides the run seed (meta-training draws many inner runs' batches from
        one cluster); `workers` selects rows of the draw (a worker process computes its own).
        """
        g = round_generator(self.seed if seed is None else seed, round, RoundStream.BATCHES)
        u = torch.rand(self.num_workers, self.local_steps, self.batch_size, generator=g)
        local = (u * self.shard_sizes[:, None, None]).long()
        idx = torch.gather(self.shard_table, 1, local.flatten(1)).view_as(local)
        return idx if workers is None else idx[workers]

    def gather(self, idx: torch.Tensor,
               workers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs [*idx.shape, ...] and labels of the examples `idx` [n, ...] of the rows
        `workers` (all M when None), labels flipped for label-flipping workers."""
        x = self._x_flat.index_select(0, idx.flatten()).view(*idx.shape, *self.x.shape[1:])
        y = self.y[idx]
        if self._any_flipped:
            flip = self.flip_labels if workers is None else self.flip_labels[workers]
            flip = flip.view(-1, *[1] * (y.dim() - 1))
            y = torch.where(flip, self.task.num_classes - 1 - y, y)
        return x, y

    def batches(self, round: int,
                workers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs [M, H, B, ...] and labels [M, H, B] for every worker (or the `workers`
        rows) in this round."""
        return self.gather(self.sample_indices(round, workers), workers)

    def compute(self, params: torch.Tensor, round: int,
                workers: torch.Tensor | None = None) -> WorkerOutput:
        """Every worker's honest update at global parameters `params` [d] (or only the
        rows `workers`, int64: a worker process computes its own row, bit for bit the
        row the simulator computes)."""
        xb, yb = self.batches(round, workers)
        if self.mode == "gradient":
            grads, losses = self._grad_shared(params, xb[:, 0], yb[:, 0])
            return WorkerOutput(grads, losses)
        theta = params.expand(xb.shape[0], -1)
        updates, first_losses = local_sgd(self._grad, theta, xb, yb, self.local_lr)
        return WorkerOutput(updates, first_losses)

    def present(self, round: int, failure_prob: float) -> torch.Tensor:
        """bool [M]: which workers deliver this round when each fails with `failure_prob`."""
        if failure_prob <= 0:
            return torch.ones(self.num_workers, dtype=torch.bool)
        g = round_generator(self.seed, round, RoundStream.FAILURES)
        return torch.rand(self.num_workers, generator=g) >= failure_prob
