"""The settings meta-training runs in, behind one protocol (`MetaEnv`).

    env = GradientEnv(cfg)                     # gradient mode, an attack (RNN / ARNN, Ji 2019)
    env = HeteroEnv(load_dataset("digits"))    # workers with different models (Ji §5.5)
    train, valid = task_envs(cfg)              # gradient mode on tasks drawn from families
    env = LocalSGDEnv(pes_cfg)                 # local SGD, batched over particles (LAgg-A, PES)
    evaluate_aggregator(agg, env, seeds, horizons)          # any of them

Every env has a `task` (the trained model), its `data`, `num_workers` (the learned
aggregator's input width), `seed_streams` (the `MetaStream`s its training and validation
model seeds come from) and a `label`; `describe()` is what the saved aggregator records.

The gradient-mode envs also run one inner problem at a time for BPTT:
`inner(seed, aggregator)` starts one (its workers and server), `round_inputs(...)` gives
the round's rows as the server's aggregator sees them (computed at θ detached: no
meta-gradient flows through the workers), and `batch_loss(...)` the meta-loss at θ,
differentiably. The local-SGD env runs many inner problems at once instead: `batches`
and `local_sgd` take a leading particle dimension.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch.func import grad_and_value, vmap

from metagg.aggregators.base import Aggregator, RoundContext
from metagg.attacks import make_attack
from metagg.cluster import (
    PAPER_GROUPS,
    Cluster,
    HeteroCluster,
    WorkerGroup,
    local_sgd,
    prefix_correspondence,
    worker_coverage,
)
from metagg.config.engine import Section, option
from metagg.config.meta import MetaTrainConfig, MetaTrainPESConfig, dataset_spec
from metagg.data import Dataset, load_dataset, partition
from metagg.models import build_model
from metagg.seeding import MetaStream, derive_seed, server_sample_generator
from metagg.server import Server
from metagg.tasks import Task, TrustedData, mlp_grad_fn
from metagg.tasks.families import TaskSpec, family_names, sample_tasks

__all__ = [
    "GradientEnv",
    "GradientRun",
    "HeteroConfig",
    "HeteroEnv",
    "LocalSGDEnv",
    "MetaEnv",
    "TaskEnvs",
    "load_task_data",
    "task_envs",
]


class MetaEnv(Protocol):
    """What every meta-training setting offers (see the module docstring)."""

    task: Task
    data: Dataset
    num_workers: int
    seed_streams: tuple[int, int]
    label: str

    def describe(self) -> dict[str, Any]: ...


def load_task_data(dataset: str, data_dir: str | None) -> Dataset:
    """The dataset "NAME" or "NAME@SIZE" (SIZE×SIZE area-downsampled images)."""
    name, size = dataset_spec(dataset)
    return load_dataset(name, data_dir=data_dir, image_size=size)


# --------------------------------------------------------------------------- gradient mode


@dataclass
class GradientRun:
    """One inner problem of a gradient-mode env: its workers and its server."""

    cluster: Cluster
    server: Server


class GradientEnv:
    """Gradient mode on one task, honest or under one attack (Ji et al. 2019 §4).

    Workers 0..b−1 are Byzantine; the server's trusted sample (for the ARNN) is drawn as
    in the simulator. `attack`, `attack_options` and `num_byzantine` override the
    config's (one env per attack of a mixture).
    """

    def __init__(self, cfg: MetaTrainConfig, data: Dataset | None = None, *,
                 attack: str | None = None, attack_options: dict[str, Any] | None = None,
                 num_byzantine: int | None = None):
        self.cfg = cfg
        self.data = data if data is not None else load_task_data(cfg.dataset, cfg.data_dir)
        ds = self.data
        self.task = Task(build_model(cfg.model, ds.input_shape, ds.num_classes),
                         num_classes=ds.num_classes)
        self.num_workers = m = cfg.num_workers
        self.shards = partition(ds.y_train, m, cfg.partition, seed=cfg.seed, alpha=cfg.alpha)
        self.label = attack if attack is not None else cfg.attack
        options = attack_options if attack_options is not None else cfg.attack_options
        self.attack = make_attack(self.label, **options)
        b = cfg.num_byzantine if num_byzantine is None else num_byzantine
        self.byzantine = torch.arange(b)
        self.honest = torch.ones(m, dtype=torch.bool)
        self.honest[self.byzantine] = False
        self.flip = torch.zeros(m, dtype=torch.bool)
        if self.attack.flips_labels:
            self.flip[self.byzantine] = True
        self.trusted = None
        if cfg.trusted_samples > 0:
            idx = torch.randperm(len(ds.y_train), generator=server_sample_generator(cfg.seed))
            idx = idx[: cfg.trusted_samples]
            self.trusted = TrustedData(self.task, ds.x_train[idx], ds.y_train[idx])
        self.seed_streams = (int(MetaStream.TRAIN_INIT), int(MetaStream.VALID_INIT))
        self._batch_losses = vmap(self.task.loss, in_dims=(None, 0, 0))

    def describe(self) -> dict[str, Any]:
        return {"dim": self.task.dim, "dataset_name": self.data.name,
                "seed_streams": list(self.seed_streams)}

    def inner(self, seed: int, aggregator: Aggregator) -> GradientRun:
        """A fresh inner problem: workers with the minibatch stream of `seed`, and a
        server (for the attack, whose randomness also follows `seed`)."""
        cluster = Cluster(self.task, self.data.x_train, self.data.y_train, self.shards,
                          batch_size=self.cfg.batch_size, seed=seed, flip_labels=self.flip)
        server = Server(aggregator, num_workers=self.num_workers, layout=self.task.layout,
                        attack=self.attack, byzantine=self.byzantine, seed=seed,
                        trusted=self.trusted)
        return GradientRun(cluster, server)

    def round_inputs(self, run: GradientRun, theta: torch.Tensor, t: int,
                     agg_state: Any) -> tuple[torch.Tensor, RoundContext]:
        """(rows [n, d], context) of round t: the workers' updates at θ detached, passed
        through the server's round (attack, missing and non-finite rows)."""
        with torch.no_grad():
            out = run.cluster.compute(theta.detach(), t)
            present = torch.ones(self.num_workers, dtype=torch.bool)
            rows, ids = run.server.receive(out.updates, present, out.losses, round=t,
                                           params=theta.detach(), agg_state=agg_state)
        return rows, run.server.context(ids, round=t, params=theta)

    def batch_loss(self, run: GradientRun, theta: torch.Tensor, t: int) -> torch.Tensor:
        """Mean honest-worker loss at θ on round t's minibatches; differentiable in θ."""
        xb, yb = run.cluster.batches(t)
        return self._batch_losses(theta, xb[self.honest, 0], yb[self.honest, 0]).mean()


class TaskEnvs(Sequence):
    """Gradient-mode envs on drawn tasks: env i runs `specs[i]` (its dataset, class subset,
    model, batch size and partition) with the config's M workers, the RNN's input width.
    Built when first met and only a few kept: the datasets of 32 tasks need not all be
    in memory at once, and a meta-iteration meets one task."""

    def __init__(self, cfg: MetaTrainConfig, specs: Sequence[TaskSpec], *,
                 keep: int = 4):
        self.cfg, self.specs, self.keep = cfg, tuple(specs), keep
        self.num_workers = cfg.num_workers
        self._built: OrderedDict[int, GradientEnv] = OrderedDict()

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> GradientEnv:  # type: ignore[override]
        if i in self._built:
            self._built.move_to_end(i)
            return self._built[i]
        spec = self.specs[i]  # IndexError ends iteration
        cfg = dataclasses.replace(self.cfg, dataset=spec.dataset, model=spec.model,
                                  batch_size=spec.batch_size, partition=spec.partition,
                                  alpha=spec.alpha, tasks=None)
        env = GradientEnv(cfg, spec.load(cfg.data_dir))
        env.label = spec.name  # validation keys its means by env label
        self._built[i] = env
        if len(self._built) > self.keep:
            self._built.popitem(last=False)
        return env

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]


def task_envs(cfg: MetaTrainConfig) -> tuple[TaskEnvs, TaskEnvs]:
    """(training, validation) envs of a multi-task run: `cfg.num_tasks` tasks drawn from
    the families `cfg.tasks`, and `cfg.validation_tasks` further draws (another seed
    stream, as LAgg-A's multi-task PES: never a training draw, never a held-out task)."""
    families = family_names(cfg.tasks)
    train = sample_tasks(families, cfg.num_tasks, cfg.seed)
    valid = sample_tasks(families, cfg.validation_tasks,
                         derive_seed(cfg.seed, MetaStream.VALID_TASKS, 0))
    return TaskEnvs(cfg, train), TaskEnvs(cfg, valid, keep=len(valid))  # validation: all kept


# --------------------------------------------------------------------------- worker groups


def _active_groups(groups: tuple[WorkerGroup, ...]):
    def check(active: tuple[int, ...] | None) -> str | None:
        if active is not None and (not active or any(not 0 <= g < len(groups) for g in active)):
            return f"must be a non-empty subset of 0..{len(groups) - 1}, got {list(active)}"
        return None

    return check


@dataclass
class HeteroConfig(Section):
    """What a heterogeneous run depends on (recorded beside a meta-trained aggregator)."""

    groups: tuple[WorkerGroup, ...] = PAPER_GROUPS
    target_model: str = "mlp:20:sigmoid"
    batch_size: int = option(32, ge=1)
    partition: str = "iid"
    seed: int = option(0, ge=0)  # data partition
    private_lr: float = option(1.0, ge=0)
    active_groups: tuple[int, ...] | None = None  # None: every group sends

    def problems(self) -> list[str]:
        if not self.groups:
            return ["groups: need at least one worker group"]
        problem = _active_groups(self.groups)(self.active_groups)
        return [f"active_groups: {problem}"] if problem else []

    @property
    def num_workers(self) -> int:
        """M, all groups' workers (the aggregator's input width)."""
        return sum(g.num_workers for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["groups"] = [asdict(g) for g in self.groups]
        return out


class HeteroEnv:
    """Ji et al. 2019 §5.5: worker groups with different models feed one aggregator that
    updates the target model (the mapping rule is `metagg.cluster.HeteroCluster`'s).
    The target is trained; losses and accuracies are the target's."""

    def __init__(self, data: Dataset, groups: Sequence[WorkerGroup] = PAPER_GROUPS,
                 **options: Any):
        self.cfg = HeteroConfig(groups=tuple(groups), **options)
        self.data = data
        shape, classes = data.input_shape, data.num_classes
        self.task = Task(build_model(self.cfg.target_model, shape, classes), num_classes=classes)
        self.group_tasks = [Task(build_model(g.model, shape, classes), num_classes=classes)
                            for g in self.cfg.groups]
        self.num_workers = self.cfg.num_workers
        self.shards = partition(data.y_train, self.num_workers, self.cfg.partition,
                                seed=self.cfg.seed)
        maps = [prefix_correspondence(self.task.layout, t.layout) for t in self.group_tasks]
        self.coverage = worker_coverage(maps, self.cfg.groups)
        active = self.cfg.active_groups or range(len(self.cfg.groups))
        self.active = torch.zeros(self.num_workers, dtype=torch.bool)
        for i in active:
            start = sum(g.num_workers for g in self.cfg.groups[:i])
            self.active[start : start + self.cfg.groups[i].num_workers] = True
        # apart from the homogeneous streams, so a seed is never used by both
        self.seed_streams = (int(MetaStream.HETERO_TRAIN_INIT), int(MetaStream.HETERO_VALID_INIT))
        self.label = "hetero"
        self._batch_losses = vmap(self.task.loss, in_dims=(None, 0, 0))

    def describe(self) -> dict[str, Any]:
        return {"setting": "hetero", "hetero": self.cfg.to_dict(), "dim": self.task.dim,
                "dataset": self.data.name, "num_workers": self.num_workers,
                "model": self.cfg.target_model, "seed_streams": list(self.seed_streams)}

    def inner(self, seed: int, aggregator: Aggregator) -> HeteroCluster:
        """Fresh workers (private coordinates re-initialised) with seed-dependent batches."""
        return HeteroCluster(self.task, self.cfg.groups, self.group_tasks, self.data.x_train,
                             self.data.y_train, self.shards, batch_size=self.cfg.batch_size,
                             seed=seed, private_lr=self.cfg.private_lr)

    def round_inputs(self, run: HeteroCluster, theta: torch.Tensor, t: int,
                     agg_state: Any) -> tuple[torch.Tensor, RoundContext]:
        """(rows [n, d], context) of the active groups in round t, at θ detached."""
        out = run.compute(theta, t, self.cfg.active_groups)
        return out.updates, RoundContext(round=t, params=theta, layout=self.task.layout,
                                         num_workers=self.num_workers,
                                         worker_ids=out.worker_ids, coverage=self.coverage)

    def batch_loss(self, run: HeteroCluster, theta: torch.Tensor, t: int) -> torch.Tensor:
        """The target model's mean loss on the active workers' round-t minibatches
        (the meta-loss; differentiable in θ)."""
        xb, yb = run.batches(t)
        return self._batch_losses(theta, xb[self.active, 0], yb[self.active, 0]).mean()


# --------------------------------------------------------------------------- local SGD


class LocalSGDEnv:
    """The local-SGD task LAgg-A / LOpt-A are meta-trained and validated on.

    One `Cluster` (local-SGD mode) on the fixed partition into K shards draws every
    inner run's minibatches (`sample_indices(..., seed=run seed)`, as the simulator
    draws them); `local_sgd` runs the workers of many particles as one batch.
    """

    def __init__(self, cfg: MetaTrainPESConfig, data: Dataset | None = None):
        self.cfg = cfg
        self.data = data if data is not None else load_task_data(cfg.dataset, cfg.data_dir)
        self.task = Task(build_model(cfg.model, self.data.input_shape, self.data.num_classes),
                         num_classes=self.data.num_classes)
        self.num_workers = cfg.num_workers
        shards = partition(self.data.y_train, cfg.num_workers, cfg.partition, seed=cfg.seed,
                           alpha=cfg.alpha)
        self.cluster = Cluster(self.task, self.data.x_train, self.data.y_train, shards,
                               batch_size=cfg.batch_size, mode="local_sgd",
                               local_steps=cfg.local_steps, local_lr=cfg.local_lr, seed=cfg.seed)
        # ln C: an untrained classifier's loss, the unit losses of different tasks share
        self.loss_scale = math.log(self.data.num_classes)
        self.loss_max = cfg.loss_clip * self.loss_scale
        self.autograd = vmap(grad_and_value(self.task.loss), in_dims=(0, 0, 0))
        self.grad_fn = mlp_grad_fn(self.task) or self.autograd
        self.seed_streams = (int(MetaStream.TRAIN_INIT), int(MetaStream.VALID_INIT))
        self.label = "local_sgd"

    @property
    def dim(self) -> int:
        return self.task.dim

    def describe(self) -> dict[str, Any]:
        return {"dim": self.task.dim, "dataset_name": self.data.name}

    def batches(self, seeds: Sequence[int], rounds: Sequence[int],
                repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs [repeat·n, K, H, B, ...] and labels [repeat·n, K, H, B]: run i's
        minibatches of its round, the n runs repeated `repeat` times."""
        idx = torch.stack([self.cluster.sample_indices(t, seed=s)
                           for s, t in zip(seeds, rounds, strict=True)])
        x, y = self.cluster.gather(idx)
        if repeat > 1:  # gather once, copy contiguously (a random gather costs ~3× more)
            x = x.repeat(repeat, *[1] * (x.dim() - 1))
            y = y.repeat(repeat, *[1] * (y.dim() - 1))
        return x, y

    def local_sgd(self, theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
                  lr: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every particle's K workers' updates θ − θ_k [P, K, d] and their mean loss at θ
        [P]; θ [P, d], batches [P, K, H, B, ...], `lr` each particle's local lr [P]
        (None: cfg.local_lr). The simulator's `local_sgd`, batched."""
        p, k = xb.shape[:2]
        theta_k = theta[:, None].expand(p, k, theta.shape[1]).reshape(p * k, -1)
        worker_lr: Any = self.cfg.local_lr
        if lr is not None:  # one lr per particle, shared by its K workers
            worker_lr = lr.to(theta.dtype).repeat_interleave(k)[:, None]
        updates, first = local_sgd(self.grad_fn, theta_k, xb.flatten(0, 1), yb.flatten(0, 1),
                                   worker_lr)
        return updates.view(p, k, -1), first.view(p, k).mean(1)

    def round_meta_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """A round's meta-loss from the workers' mean loss: the clipped loss, or with
        cfg.meta_loss "log" log((clipped + 1e-3·ln C) / ln C)."""
        clipped = self.clip_loss(loss)
        if self.cfg.meta_loss == "log":
            return torch.log((clipped + 1e-3 * self.loss_scale) / self.loss_scale)
        return clipped

    def clip_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Per-round meta-loss: clipped to [0, loss_max], NaN/inf → loss_max."""
        m = self.loss_max
        return torch.nan_to_num(loss, nan=m, posinf=m, neginf=m).clamp(0.0, m)
