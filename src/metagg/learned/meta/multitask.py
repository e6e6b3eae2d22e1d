"""Multi-task PES: one LAgg-A / LOpt-A meta-trained on a distribution of tasks.

    cfg = MetaTrainPESConfig(kind="lagg", step_mode="general", tasks="image-mlp,synthetic")
    est = MultiTaskPES(cfg)                     # an `Estimator` for the outer loop

Learned optimizers that generalise are meta-trained on many tasks, never one (Celo,
Celo2; ../shared/specs/generalization.md). Here the N antithetic pairs of truncated PES
(`metagg.learned.meta.pes`) are split into `task_groups` groups; each group trains on
one task drawn from the families (`metagg.tasks.families`), so its particles share a
model size and run as one vmapped batch (the grouping the issue asks for where shapes
differ). A group keeps its task for one inner run (a log-uniform number of rounds in
[min_inner, max_inner], the same for the group's pairs), then draws the next task; task
number j is `sample_tasks(families, ·, seed)[j]`, so the sequence of tasks is a function
of the seed. Every task's per-round loss is divided by ln C (an untrained classifier's
loss), so tasks with many classes (the LM's 84 characters) do not outweigh the others.

The φ of step_mode "general" has the same shape on every task (its inputs do not depend
on K or the model), which is what lets one estimate average over tasks. Validation runs
φ on `validation_tasks` further draws from the same families (never a held-out task) from
held-out model seeds; the score is the mean over those tasks of the mean log(loss / SlowMo's
loss) at the validation horizons (SlowMo α 0.6, β 0.9 on the same seeds): 0 is SlowMo's
level, negative is better. With task augmentation (`lr_augment` = a > 1) every validation
task also runs with the workers' lr times 1/a and a, each against SlowMo at the same
factor (there computed as the untrained general step, which is SlowMo, tested), so the
best φ is the one that copes with the scales it was trained on, not only with c = 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any, NamedTuple

import torch

from metagg.aggregators import optimizers as opt
from metagg.aggregators.registry import build_aggregator
from metagg.config.meta import MetaTrainPESConfig
from metagg.data import Dataset
from metagg.learned.lagg import AdaMLP, FlatPhi, save_lagg
from metagg.learned.meta.envs import LocalSGDEnv
from metagg.learned.meta.estimators import Estimate
from metagg.learned.meta.evaluate import evaluate_aggregator
from metagg.learned.meta.pes import (
    PES,
    FlatPhiEstimator,
    InnerState,
    lagg_config,
    pes_gradient,
    reset_pairs,
    trainable_mask,
)
from metagg.seeding import MetaStream, derive_seed
from metagg.tasks.families import TaskSpec, family_names, sample_tasks

__all__ = ["MultiTaskPES", "MultiTaskState"]

CACHED_TASKS = 16  # tasks whose env (data + workers) stays built


class MultiTaskState(NamedTuple):
    """What the estimator carries between steps (checkpointed)."""

    accum: torch.Tensor  # [N, n] perturbations since each pair's run started
    groups: tuple[InnerState, ...]  # group g: pairs g·n_g … (g+1)·n_g − 1, on one task
    task: torch.Tensor  # [G] int64: the task number each group trains on
    runs_started: torch.Tensor  # [] int64: inner runs drawn so far (numbers the next)


class MultiTaskPES(FlatPhiEstimator):
    """Truncated PES over a task distribution (see the module docstring)."""

    name = "multitask_pes"
    score_definition = ("mean over validation tasks (and, with lr_augment a, the workers' lr "
                        "factors 1/a, 1, a) of the mean over seeds and horizons of "
                        "log(train loss / SlowMo's train loss at the same factor), losses "
                        "floored at 1e-4·ln C; the baselines' scores are at factor 1")

    def __init__(self, cfg: MetaTrainPESConfig, *, data_dir: str | None = None):
        if cfg.tasks is None:
            raise ValueError("MultiTaskPES needs cfg.tasks (task families)")
        self.cfg, self.kind = cfg, cfg.kind
        self.families = family_names(cfg.tasks)
        sample_tasks(self.families, 1, cfg.seed)  # unknown families fail here
        self.data_dir = data_dir if data_dir is not None else cfg.data_dir
        self.phi = FlatPhi(lagg_config(cfg))
        self.dim = self.phi.dim
        if cfg.trainable is not None:
            trainable_mask(self.phi, cfg.trainable)  # unknown names fail now
        self.per_group = cfg.pairs // cfg.task_groups
        self._runners: OrderedDict[str, PES] = OrderedDict()
        self._data: OrderedDict[tuple, Dataset] = OrderedDict()
        valid_seed = derive_seed(cfg.seed, MetaStream.VALID_TASKS, 0)
        self.validation_tasks = sample_tasks(self.families, cfg.validation_tasks, valid_seed)
        self._references: dict[tuple[int, float], dict[str, list[float]]] = {}
        a = cfg.lr_augment
        self.validation_factors = (1.0,) if a == 1 else (1.0 / a, 1.0, a)
        if a > 1 and cfg.residual_base != "momentum":
            raise ValueError("lr_augment: the augmented validation compares with SlowMo, "
                             "which needs residual_base momentum")

    # ------------------------------------------------------------------ tasks
    def task(self, number: int) -> TaskSpec:
        """Training task number `number` (the same on every run with this seed)."""
        return sample_tasks(self.families, number + 1, self.cfg.seed)[number]

    def runner(self, spec: TaskSpec) -> PES:
        """A one-task PES on `spec` (env built once, a few kept)."""
        if spec.name in self._runners:
            self._runners.move_to_end(spec.name)
            return self._runners[spec.name]
        cfg = dataclasses.replace(
            self.cfg, dataset=spec.dataset, model=spec.model, num_workers=spec.num_workers,
            local_steps=spec.local_steps, batch_size=spec.batch_size,
            partition=spec.partition, alpha=spec.alpha, tasks=None)
        runner = PES(cfg, env=LocalSGDEnv(cfg, self._dataset(spec)))
        self._runners[spec.name] = runner
        if len(self._runners) > CACHED_TASKS:
            self._runners.popitem(last=False)
        return runner

    def _dataset(self, spec: TaskSpec) -> Dataset:
        key = (spec.dataset, spec.classes)
        if key not in self._data:
            self._data[key] = spec.load(self.data_dir)
            if len(self._data) > CACHED_TASKS:
                self._data.popitem(last=False)
        return self._data[key]

    def _fresh_group(self, task: int, first_run: int) -> InnerState:
        """A group's pairs starting fresh runs (numbers first_run…) on task `task`; the
        group's run length is its first pair's."""
        runner = self.runner(self.task(task))
        inner = runner.fresh_inner(range(first_run, first_run + self.per_group))
        return inner._replace(length=inner.length[:1].expand(self.per_group).clone())

    # ------------------------------------------------------------------ state
    def init_state(self) -> MultiTaskState:
        g, n = self.cfg.task_groups, self.per_group
        groups = tuple(self._fresh_group(i, i * n) for i in range(g))
        return MultiTaskState(torch.zeros(self.cfg.pairs, self.dim), groups,
                              torch.arange(g, dtype=torch.int64), torch.tensor(g * n))

    def state_template(self, tensors: dict[str, torch.Tensor]) -> MultiTaskState:
        """A state shaped like the checkpointed one (each group's shapes follow its task)."""
        tasks = tensors.get("estimator.task")
        if tasks is None or tasks.shape != (self.cfg.task_groups,):
            return self.init_state()
        groups = tuple(self._fresh_group(int(t), 0) for t in tasks.tolist())
        return MultiTaskState(torch.zeros(self.cfg.pairs, self.dim), groups, tasks.clone(),
                              torch.tensor(0))

    def resumable(self, step: int) -> bool:
        return True

    def checkpoint_state(self, state: MultiTaskState) -> MultiTaskState:
        return state

    def restore_state(self, tensors: MultiTaskState) -> MultiTaskState:
        return tensors._replace(groups=tuple(tensors.groups))

    def progress(self, step: int) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ one step
    def estimate(self, phi: torch.Tensor, state: MultiTaskState, step: int) -> Estimate:
        cfg, n = self.cfg, self.per_group
        eps = self.perturbations(step)
        pos, neg, groups = [], [], []
        tasks = state.task.tolist()
        for g, inner in enumerate(state.groups):
            runner = self.runner(self.task(tasks[g]))
            e = eps[g * n:(g + 1) * n]
            losses, inner = runner.unroll(torch.cat([phi + e, phi - e]), inner)
            if cfg.meta_loss == "loss":
                losses = losses / runner.env.loss_scale  # in units of ln C (log: already)
            pos.append(losses[:n])
            neg.append(losses[n:])
            groups.append(inner)
        loss_pos, loss_neg = torch.cat(pos), torch.cat(neg)
        accum = state.accum + eps
        grad = pes_gradient(accum, loss_pos, loss_neg, cfg.sigma)
        # groups whose inner run ended move to the next task
        started = int(state.runs_started)
        next_task = int(state.task.max()) + 1
        done = torch.zeros(cfg.pairs, dtype=torch.bool)
        for g, inner in enumerate(groups):
            if int(inner.round[0]) >= int(inner.length[0]):
                groups[g] = self._fresh_group(next_task, started)
                tasks[g] = next_task
                next_task, started = next_task + 1, started + n
                done[g * n:(g + 1) * n] = True
        meta_loss = float(torch.cat([loss_pos, loss_neg]).mean())
        new = MultiTaskState(reset_pairs(accum, done), tuple(groups),
                             torch.tensor(tasks, dtype=torch.int64), torch.tensor(started))
        return Estimate(grad, new, {"meta_loss": meta_loss, "resets": int(done.sum()) // n})

    # ------------------------------------------------------------------ validation, files
    def _reference(self, i: int, factor: float = 1.0) -> dict[str, list[float]]:
        """SlowMo's per-seed results on validation task i with the workers' lr times
        `factor` (computed once; deterministic)."""
        if (i, factor) not in self._references:
            runner = self.runner(self.validation_tasks[i])
            if factor == 1.0:
                agg = build_aggregator("mean", optimizer=opt.slowmo(
                    0.6, 0.9, local_lr=runner.cfg.local_lr))
                res = evaluate_aggregator(agg, runner.env, runner.seeds,
                                          self.cfg.validation_rounds)
            else:
                res = runner.validation_runs(self._slowmo_phi(), lr_factor=factor)
            self._references[(i, factor)] = res
        return self._references[(i, factor)]

    def _slowmo_phi(self) -> torch.Tensor:
        """The general step that is SlowMo (α 0.6, β 0.9, the workers' lr fixed): zero
        output layer, α = 0.6, the lr controller off."""
        net = AdaMLP(self.phi.config)
        with torch.no_grad():
            net.log_scale.fill_(math.log(0.6))
            if self.phi.config.sets_local_lr:
                net.lr_control.zero_()
        return self.phi.of(net)

    def _relative(self, i: int, res: dict[str, Any], factor: float = 1.0) -> float:
        """Mean over seeds and horizons of log(loss / SlowMo's loss) on validation task i.

        Losses are floored at 1e-4·ln C (a task learnt to ~0 loss must not dominate) and
        capped at the meta-loss clip (`loss_clip`·ln C; NaN/inf count as the cap): a
        diverged run costs a large but finite amount, and a diverged reference run (SlowMo
        at a large lr factor) does not make every φ's score infinite."""
        ref = self._reference(i, factor)
        env = self.runner(self.validation_tasks[i]).env
        floor, cap = 1e-4 * env.loss_scale, env.loss_max

        def bounded(x: float) -> float:
            return cap if not math.isfinite(x) else min(max(x, floor), cap)

        logs = [math.log(bounded(a) / bounded(b))
                for h in self.cfg.validation_rounds
                for a, b in zip(res[f"loss@{h}"], ref[f"loss@{h}"], strict=True)]
        return sum(logs) / len(logs)

    def validate(self, phi: torch.Tensor) -> tuple[float, dict[str, Any]]:
        """(score, per-task means): the score is the mean over the validation tasks of
        `_relative` — 0 is SlowMo's level, −0.1 about 10 % lower losses."""
        scores, means = [], {}
        for i, spec in enumerate(self.validation_tasks):
            for c in self.validation_factors:
                res = self.runner(spec).validation_runs(phi, lr_factor=c)  # batched over seeds
                scores.append(self._relative(i, res, c))
                at = "" if c == 1.0 else f"@x{c:.3g}"
                means.update({f"task{i}{at}/mean_{k}": sum(v) / len(v) for k, v in res.items()})
        return sum(scores) / len(scores), means

    def baselines(self) -> dict[str, dict[str, Any]]:
        """FedAvg and SlowMo (α 0.6, β 0.9) on the validation tasks, scored like φ."""
        out = {}
        for name in ("fedavg", "slowmo"):
            scores, means = [], {}
            for i, spec in enumerate(self.validation_tasks):
                runner = self.runner(spec)
                if name == "slowmo":
                    res = self._reference(i)
                else:
                    agg = build_aggregator("mean", optimizer=opt.sgd(1.0))
                    res = evaluate_aggregator(agg, runner.env, runner.seeds,
                                              self.cfg.validation_rounds)
                scores.append(self._relative(i, res))
                means.update({f"task{i}/{k}": v for k, v in res.items()
                              if k.startswith("mean_")})
            out[name] = {"score": sum(scores) / len(scores), **means}
        return out

    def describe(self) -> dict[str, Any]:
        return {"tasks": self.families,
                "validation_task_names": [s.name for s in self.validation_tasks]}

    def save(self, out: Any, phi: torch.Tensor, trained_on: dict[str, Any],
             validation: dict[str, Any]) -> Any:
        return save_lagg(out, self.aggregator(phi), trained_on=trained_on, validation=validation)
