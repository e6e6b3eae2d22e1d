"""Simulated workers, all computed at once with `torch.func.vmap`.

Each of the M workers holds a shard of the training set. Per round:

- gradient mode: worker k sends its minibatch gradient g_k at θ;
- local-SGD mode: worker k takes H SGD steps from θ on its own minibatches and
  sends the pseudo-gradient θ − θ_k (FedOpt sign convention).

The honest work is one vmapped `grad` call per local step, never a Python loop
over workers. Compiled (the default for runs of >= 1000 worker steps: `metagg.compiling`),
the whole worker round — H local steps of every worker, or the gradient — is one program
per shape, with the hand-written MLP backward (`mlp_grad_fn`) where the model is a
metagg MLP; `--no-compile` runs the vmapped autograd eagerly, the reference the
compiled round agrees with to float rounding (~1e-7 per round).

Every random choice of round t (minibatches, who is missing) comes from a generator
seeded by (seed, t), so a round is a pure function of the seed, the round index and θ:
runs are reproducible, resumable from a checkpoint, and a distributed worker can draw
exactly the batch the simulator would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from metagg.compiling import compile_enabled, compile_or_eager
from metagg.layout import ParamLayout
from metagg.seeding import MetaStream, RoundStream, derive_seed, round_generator
from metagg.tasks import Task, mlp_grad_fn

__all__ = [
    "PAPER_GROUPS",
    "Cluster",
    "Correspondence",
    "GradFn",
    "HeteroCluster",
    "HeteroOutput",
    "WorkerGroup",
    "WorkerOutput",
    "local_sgd",
    "prefix_correspondence",
    "worker_coverage",
]

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


def compiled_round(grad_fn: GradFn, mode: str) -> Callable[..., tuple[torch.Tensor,
                                                                        torch.Tensor]]:
    """The workers' round as one compiled program (eager with a warning if compiling
    fails): local-SGD mode `fn(θ [N, d], xb, yb, lr 0-dim tensor)` -> `local_sgd`'s
    output; gradient mode `fn(params [d], x [N, B, ...], y [N, B])` -> (grads, losses).

    The learning rate is a tensor so that runs with another lr reuse the compiled code
    (a Python float would be a constant of the program: one compile per value, and
    torch falls back to eager after 8).
    """
    if mode == "local_sgd":
        def local_round(theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
                        lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return local_sgd(grad_fn, theta, xb, yb, lr)  # type: ignore[arg-type]
        return compile_or_eager(local_round)

    def gradient_round(params: torch.Tensor, x: torch.Tensor,
                       y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_fn(params.expand(x.shape[0], -1), x, y)
    return compile_or_eager(gradient_round)


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
        compile: run the round compiled (see the module docstring); None:
            `metagg.compiling.compile_enabled()`.
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
        compile: bool | None = None,
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
        self.compiled = compile_enabled() if compile is None else bool(compile)
        self._compiled_round: Callable[..., Any] | None = None  # built at the first round
        self._lr = torch.tensor(float(local_lr), dtype=torch.float32)
        self._lr_value = float(local_lr)
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
                workers: torch.Tensor | None = None, *,
                lr: float | None = None) -> WorkerOutput:
        """Every worker's honest update at global parameters `params` [d] (or only the
        rows `workers`, int64: a worker process computes its own row, bit for bit the
        row the simulator computes). `lr`: this round's local lr (the server's
        `round_local_lr`); None: the configured `local_lr`."""
        lr = self.local_lr if lr is None else float(lr)
        xb, yb = self.batches(round, workers)
        if self.compiled:
            return self._compute_compiled(params, xb, yb, lr)
        if self.mode == "gradient":
            grads, losses = self._grad_shared(params, xb[:, 0], yb[:, 0])
            return WorkerOutput(grads, losses)
        theta = params.expand(xb.shape[0], -1)
        updates, first_losses = local_sgd(self._grad, theta, xb, yb, lr)
        return WorkerOutput(updates, first_losses)

    def _compute_compiled(self, params: torch.Tensor, xb: torch.Tensor,
                          yb: torch.Tensor, lr: float) -> WorkerOutput:
        if self._compiled_round is None:
            # The hand-written MLP backward is ~1.4x faster than vmapped autograd eagerly
            # and compiles in a third of the time; other models compile autograd.
            grad_fn = mlp_grad_fn(self.task) or self._grad
            self._compiled_round = compiled_round(grad_fn, self.mode)
        if self.mode == "gradient":
            return WorkerOutput(*self._compiled_round(params, xb[:, 0], yb[:, 0]))
        if self._lr.device != params.device or self._lr_value != lr:
            # compared as a Python float: reading the tensor back would sync a GPU
            self._lr = torch.tensor(lr, dtype=torch.float32, device=params.device)
            self._lr_value = lr
        theta = params.expand(xb.shape[0], -1)
        return WorkerOutput(*self._compiled_round(theta, xb, yb, self._lr))

    def present(self, round: int, failure_prob: float) -> torch.Tensor:
        """bool [M]: which workers deliver this round when each fails with `failure_prob`."""
        if failure_prob <= 0:
            return torch.ones(self.num_workers, dtype=torch.bool)
        g = round_generator(self.seed, round, RoundStream.FAILURES)
        return torch.rand(self.num_workers, generator=g) >= failure_prob


# --------------------------------------------------------------------------- worker groups


@dataclass(frozen=True)
class WorkerGroup:
    """`num_workers` workers that all hold a model built from the spec `model`."""

    model: str
    num_workers: int

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or \
                self.num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {self.num_workers!r}")


#: Ji §5.5: four systems, 3 workers chosen from each, feeding one MLP20-sigmoid.
PAPER_GROUPS: tuple[WorkerGroup, ...] = (
    WorkerGroup("mlp:20:sigmoid", 3),
    WorkerGroup("mlp:40:sigmoid", 3),
    WorkerGroup("mlp:20,20:sigmoid", 3),
    WorkerGroup("mlp:20:relu", 3),
)


# --------------------------------------------------------------------------- the mapping


@dataclass(frozen=True)
class Correspondence:
    """Which coordinates of a source (group) model are which coordinates of the target.

    `source_index[k]` in the source's flat vector is `target_index[k]` in the
    target's; every other coordinate of either has no counterpart.
    """

    target_index: torch.Tensor  # int64 [k]
    source_index: torch.Tensor  # int64 [k]
    target_size: int
    source_size: int

    @property
    def coverage(self) -> torch.Tensor:
        """bool [target_size]: target coordinates the source model has."""
        mask = torch.zeros(self.target_size, dtype=torch.bool)
        mask[self.target_index] = True
        return mask

    @property
    def shared(self) -> torch.Tensor:
        """bool [source_size]: source coordinates that are target coordinates."""
        mask = torch.zeros(self.source_size, dtype=torch.bool)
        mask[self.source_index] = True
        return mask

    def to_target(self, source: torch.Tensor) -> torch.Tensor:
        """Source vectors [..., source_size] -> target vectors [..., target_size], 0 where
        the source has no counterpart."""
        out = source.new_zeros(*source.shape[:-1], self.target_size)
        out[..., self.target_index] = source[..., self.source_index]
        return out

    def embed(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """`source` [source_size] with its shared coordinates replaced by `target`'s."""
        return source.index_put((self.source_index,), target[self.target_index])


def prefix_correspondence(target: ParamLayout, source: ParamLayout) -> Correspondence:
    """Match tensors by name and number of dimensions; share their leading block.

    For a target tensor of shape (n1, n2, ...) and a source tensor of the same
    name and shape (m1, m2, ...), entry (i1, i2, ...) corresponds when
    i_j < min(n_j, m_j) for every j. Tensors without a same-named, same-rank
    partner correspond nowhere.
    """
    t_parts, s_parts = [], []
    for t in target:
        if t.name not in source or len(source[t.name].shape) != len(t.shape):
            continue
        s = source[t.name]
        block = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, s.shape, strict=True))
        t_parts.append(torch.arange(t.offset, t.offset + t.numel).view(t.shape)[block].flatten())
        s_parts.append(torch.arange(s.offset, s.offset + s.numel).view(s.shape)[block].flatten())
    empty = torch.zeros(0, dtype=torch.int64)
    return Correspondence(torch.cat(t_parts) if t_parts else empty,
                          torch.cat(s_parts) if s_parts else empty, target.size, source.size)


# --------------------------------------------------------------------------- the workers


def worker_coverage(maps: Sequence[Correspondence],
                     groups: Sequence[WorkerGroup]) -> torch.Tensor:
    """bool [M, d]: each worker's row is its group's `Correspondence.coverage`."""
    return torch.cat([m.coverage.expand(g.num_workers, -1)
                      for m, g in zip(maps, groups, strict=True)])


@dataclass
class HeteroOutput:
    updates: torch.Tensor  # [n, d] the active workers' updates on the target's coordinates
    worker_ids: torch.Tensor  # int64 [n]: which of the M workers each row is
    losses: torch.Tensor  # [n] each worker's minibatch loss (of its own model)


class HeteroCluster:
    """M workers in groups with different models, updating one target model.

    Ji §5.5 feeds gradients from workers with *different* local models (MLP 20 and 40
    sigmoid, MLP 2x20 sigmoid, MLP 20 ReLU; 3 workers each) into one RNN aggregator that
    updates an MLP20-sigmoid, and does not say how a gradient of one model becomes an
    update of another. The rule used here (document it wherever results
    are reported):

    1. **Correspondence by name and leading block** (`prefix_correspondence`). A
       target tensor and a group tensor correspond when they have the same name
       (`hidden0.weight`, `output.bias`, ... - `metagg.models` keeps names stable
       across sizes) and the same number of dimensions; they share the leading block
       `[:min(n1, m1), :min(n2, m2), ...]` (the first hidden units, the first inputs).
       MLP40 -> MLP20: hidden units 0-19 of the 40 are the target's 20 units (their
       input weights and biases, and the output weights leaving them). MLP 2x20 ->
       MLP20: `hidden0.*` and `output.*` correspond (the group's output layer reads
       `hidden1` where the target's reads `hidden0`: the correspondence is structural,
       not functional); `hidden1.*` has no counterpart. MLP20-ReLU -> MLP20-sigmoid:
       every tensor, one to one.
    2. **Workers compute at the target's parameters** (anchoring). A group's
       workers evaluate their own model with the shared coordinates set to the
       target's current θ; the group's *private* coordinates (those with no target
       counterpart, e.g. hidden units 20-39) are the group's own, trained by the
       group itself with mean + SGD (`private_lr`) on its workers' gradients - the
       group's own small distributed system. So every gradient that reaches the
       aggregator is a partial derivative of some model's loss with respect to the
       target's actual parameter values, and a group whose model equals the target's
       sends exactly the gradients a homogeneous `Cluster` would.
    3. **Missing coordinates are zero and masked**. A worker's update on a target
       coordinate its model does not have is 0 and marked uncovered in `coverage`
       [M, d]. The coordinatewise RNN reads a 0 as "no input from this worker here"
       (its preprocessing keeps exact zeros at 0, as for a missing worker), and
       the `coverage_mean` aggregator averages each coordinate over the workers that
       cover it.
       In the paper's four groups every target coordinate is covered by every group
       (the target is the smallest model), so masking only matters for smaller groups.

    Workers are IID shards of the training set (one shard per worker, all groups
    together: 12 shards for 4 x 3 workers); minibatches come from one `Cluster`
    sampler, so a round's batches are a function of (seed, round) as elsewhere. Within
    a group all workers are one `vmap(grad)` call; the only Python loop is over groups.

    Args:
        target: the model the server trains.
        groups: the worker groups; workers are numbered group by group.
        tasks: one `Task` per group (its model).
        x, y: the training set; shards: one index tensor per worker (M in all).
        batch_size: minibatch size per worker.
        seed: minibatch streams (as `Cluster`) and the groups' private initialisations.
        private_lr: SGD step of each group's private coordinates (0 freezes them).

    State: each group's private coordinates, updated by every `compute` call, so
    a fresh cluster per run.
    """

    def __init__(self, target: Task, groups: Sequence[WorkerGroup], tasks: Sequence[Task],
                 x: torch.Tensor, y: torch.Tensor, shards: Sequence[torch.Tensor], *,
                 batch_size: int, seed: int = 0, private_lr: float = 1.0):
        if len(tasks) != len(groups):
            raise ValueError(f"need one task per group, got {len(tasks)} for {len(groups)}")
        total = sum(g.num_workers for g in groups)
        if len(shards) != total:
            raise ValueError(f"need one shard per worker ({total}), got {len(shards)}")
        if not private_lr >= 0:
            raise ValueError(f"private_lr must be >= 0, got {private_lr}")
        self.target, self.groups, self.tasks = target, tuple(groups), tuple(tasks)
        self.num_workers = total
        self.seed, self.private_lr = seed, private_lr
        # The sampler only draws minibatches (the target's vmapped grads go unused), so
        # batches are exactly those a homogeneous Cluster with these shards would draw.
        self.sampler = Cluster(target, x, y, shards, batch_size=batch_size, seed=seed)
        self.maps = [prefix_correspondence(target.layout, t.layout) for t in tasks]
        starts = [0]
        for g in groups:
            starts.append(starts[-1] + g.num_workers)
        self.rows = [slice(a, b) for a, b in itertools.pairwise(starts)]
        self._grads = [vmap(grad_and_value(t.loss), in_dims=(None, 0, 0)) for t in tasks]
        # Private coordinates start at the group model's own init, seeded per (seed, group).
        self.private = [t.init_params(derive_seed(seed, MetaStream.HETERO_GROUP_INIT, i))
                        for i, t in enumerate(tasks)]

    @property
    def coverage(self) -> torch.Tensor:
        """bool [M, d]: which target coordinates each worker's model has."""
        return worker_coverage(self.maps, self.groups)

    def batches(self, round: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs [M, 1, B, ...] and labels [M, 1, B] of every worker in round `round`."""
        return self.sampler.batches(round)

    @torch.no_grad()
    def compute(self, params: torch.Tensor, round: int,
                groups: Sequence[int] | None = None) -> HeteroOutput:
        """The active groups' workers' gradients at the target's `params`, on its coordinates.

        `groups`: indices of the groups that send (default all). Inactive groups
        compute nothing and their private coordinates stay as they are.
        """
        theta = params.detach()
        xb, yb = self.batches(round)
        active = range(len(self.groups)) if groups is None else groups
        updates, ids, losses = [], [], []
        for i in active:
            rows, cmap = self.rows[i], self.maps[i]
            local = cmap.embed(theta, self.private[i])  # anchored at the target's θ
            grads, loss = self._grads[i](local, xb[rows, 0], yb[rows, 0])
            if self.private_lr > 0:  # the group trains its private coordinates itself
                own = local - self.private_lr * grads.mean(0)
                self.private[i] = torch.where(cmap.shared, local, own)
            updates.append(cmap.to_target(grads))
            ids.append(torch.arange(rows.start, rows.stop))
            losses.append(loss)
        return HeteroOutput(torch.cat(updates), torch.cat(ids), torch.cat(losses))
