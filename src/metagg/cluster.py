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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import grad_and_value, vmap

from metagg.seeding import RoundStream, round_generator
from metagg.tasks import Task

__all__ = ["Cluster", "WorkerOutput"]


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

    def sample_indices(self, round: int) -> torch.Tensor:
        """Global example indices for round `round`: int64 [M, H, B]."""
        g = round_generator(self.seed, round, RoundStream.BATCHES)
        u = torch.rand(self.num_workers, self.local_steps, self.batch_size, generator=g)
        local = (u * self.shard_sizes[:, None, None]).long()
        return torch.gather(self.shard_table, 1, local.flatten(1)).view_as(local)

    def batches(self, round: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs [M, H, B, ...] and labels [M, H, B] for every worker in this round."""
        idx = self.sample_indices(round)
        xb, yb = self.x[idx], self.y[idx]
        if self._any_flipped:
            flipped = self.task.num_classes - 1 - yb
            yb = torch.where(self.flip_labels[:, None, None], flipped, yb)
        return xb, yb

    def compute(self, params: torch.Tensor, round: int) -> WorkerOutput:
        """Every worker's honest update at global parameters `params` [d]."""
        xb, yb = self.batches(round)
        if self.mode == "gradient":
            grads, losses = self._grad_shared(params, xb[:, 0], yb[:, 0])
            return WorkerOutput(grads, losses)
        local = params.expand(self.num_workers, -1)
        first_losses = None
        for h in range(self.local_steps):
            grads, losses = self._grad(local, xb[:, h], yb[:, h])
            local = local - self.local_lr * grads
            if first_losses is None:
                first_losses = losses
        return WorkerOutput(params - local, first_losses)

    def present(self, round: int, failure_prob: float) -> torch.Tensor:
        """bool [M]: which workers deliver this round when each fails with `failure_prob`."""
        if failure_prob <= 0:
            return torch.ones(self.num_workers, dtype=torch.bool)
        g = round_generator(self.seed, round, RoundStream.FAILURES)
        return torch.rand(self.num_workers, generator=g) >= failure_prob
