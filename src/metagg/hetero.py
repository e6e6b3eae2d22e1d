"""Heterogeneous worker groups feeding one aggregator (Ji et al. 2019 §5.5).

    env = HeteroEnv(load_dataset("digits"), PAPER_GROUPS)      # 4 models x 3 workers
    agg = load_aggregator("runs/hetero-rnn")                   # an RNN with 12 input slots
    evaluate_aggregator(agg, env, seeds=[100], horizons=(100, 400))

Ji §5.5 feeds gradients from workers with *different* local models (MLP 20 and 40
sigmoid, MLP 2x20 sigmoid, MLP 20 ReLU; 3 workers each) into one RNN aggregator
that updates an MLP20-sigmoid, and does not say how a gradient of one model
becomes an update of another. The rule used here (document it wherever results
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
   the `coverage_mean` aggregator averages each coordinate over the workers that cover it.
   In the paper's four groups every target coordinate is covered by every group
   (the target is the smallest model), so masking only matters for smaller groups.

Workers are IID shards of the training set (one shard per worker, all groups
together: 12 shards for 4 x 3 workers); minibatches come from one `Cluster`
sampler, so a round's batches are a function of (seed, round) as elsewhere. Within
a group all workers are one `vmap(grad)` call; the only Python loop is over groups.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from metagg.aggregators.base import Aggregator, RoundContext
from metagg.cluster import Cluster
from metagg.data import Dataset, partition
from metagg.layout import ParamLayout
from metagg.models import build_model
from metagg.seeding import MetaStream, derive_seed
from metagg.tasks import Task

__all__ = [
    "PAPER_GROUPS",
    "Correspondence",
    "HeteroCluster",
    "HeteroConfig",
    "HeteroEnv",
    "HeteroMetaConfig",
    "HeteroOutput",
    "WorkerGroup",
    "meta_train_hetero",
    "prefix_correspondence",
]


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


def _worker_coverage(maps: Sequence[Correspondence],
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

    Args:
        target: the model the server trains.
        groups: the worker groups; workers are numbered group by group.
        tasks: one `Task` per group (its model; built by `HeteroEnv`).
        x, y: the training set; shards: one index tensor per worker (M in all).
        batch_size: minibatch size per worker.
        seed: minibatch streams (as `Cluster`) and the groups' private initialisations.
        private_lr: SGD step of each group's private coordinates (0 freezes them).

    State: each group's private coordinates, updated by every `compute` call, so
    a fresh cluster per run (see `HeteroEnv.cluster`).
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
        return _worker_coverage(self.maps, self.groups)

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


# --------------------------------------------------------------------------- environment


@dataclass
class HeteroConfig:
    """What a heterogeneous run depends on (recorded beside a meta-trained aggregator)."""

    groups: tuple[WorkerGroup, ...] = PAPER_GROUPS
    target_model: str = "mlp:20:sigmoid"
    batch_size: int = 32
    partition: str = "iid"
    seed: int = 0  # data partition
    private_lr: float = 1.0
    active_groups: tuple[int, ...] | None = None  # None: every group sends

    def __post_init__(self) -> None:
        self.groups = tuple(self.groups)
        if not self.groups:
            raise ValueError("need at least one worker group")
        if self.active_groups is not None:
            self.active_groups = tuple(self.active_groups)
            bad = [g for g in self.active_groups if not 0 <= g < len(self.groups)]
            if bad or not self.active_groups:
                raise ValueError(f"active_groups must be a non-empty subset of "
                                 f"0..{len(self.groups) - 1}, got {self.active_groups}")

    @property
    def num_workers(self) -> int:
        """M, all groups' workers (the aggregator's input width)."""
        return sum(g.num_workers for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["groups"] = [asdict(g) for g in self.groups]
        return out


class HeteroEnv:
    """The §5.5 setting behind the interface of `metagg.learned.MetaEnv`, so that
    `evaluate_aggregator` and `unroll_meta_loss` run on it unchanged.

    The target model is trained; `train_loss` / `test_accuracy` are the target's.
    """

    def __init__(self, data: Dataset, groups: Sequence[WorkerGroup] = PAPER_GROUPS,
                 **options: Any):
        self.cfg = HeteroConfig(groups=tuple(groups), **options)
        self.data = data
        shape, classes = data.input_shape, data.num_classes
        self.task = Task(build_model(self.cfg.target_model, shape, classes), num_classes=classes)
        self.group_tasks = [Task(build_model(g.model, shape, classes), num_classes=classes)
                            for g in self.cfg.groups]
        self.shards = partition(data.y_train, self.cfg.num_workers, self.cfg.partition,
                                seed=self.cfg.seed)
        maps = [prefix_correspondence(self.task.layout, t.layout) for t in self.group_tasks]
        self.coverage = _worker_coverage(maps, self.cfg.groups)
        active = self.cfg.active_groups or range(len(self.cfg.groups))
        self.active = torch.zeros(self.cfg.num_workers, dtype=torch.bool)
        for i in active:
            start = sum(g.num_workers for g in self.cfg.groups[:i])
            self.active[start : start + self.cfg.groups[i].num_workers] = True
        self.trusted = None
        self._batch_losses = vmap(self.task.loss, in_dims=(None, 0, 0))

    @property
    def dim(self) -> int:
        return self.task.dim

    def cluster(self, seed: int) -> HeteroCluster:
        """Fresh workers (private coordinates re-initialised) with seed-dependent batches."""
        return HeteroCluster(self.task, self.cfg.groups, self.group_tasks, self.data.x_train,
                             self.data.y_train, self.shards, batch_size=self.cfg.batch_size,
                             seed=seed, private_lr=self.cfg.private_lr)

    def worker_round(self, cluster: HeteroCluster, theta: torch.Tensor,
                     t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(updates [n, d], worker_ids [n]) of the active groups in round t, at θ detached."""
        out = cluster.compute(theta, t, self.cfg.active_groups)
        return out.updates, out.worker_ids

    def context(self, theta: torch.Tensor, worker_ids: torch.Tensor, t: int) -> RoundContext:
        return RoundContext(round=t, params=theta, layout=self.task.layout,
                            num_workers=self.cfg.num_workers, worker_ids=worker_ids,
                            coverage=self.coverage)

    def batch_loss(self, cluster: HeteroCluster, theta: torch.Tensor, t: int) -> torch.Tensor:
        """The target model's mean loss on the active workers' round-t minibatches
        (the meta-loss; differentiable in θ)."""
        xb, yb = cluster.batches(t)
        return self._batch_losses(theta, xb[self.active, 0], yb[self.active, 0]).mean()

    def train_loss(self, theta: torch.Tensor) -> float:
        return self.task.evaluate(theta, self.data.x_train, self.data.y_train)["loss"]

    def test_accuracy(self, theta: torch.Tensor) -> float:
        return self.task.evaluate(theta, self.data.x_test, self.data.y_test)["accuracy"]


# --------------------------------------------------------------------------- meta-training

# meta_train_hetero's model-init streams (recorded as trained_on["seed_streams"] so
# evaluations can check their seeds are disjoint).
TRAIN_STREAM, VALID_STREAM = MetaStream.HETERO_TRAIN_INIT, MetaStream.HETERO_VALID_INIT


@dataclass
class HeteroMetaConfig:
    """Truncated-BPTT settings for `meta_train_hetero` (as `MetaTrainConfig`'s)."""

    iterations: int = 200
    unroll: int = 100
    truncation: int = 20
    lr: float = 1e-3
    clip: float = 1.0
    seed: int = 0
    cell: str = "lstm"
    validate_every: int = 20
    validation_seeds: int = 2
    extra: dict[str, Any] = field(default_factory=dict)  # other RNNConfig fields


def meta_train_hetero(
    env: HeteroEnv,
    cfg: HeteroMetaConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Aggregator:
    """Meta-train an RNN aggregator with M = env.cfg.num_workers input slots on `env`.

    The recipe of `metagg.learned.meta_bptt` (fresh model init per meta-iteration,
    worker gradients detached, meta-loss Σ_t target loss at θ_{t+1}, Adam, clipping,
    the φ with the best mean log train loss on validation seeds kept), written
    against the env interface because `meta_train` builds its own `MetaEnv`.
    Written with `metagg.learned.rnn.save_rnn` to `out_dir` if given.
    """
    from metagg.learned.meta_bptt import evaluate_aggregator, unroll_meta_loss
    from metagg.learned.rnn import CoordinateRNN, RNNAggregator, RNNConfig, save_rnn

    cfg = cfg or HeteroMetaConfig()
    rnn_cfg = RNNConfig(num_workers=env.cfg.num_workers, cell=cfg.cell, **cfg.extra)
    net = CoordinateRNN(rnn_cfg, seed=cfg.seed)
    agg = RNNAggregator(rnn_cfg, net, differentiable=True)
    frozen = RNNAggregator(rnn_cfg, net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    val_seeds = [derive_seed(cfg.seed, VALID_STREAM, j) for j in range(cfg.validation_seeds)]
    best: dict[str, Any] = {"score": math.inf, "iteration": 0, "phi": None}
    start = time.perf_counter()

    def validate(iteration: int) -> None:
        res = evaluate_aggregator(frozen, env, val_seeds, (cfg.unroll,))
        losses = res[f"loss@{cfg.unroll}"]
        score = (sum(math.log(max(v, 1e-30)) for v in losses) / len(losses)
                 if all(math.isfinite(v) for v in losses) else math.inf)
        if score < best["score"]:
            best.update(score=score, iteration=iteration, loss=res[f"mean_loss@{cfg.unroll}"],
                        phi={k: v.detach().clone() for k, v in net.state_dict().items()})
        if log:
            log(f"hetero meta-train {iteration}/{cfg.iterations}: validation score {score:.3f} "
                f"(best {best['score']:.3f} at {best['iteration']}, "
                f"{time.perf_counter() - start:.0f} s)")

    validate(0)
    for k in range(cfg.iterations):
        seed = derive_seed(cfg.seed, TRAIN_STREAM, k)
        theta, cluster = env.task.init_params(seed), env.cluster(seed)
        state = agg.init(env.task.layout, env.cfg.num_workers)
        for s in range(0, cfg.unroll, cfg.truncation):
            span = range(s, min(s + cfg.truncation, cfg.unroll))
            loss, theta, state = unroll_meta_loss(agg, env, cluster, theta, state, span)
            if not torch.isfinite(loss):
                break  # diverged: drop the rest of this unroll
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not torch.isfinite(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)):
                break  # a non-finite meta-gradient would poison φ and Adam
            opt.step()
            theta, state = theta.detach(), state.detach()
        if (k + 1) % cfg.validate_every == 0 or k + 1 == cfg.iterations:
            validate(k + 1)
    if best["phi"] is not None:
        net.load_state_dict(best["phi"])
    result = RNNAggregator(rnn_cfg, net.requires_grad_(False))
    if out_dir is not None:
        trained_on = {"setting": "hetero", "hetero": env.cfg.to_dict(), **asdict(cfg),
                      "num_workers": env.cfg.num_workers, "dataset": env.data.name,
                      "dim": env.dim, "meta_gradient": "truncated_bptt",
                      "seed_streams": [int(TRAIN_STREAM), int(VALID_STREAM)],
                      "model": env.cfg.target_model}
        validation = {"best_iteration": best["iteration"], "score": best["score"],
                      "score_definition": "mean over seeds of log(train loss at unroll)",
                      f"mean_loss@{cfg.unroll}": best.get("loss")}
        save_rnn(out_dir, result, trained_on=trained_on, validation=validation)
    return result
