"""Truncated Persistent Evolution Strategies for LAgg-A / LOpt-A (Joseph et al. 2025).

    est = PES(MetaTrainPESConfig(kind="lagg"))           # an `Estimator` for the outer loop
    g = pes_step(unroll, theta, accum, inner, eps, sigma=0.01).grad   # the bare maths

Two layers:

1. The generic truncated-PES estimate (`pes_step`, `pes_gradient`, `reset_pairs`). Given
   meta-parameters θ [n] and `unroll(theta_batch [P, n], inner) -> (losses [P], inner)`
   with P = 2N particles (N antithetic pairs; particle i and i + N share one inner
   problem), it draws ε_i ~ N(0, σ² I), evaluates θ + ε_i and θ − ε_i, adds ε_i to the
   pair's running sum A_i of the perturbations used since its inner run started, and
   estimates ∇ E[L] as mean_i A_i · (L⁺_i − L⁻_i) / (2σ²) (Vicol et al. 2021; the
   spec's "Meta-training (PES)"). When a pair's inner run ends, `reset_pairs` zeroes A_i.
   With A reset every truncation this is plain antithetic ES (truncated ES, biased
   over a long horizon); keeping A is what makes the estimate unbiased (tested).

2. The estimator `PES` in local-SGD mode (the spec's recipe): each pair owns an inner
   problem (model init + minibatch stream, K workers doing H local SGD steps); a
   truncation unrolls `unroll` rounds; inner runs last a log-uniform number of rounds in
   [min_inner, max_inner] (rounded up to whole truncations, so resets fall between
   truncations) and are then replaced; meta-loss = mean over the truncation of the
   workers' training loss at θ_t, each round's loss clipped to [0, loss_clip·ln C]
   (NaN/inf → the maximum). The 2N perturbed inner runs are one batch: the workers'
   local SGD is one batched gradient over particles × workers, and the aggregator's
   step is `metagg.learned.lagg.ada_step` — the function the server's aggregator runs —
   vmapped over (φ, θ, accumulators, updates). Validation runs the unperturbed φ from
   held-out model seeds through the same batched path; FedAvg and SlowMo (spec-tuned:
   α = 0.6 in metagg's convention, β = 0.9) on the same seeds are the baselines.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.func import vmap
from torch.utils._pytree import tree_map

from metagg.aggregators import optimizers as opt
from metagg.aggregators.base import Aggregator
from metagg.aggregators.registry import build_aggregator
from metagg.compiling import compile_or_eager
from metagg.config.meta import MetaTrainPESConfig
from metagg.data import Dataset
from metagg.learned.features import FeaturePlan
from metagg.learned.lagg import (
    AdaMLP,
    FlatPhi,
    LAggConfig,
    LearnedAdaAggregator,
    ada_step,
    learned_ada,
    save_lagg,
)
from metagg.learned.lagg.model import LocalLrState, StepState, init_step_state
from metagg.learned.meta.envs import LocalSGDEnv
from metagg.learned.meta.estimators import Estimate, validation_seeds
from metagg.learned.meta.evaluate import evaluate_aggregator, record, score
from metagg.seeding import MetaStream, derive_generator, derive_seed

__all__ = [
    "PES",
    "FlatPhiEstimator",
    "InnerState",
    "PESState",
    "PESStep",
    "antithetic_noise",
    "lagg_config",
    "pes_gradient",
    "pes_step",
    "reset_pairs",
]


# --------------------------------------------------------------------------- the maths


class PESStep(NamedTuple):
    """One truncation's result: the gradient estimate and the carried-over state."""

    grad: torch.Tensor  # [n] estimate of ∇_θ E[meta-loss]
    accum: torch.Tensor  # [N, n] accumulated perturbations, ε of this truncation included
    inner: Any  # the inner states after the truncation (batched over the P = 2N particles)
    loss_pos: torch.Tensor  # [N] meta-loss of θ + A_i's run
    loss_neg: torch.Tensor  # [N] meta-loss of θ − A_i's run


def antithetic_noise(num_pairs: int, dim: int, sigma: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """ε [N, n] with i.i.d. N(0, σ²) entries (the + half of the antithetic pairs)."""
    return torch.randn(num_pairs, dim, generator=generator) * sigma


def pes_gradient(accum: torch.Tensor, loss_pos: torch.Tensor, loss_neg: torch.Tensor,
                 sigma: float) -> torch.Tensor:
    """mean_i A_i · (L⁺_i − L⁻_i) / (2σ²); A [N, n] must already include this truncation's ε."""
    diff = (loss_pos - loss_neg).to(accum.dtype)
    return (accum * diff[:, None]).mean(0) / (2.0 * sigma * sigma)


def pes_step(unroll: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]],
             theta: torch.Tensor, accum: torch.Tensor, inner: Any, eps: torch.Tensor, *,
             sigma: float) -> PESStep:
    """One truncated-PES step.

    Args:
        unroll: `unroll(theta_batch [2N, n], inner) -> (losses [2N], inner)`; particle
            i < N runs θ + ε_i (this truncation's perturbation), particle N + i its
            antithetic twin θ − ε_i; A_i only weights the estimate. It must be a pure
            function of its inputs for the estimate to be unbiased.
        theta: meta-parameters [n].
        accum: A [N, n], the perturbations summed since each pair's inner run started
            (zeros for fresh runs: then this is antithetic ES).
        inner: the particles' inner states (whatever `unroll` takes).
        eps: this truncation's perturbations [N, n] (`antithetic_noise`).
        sigma: their standard deviation.
    """
    if eps.shape != accum.shape or eps.shape[1:] != theta.shape:
        raise ValueError(f"pes_step: eps {tuple(eps.shape)}, accum {tuple(accum.shape)} and "
                         f"theta {tuple(theta.shape)} do not fit ([N, n], [N, n], [n])")
    losses, inner = unroll(torch.cat([theta + eps, theta - eps]), inner)
    n = eps.shape[0]
    new_accum = accum + eps
    return PESStep(pes_gradient(new_accum, losses[:n], losses[n:], sigma), new_accum, inner,
                   losses[:n], losses[n:])


def reset_pairs(accum: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """A with the rows of pairs whose inner run ended (bool [N]) set to zero."""
    return torch.where(done[:, None], torch.zeros((), dtype=accum.dtype), accum)


# --------------------------------------------------------------------------- the estimator


class InnerState(NamedTuple):
    """The P = 2N particles' inner runs (pair i: particles i and N + i)."""

    theta: torch.Tensor  # [P, d] model parameters
    acc: StepState  # fields with a leading [P]
    round: torch.Tensor  # [N] int64 rounds done in the pair's current inner run
    length: torch.Tensor  # [N] int64 rounds the run lasts before it is reset
    seed: torch.Tensor  # [N] int64 the run's model-init and minibatch seed


class PESState(NamedTuple):
    """What the estimator carries from step to step (checkpointed)."""

    accum: torch.Tensor  # [N, n] perturbations since each pair's run started
    inner: InnerState
    runs_started: torch.Tensor  # [] int64 inner runs drawn so far (numbers the next ones)


def trainable_mask(phi: FlatPhi, names: str) -> torch.Tensor:
    """1 on the entries of the named tensors of φ, 0 elsewhere, [n]."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [s.name for s in phi.layout]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"trainable: {unknown} are not in φ; its entries are {known}")
    mask = torch.zeros(phi.dim)
    for spec in phi.layout:
        if spec.name in wanted:
            mask[spec.slice] = 1.0
    return mask


def lagg_config(cfg: MetaTrainPESConfig) -> LAggConfig:
    """The architecture a PES run trains."""
    fixed_k = cfg.kind == "lagg" and cfg.step_mode != "general"
    return LAggConfig(kind=cfg.kind, num_workers=cfg.num_workers if fixed_k else 0,
                      hidden=cfg.hidden, step_mode=cfg.step_mode,
                      residual_base=cfg.residual_base, residual_scale=cfg.residual_scale,
                      correction_scale=cfg.correction_scale,
                      local_lr=cfg.local_lr if cfg.learned_local_lr else 0.0,
                      local_lr_gain=cfg.local_lr_gain if cfg.learned_local_lr else 0.0,
                      local_lr_range=cfg.local_lr_range if cfg.learned_local_lr else 0.0,
                      correction_cap=cfg.correction_cap)


class FlatPhiEstimator:
    """What the estimators of LAgg-A / LOpt-A share: φ as the flat vector of `self.phi`."""

    phi: FlatPhi
    cfg: MetaTrainPESConfig

    def perturbations(self, step: int) -> torch.Tensor:
        """This step's ε [N, n] (`antithetic_noise`), zero outside `cfg.trainable`: the
        estimate, and so the update, then leaves those entries of φ as they are."""
        cfg = self.cfg
        eps = antithetic_noise(cfg.pairs, self.phi.dim, cfg.sigma,
                               derive_generator(cfg.seed, MetaStream.PES_NOISE, step))
        if cfg.trainable is None:
            return eps
        return eps * trainable_mask(self.phi, cfg.trainable)

    def init_phi(self, seed: int) -> torch.Tensor:
        return self.phi.init(seed)

    def phi_of(self, agg: Aggregator) -> torch.Tensor:
        mine = self.phi.config
        if (isinstance(agg, LearnedAdaAggregator) and agg.net is not None
                and agg.config == dataclasses.replace(mine, local_lr=0.0, local_lr_gain=0.0,
                                                       local_lr_range=0.0)
                and mine.sets_local_lr):
            # a fixed-lr φ continued with a learned local lr: the controller starts at
            # its initial values, everything else is the given φ
            net = AdaMLP(mine)
            missing, unexpected = net.load_state_dict(agg.net.state_dict(), strict=False)
            assert not unexpected and set(missing) == {"lr_control", "lr_coupling"}
            return self.phi.of(net)
        # the same architecture; the correction cap may differ (no tensor of φ depends on it)
        if (not isinstance(agg, LearnedAdaAggregator) or agg.net is None
                or agg.config != dataclasses.replace(mine, correction_cap=agg.config
                                                     .correction_cap)):
            raise ValueError(f"{agg!r} holds {getattr(agg, 'config', None)}, but this run "
                             f"trains {self.phi.config}")
        return self.phi.of(agg.net)

    def aggregator(self, phi: torch.Tensor) -> LearnedAdaAggregator:
        """The ordinary (server-side) aggregator holding the flat φ."""
        return learned_ada(self.phi.config, self.phi.net(phi))


class PES(FlatPhiEstimator):
    """The truncated-PES estimator of LAgg-A / LOpt-A (see the module docstring).

    Args:
        cfg: the run's configuration.
        data: a `Dataset` to use instead of loading `cfg.dataset`.
        env: the `LocalSGDEnv` to train in (instead of one built from cfg and data; the
            multi-task estimator builds one per task).
        compile: `torch.compile` the workers' local SGD and the learned step (eager
            fallback with a warning): the compiled parts ran 1.5-2.5× faster, a whole
            outer step 1.25× (1 thread) to 1.3× (2 threads) on a quiet machine
            (benchmarks/pes.py); ~30 s of compilation once per process; results equal to
            ~1e-7, so a run is resumed with the setting it started with.
    """

    name = "truncated_pes"

    def __init__(self, cfg: MetaTrainPESConfig, data: Dataset | None = None, *,
                 compile: bool = False, env: LocalSGDEnv | None = None):
        self.cfg, self.kind = cfg, cfg.kind
        self.env = env if env is not None else LocalSGDEnv(cfg, data)
        self.phi = FlatPhi(lagg_config(cfg))
        self.dim = self.phi.dim
        if cfg.trainable is not None:
            trainable_mask(self.phi, cfg.trainable)  # unknown names fail now
        self.plan = FeaturePlan.from_layout(self.env.task.layout)
        self._agg_step = vmap(self._particle_step)
        if compile:
            self.env.grad_fn = compile_or_eager(self.env.grad_fn)
            self._agg_step = compile_or_eager(self._agg_step)
        self.seeds = validation_seeds(cfg.seed, MetaStream.VALID_INIT, cfg.validation_seeds)

    def _particle_step(self, phi: torch.Tensor, acc: StepState, theta: torch.Tensor,
                       updates: torch.Tensor) -> tuple[torch.Tensor, StepState]:
        """One particle's server step (vmapped over particles): φ [n_meta], θ [d], [K, d]."""
        return ada_step(self.phi.unflatten(phi), acc, updates, theta, config=self.phi.config,
                        plan=self.plan)

    # ------------------------------------------------------------------ inner runs
    def fresh_states(self, p: int) -> StepState:
        """A fresh run's aggregator state for each of p particles (leading [p])."""
        return tree_map(lambda x: x.expand(p, *x.shape).clone(),
                        init_step_state(self.plan, self.phi.config))

    def run_length(self, run: int) -> int:
        """Rounds of inner run number `run`: log-uniform in [min_inner, max_inner], rounded
        up to whole truncations so a reset always falls between two truncations."""
        cfg = self.cfg
        u = float(torch.rand((), generator=derive_generator(cfg.seed, MetaStream.RUN_LENGTH,
                                                            run)))
        rounds = math.exp(math.log(cfg.min_inner)
                          + u * (math.log(cfg.max_inner) - math.log(cfg.min_inner)))
        return max(1, math.ceil(rounds / cfg.unroll)) * cfg.unroll

    def fresh_inner(self, runs: Sequence[int]) -> InnerState:
        """New inner runs (numbers `runs`, one per pair), both particles of a pair at the
        same model initialisation."""
        seeds = [derive_seed(self.cfg.seed, MetaStream.TRAIN_INIT, r) for r in runs]
        theta = torch.stack([self.env.task.init_params(s) for s in seeds])
        n = len(runs)
        acc = self.fresh_states(2 * n)
        return InnerState(torch.cat([theta, theta]), acc, torch.zeros(n, dtype=torch.int64),
                          torch.tensor([self.run_length(r) for r in runs], dtype=torch.int64),
                          torch.tensor(seeds, dtype=torch.int64))

    def replace_pairs(self, inner: InnerState, done: torch.Tensor,
                      runs: Sequence[int]) -> InnerState:
        """Replace the finished pairs (bool [N]) by fresh runs numbered `runs` (in order)."""
        idx = torch.nonzero(done).flatten()
        if len(idx) == 0:
            return inner
        fresh = self.fresh_inner(runs)
        pidx = torch.cat([idx, idx + len(done)])
        acc = tree_map(lambda a, f: a.index_copy(0, pidx, f), inner.acc, fresh.acc)
        return InnerState(inner.theta.index_copy(0, pidx, fresh.theta), acc,
                          inner.round.index_copy(0, idx, fresh.round),
                          inner.length.index_copy(0, idx, fresh.length),
                          inner.seed.index_copy(0, idx, fresh.seed))

    def lr_factors(self, seeds: Sequence[int]) -> torch.Tensor:
        """Task augmentation, one factor per inner run (by its seed) [n]: the run's workers
        train with their lr times c, log-uniform in [1/a, a] (a = cfg.lr_augment). For SGD
        that is the same as scaling the task's gradients by c: the step size a task needs
        varies, and a fixed φ cannot fit them all (Celo's task augmentation, on the scale
        the workers' step sees)."""
        a = self.cfg.lr_augment
        u = torch.tensor([float(torch.rand((), generator=derive_generator(
            self.cfg.seed, MetaStream.LR_AUGMENT, s))) for s in seeds])
        return torch.exp((2.0 * u - 1.0) * math.log(a))

    def run_rounds(self, phi: torch.Tensor, theta: torch.Tensor, acc: StepState,
                   seeds: Sequence[int], start: Sequence[int], rounds: int,
                   after: Callable[[int, torch.Tensor], None] | None = None, *,
                   lr_factor: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, StepState, torch.Tensor]:
        """`rounds` rounds for P particles: φ [P, n], θ [P, d], acc [P, ...]; particle i
        uses the minibatches of run seeds[i % len(seeds)] from round start[...]. Returns
        (θ, acc, per-round meta-loss [rounds, P]: `LocalSGDEnv.round_meta_loss`).
        `after(r, θ)` after each round; `lr_factor` [len(seeds)]: each run's workers' lr
        factor (task augmentation; None: 1)."""
        rep = theta.shape[0] // len(seeds)
        factors = None if lr_factor is None else lr_factor.repeat(rep)
        losses = []
        with torch.no_grad():
            for r in range(rounds):
                # both particles of a pair see the same minibatches
                xb, yb = self.env.batches(seeds, [t + r for t in start], rep)
                # the workers' local lr: each particle's own where φ chooses it
                lr = torch.exp(acc.log_lr) if isinstance(acc, LocalLrState) else None
                if factors is not None:
                    lr = (lr if lr is not None else self.cfg.local_lr) * factors
                updates, loss = self.env.local_sgd(theta, xb, yb, lr)
                step, acc = self._agg_step(phi, acc, theta, updates)
                theta = theta - step
                losses.append(self.env.round_meta_loss(loss))
                if after is not None:
                    after(r + 1, theta)
        return theta, acc, torch.stack(losses)

    def unroll(self, phi_batch: torch.Tensor, inner: InnerState) -> tuple[torch.Tensor,
                                                                         InnerState]:
        """One truncation (`cfg.unroll` rounds) of every particle: (meta-loss [P], inner)."""
        seeds = inner.seed.tolist()
        factor = self.lr_factors(seeds) if self.cfg.lr_augment > 1 else None
        theta, acc, losses = self.run_rounds(phi_batch, inner.theta, inner.acc, seeds,
                                             inner.round.tolist(), self.cfg.unroll,
                                             lr_factor=factor)
        return losses.mean(0), inner._replace(theta=theta, acc=acc,
                                              round=inner.round + self.cfg.unroll)

    # ------------------------------------------------------------------ steps
    def init_state(self) -> PESState:
        pairs = self.cfg.pairs
        return PESState(torch.zeros(pairs, self.dim), self.fresh_inner(range(pairs)),
                        torch.tensor(pairs))

    def resumable(self, step: int) -> bool:
        return True

    def checkpoint_state(self, state: PESState) -> PESState:
        return state

    def restore_state(self, tensors: PESState) -> PESState:
        return tensors

    def progress(self, step: int) -> dict[str, Any]:
        return {}

    def estimate(self, phi: torch.Tensor, state: PESState, step: int) -> Estimate:
        cfg = self.cfg
        eps = self.perturbations(step)
        res = pes_step(self.unroll, phi, state.accum, state.inner, eps, sigma=cfg.sigma)
        done = res.inner.round >= res.inner.length
        k, started = int(done.sum()), int(state.runs_started)
        inner = self.replace_pairs(res.inner, done, range(started, started + k))
        meta_loss = float(torch.cat([res.loss_pos, res.loss_neg]).mean())
        return Estimate(res.grad, PESState(reset_pairs(res.accum, done), inner,
                                           torch.tensor(started + k)),
                        {"meta_loss": meta_loss, "resets": k})

    # ------------------------------------------------------------------ validation, files
    def validate(self, phi: torch.Tensor) -> tuple[float, dict[str, Any]]:
        """φ from every held-out seed, batched: (score, mean loss / accuracy at the horizons)."""
        out = self.validation_runs(phi)
        means = {f"mean_{k}": sum(v) / len(v) for k, v in out.items()}
        return score(out, self.cfg.validation_rounds), means

    def validation_runs(self, phi: torch.Tensor,
                        lr_factor: float = 1.0) -> dict[str, list[float]]:
        """Per-seed `loss@T` / `acc@T` of φ from every held-out seed (batched); the
        workers' lr times `lr_factor` (task augmentation)."""
        task, seeds, horizons = self.env.task, self.seeds, self.cfg.validation_rounds
        p = len(seeds)
        out: dict[str, Any] = {f"{k}@{h}": [] for h in horizons for k in ("loss", "acc")}

        def after(t: int, theta: torch.Tensor) -> None:
            if t in horizons:
                for i in range(p):
                    record(out, t, task, self.env.data, theta[i], False)

        theta = torch.stack([task.init_params(s) for s in seeds])
        acc = self.fresh_states(p)
        factor = None if lr_factor == 1.0 else torch.full((p,), float(lr_factor))
        self.run_rounds(phi.expand(p, -1), theta, acc, seeds, [0] * p, max(horizons), after,
                        lr_factor=factor)
        return out

    def baselines(self) -> dict[str, dict[str, Any]]:
        """FedAvg (mean + SGD lr 1) and the spec's tuned SlowMo on the validation seeds."""
        cfg = self.cfg
        aggs = {"fedavg": build_aggregator("mean", optimizer=opt.sgd(1.0)),
                "slowmo": build_aggregator("mean", optimizer=opt.slowmo(0.6, 0.9,
                                                                        local_lr=cfg.local_lr))}
        out = {}
        for name, agg in aggs.items():
            res = evaluate_aggregator(agg, self.env, self.seeds, cfg.validation_rounds)
            out[name] = {k: v for k, v in res.items() if k.startswith("mean_")}
            out[name]["score"] = score(res, cfg.validation_rounds)
        return out

    def save(self, out: Any, phi: torch.Tensor, trained_on: dict[str, Any],
             validation: dict[str, Any]) -> Any:
        return save_lagg(out, self.aggregator(phi), trained_on=trained_on, validation=validation)
