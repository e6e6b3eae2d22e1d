"""Meta-training LAgg-A / LOpt-A with truncated Persistent Evolution Strategies (PES).

    from metagg.learned.meta_pes import MetaTrainPESConfig, meta_train_pes
    cfg = MetaTrainPESConfig(kind="lagg", steps=500)          # 8×8 Fashion-MNIST, K=8, H=4
    summary = meta_train_pes(cfg, "runs/lagg-pes")            # then aggregator "lagg:runs/lagg-pes"
    summary = meta_train_pes(cfg, "runs/lagg-pes", resume=True)   # continue after a kill

Two layers:

1. A generic truncated-PES estimator (`pes_step`, `pes_gradient`, `reset_pairs`). Given
   meta-parameters θ [n] and `unroll(theta_batch [P, n], inner, seed) -> (losses [P], inner)`
   with P = 2N particles (N antithetic pairs; particle i and i + N share one inner
   problem), it draws ε_i ~ N(0, σ² I), evaluates θ + ε_i and θ − ε_i, adds ε_i to the
   pair's running sum A_i of the perturbations used since its inner run started, and
   estimates ∇ E[L] as mean_i A_i · (L⁺_i − L⁻_i) / (2σ²)  (Vicol et al. 2021; the
   spec's "Meta-training (PES)"). When a pair's inner run ends, `reset_pairs` zeroes A_i.
   With A reset every truncation this is plain antithetic ES (truncated ES, biased
   over a long horizon); keeping A is what makes the estimate unbiased (tested).

2. The meta-training of LAgg-A / LOpt-A in local-SGD mode (the spec's recipe): each
   pair owns an inner problem (model init + minibatch stream, K workers doing H local
   SGD steps with lr 0.5 on B = 128 examples); a truncation unrolls 50 rounds; inner
   runs last a log-uniform number of rounds in [100, 1000] (rounded up to a whole
   number of truncations, so resets fall between truncations) and are then replaced;
   meta-loss = mean over the truncation of the workers' training loss at θ_t, each
   round's loss clipped to [0, 1.5·ln C] (NaN/inf → the maximum); AdamW (weight decay
   1e-4) with linear warm-up then cosine decay. The 2N perturbed inner runs are one
   batch: the workers' local SGD is one `vmap(grad)` over particles × workers, and the
   aggregator step is `vmap`ped over (meta-parameters, model parameters, accumulators,
   updates): it is `metagg.learned.lagg.ada_step`, the same function the server's
   aggregator runs, with φ unflattened from each particle's flat vector (`FlatPhi`).

Validation every `validate_every` outer steps runs the unperturbed φ from held-out model
seeds (the same batched path, P = number of seeds) and records the full training-set
loss and test accuracy at `validation_rounds`; the best φ (mean log loss) is written with
`save_lagg`, so `lagg:OUT` / `lopt:OUT` loads it. FedAvg and SlowMo (spec-tuned:
α = 0.6 in metagg's convention, β = 0.9) on the same seeds are recorded once as baselines.

Checkpoints (`pes_state.safetensors` + `.json`, written atomically) hold φ, AdamW's
moments, the PES accumulators, every particle's model and accumulators, each pair's
round / run length / seed, the run counters and the best φ. All randomness is derived
from (seed, stream, counter) (`numpy.random.SeedSequence`), so a killed run resumed
from its checkpoint reproduces the uninterrupted one bit for bit (tested).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from metagg.aggregators import optimizers as opt
from metagg.aggregators.base import Aggregator, RoundContext
from metagg.aggregators.registry import build_aggregator
from metagg.checkpoint import (
    CheckpointError,
    atomic_write_text,
    flatten_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from metagg.cluster import Cluster
from metagg.data import Dataset, load_dataset, partition
from metagg.learned.features import AdaState, FeaturePlan, init_ada_state
from metagg.learned.lagg import (
    FlatPhi,
    LAggConfig,
    LearnedAdaAggregator,
    ada_step,
    learned_ada,
    load_lagg,
    save_lagg,
)
from metagg.models import MLP, build_model
from metagg.seeding import MetaStream, derive_generator, derive_seed
from metagg.tasks import Task

__all__ = [
    "PES_TASKS",
    "InnerState",
    "LocalSGDEnv",
    "MetaTrainPESConfig",
    "PESStep",
    "PESTrainer",
    "add_meta_train_pes_arguments",
    "antithetic_noise",
    "cmd_meta_train_pes",
    "evaluate_local_sgd",
    "lr_schedule",
    "meta_train_pes",
    "mlp_grad_fn",
    "pes_gradient",
    "pes_step",
    "reset_pairs",
]

log = logging.getLogger("metagg")

# --task shorthands: (dataset, model). fmnist8x8-mlp is the spec's small-image-mlp-fmst.
PES_TASKS = {
    "fmnist8x8-mlp": ("fashion_mnist@8", "mlp:32:relu"),
    "fmnist-mlp": ("fashion_mnist", "mlp:128,128:relu"),
    "digits-mlp": ("digits", "mlp:32:relu"),
}

CHECKPOINT = "pes_state"
HISTORY = "meta_train.jsonl"
SUMMARY = "summary.json"


# =========================================================================== generic PES


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


def pes_step(
    unroll: Callable[[torch.Tensor, Any, int], tuple[torch.Tensor, Any]],
    theta: torch.Tensor,
    accum: torch.Tensor,
    inner: Any,
    eps: torch.Tensor,
    *,
    sigma: float,
    seed: int = 0,
) -> PESStep:
    """One truncated-PES step.

    Args:
        unroll: `unroll(theta_batch [2N, n], inner, seed) -> (losses [2N], inner)`;
            particle i < N runs θ + ε_i (this truncation's perturbation), particle N + i
            its antithetic twin θ − ε_i; A_i only weights the estimate.
            It must be a pure function of its inputs for the estimate to be unbiased.
        theta: meta-parameters [n].
        accum: A [N, n], the perturbations summed since each pair's inner run started
            (zeros for fresh runs: then this is antithetic ES).
        inner: the particles' inner states (whatever `unroll` takes).
        eps: this truncation's perturbations [N, n] (`antithetic_noise`).
        sigma: their standard deviation.
        seed: passed to `unroll` (e.g. for its minibatch draws).
    """
    if eps.shape != accum.shape or eps.shape[1:] != theta.shape:
        raise ValueError(f"pes_step: eps {tuple(eps.shape)}, accum {tuple(accum.shape)} and "
                         f"theta {tuple(theta.shape)} do not fit ([N, n], [N, n], [n])")
    batch = torch.cat([theta + eps, theta - eps])
    losses, inner = unroll(batch, inner, seed)
    n = eps.shape[0]
    new_accum = accum + eps
    return PESStep(pes_gradient(new_accum, losses[:n], losses[n:], sigma), new_accum, inner,
                   losses[:n], losses[n:])


def reset_pairs(accum: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """A with the rows of pairs whose inner run ended (bool [N]) set to zero."""
    return torch.where(done[:, None], torch.zeros((), dtype=accum.dtype), accum)


# =========================================================================== compilation


def _compiled(fn: Callable) -> Callable:
    """`torch.compile(fn)`, falling back to `fn` (with a warning) if compiling fails, e.g.
    without a C++ compiler or on a Python torch.compile does not support."""

    def fall_back(exc: Exception) -> None:
        log.warning("torch.compile failed (%s: %s); continuing without it",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        use[0] = fn

    use: list[Callable] = [fn]
    try:
        use[0] = torch.compile(fn, dynamic=False)
    except Exception as exc:  # torch's compile errors have no common base class
        fall_back(exc)

    def call(*args: Any) -> Any:
        if use[0] is fn:
            return fn(*args)
        try:
            return use[0](*args)
        except Exception as exc:  # a genuine error in fn is raised again by fn below
            fall_back(exc)
            return fn(*args)

    return call


# =========================================================================== configuration


@dataclass
class MetaTrainPESConfig:
    """Everything a PES meta-training run depends on (saved as the aggregator's `trained_on`).

    Defaults are the spec's recipe on its small task (8×8 Fashion-MNIST, MLP 64-32-10 ReLU,
    K = 8, H = 4, local lr 0.5, B = 128; 50-round truncations, σ = 0.01, 8 pairs, inner
    runs of 100-1000 rounds, AdamW 3e-3 → 1e-3 with 100 warm-up steps, 5 000 steps).

    `step_mode` defaults to "residual" (momentum base at the tuned SlowMo): measured on
    that task, K = 8, H = 4, after 50 outer steps the reference parameterisation still had
    validation loss 2.300 at round 300 (2.305 untrained), while the residual one starts at
    SlowMo's 0.431 and only has to improve on it. "reference" stays for the faithful variant.
    """

    kind: str = "lagg"  # lagg (LAgg-A, fixed K) | lopt (LOpt-A)
    dataset: str = "fashion_mnist@8"  # NAME[@SIZE]: SIZE×SIZE area-downsampled images
    data_dir: str | None = None
    model: str = "mlp:32:relu"
    num_workers: int = 8  # K
    local_steps: int = 4  # H
    local_lr: float = 0.5
    batch_size: int = 128  # per worker and local step
    partition: str = "iid"
    # the learned optimizer (LAggConfig)
    step_mode: str = "residual"  # reference | residual (see metagg.learned.lagg)
    residual_base: str = "momentum"  # mean (FedAvg) | momentum (SlowMo-like)
    residual_scale: float = 0.6  # initial α: 0.6 with momentum = the spec's tuned SlowMo
    correction_scale: float = 1.0
    hidden: int = 32
    # PES
    unroll: int = 50  # rounds per truncation
    sigma: float = 0.01
    pairs: int = 8  # antithetic pairs (2·pairs perturbed inner runs)
    min_inner: int = 100  # inner run length, log-uniform in [min_inner, max_inner] rounds
    max_inner: int = 1000
    loss_clip: float = 1.5  # per-round loss clipped to [0, loss_clip · ln C]
    # outer optimizer: AdamW, linear warm-up to lr, cosine decay to final_lr
    steps: int = 5000
    lr: float = 3e-3
    final_lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    # clip the PES gradient estimate to this global L2 norm before AdamW (0 = off): a
    # LAgg-A run blew up after 1 850 steps when the estimate's norm grew from ~10 to ~200
    max_grad_norm: float = 0.0
    seed: int = 0  # φ init, partition, inner problems, perturbations
    # start φ from a saved aggregator of the same architecture (a directory or
    # pretrained/NAME) instead of the seed's initialisation, e.g. to continue training
    # shipped weights with other settings; None = a fresh φ
    init_from: str | None = None
    # validation / bookkeeping
    validate_every: int = 50  # a validation costs about 6 outer steps
    validation_seeds: int = 5
    validation_rounds: tuple[int, ...] = (300, 1000)
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.validation_rounds, list | int):
            vr = self.validation_rounds
            self.validation_rounds = tuple(vr) if isinstance(vr, list) else (vr,)
        errors = []
        for key in ("num_workers", "local_steps", "batch_size", "unroll", "pairs", "min_inner",
                    "max_inner", "steps", "validate_every", "validation_seeds",
                    "checkpoint_every", "hidden"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errors.append(f"{key} must be an integer >= 1, got {v!r}")
        for key in ("warmup", "seed"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                errors.append(f"{key} must be an integer >= 0, got {v!r}")
        if isinstance(self.max_inner, int) and isinstance(self.min_inner, int) \
                and self.max_inner < self.min_inner:
            errors.append(f"max_inner ({self.max_inner}) must be >= min_inner ({self.min_inner})")
        for key in ("local_lr", "sigma", "lr", "loss_clip"):
            v = getattr(self, key)
            if not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                errors.append(f"{key} must be a finite number > 0, got {v!r}")
        for key in ("final_lr", "weight_decay", "max_grad_norm"):
            v = getattr(self, key)
            if not (isinstance(v, int | float) and v >= 0 and math.isfinite(v)):
                errors.append(f"{key} must be a finite number >= 0, got {v!r}")
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool)
                      for v in (self.beta1, self.beta2, self.adam_eps))
        if not (numbers and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.adam_eps > 0):
            errors.append("beta1, beta2 must be in [0, 1) and adam_eps > 0")
        if not self.validation_rounds or any(
                isinstance(r, bool) or not isinstance(r, int) or r < 1
                for r in self.validation_rounds):
            errors.append(f"validation_rounds must be integers >= 1, got "
                          f"{self.validation_rounds!r}")
        if self.init_from is not None and (not isinstance(self.init_from, str)
                                           or not self.init_from):
            errors.append(f"init_from must be a path or pretrained/NAME, got {self.init_from!r}")
        if errors:
            raise ValueError("; ".join(errors))
        self.validation_rounds = tuple(sorted(set(self.validation_rounds)))
        self.lagg_config()  # kind, step_mode... checked by LAggConfig, early

    def lagg_config(self) -> LAggConfig:
        return LAggConfig(kind=self.kind,
                          num_workers=self.num_workers if self.kind == "lagg" else 0,
                          hidden=self.hidden, step_mode=self.step_mode,
                          residual_base=self.residual_base, residual_scale=self.residual_scale,
                          correction_scale=self.correction_scale)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["validation_rounds"] = list(self.validation_rounds)
        return d


def lr_schedule(cfg: MetaTrainPESConfig, step: int) -> float:
    """Outer lr at (0-based) step: linear warm-up to `lr`, then cosine decay to `final_lr`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# =========================================================================== the inner problem


class InnerState(NamedTuple):
    """The P = 2N particles' inner runs (pair i: particles i and N + i)."""

    theta: torch.Tensor  # [P, d] model parameters
    acc: AdaState  # fields with a leading [P]
    round: torch.Tensor  # [N] int64 rounds done in the pair's current inner run
    length: torch.Tensor  # [N] int64 rounds the run lasts before it is reset
    seed: torch.Tensor  # [N] int64 the run's model-init and minibatch seed


def _parse_dataset(name: str) -> tuple[str, int | None]:
    base, at, size = name.partition("@")
    if not at:
        return name, None
    if not size.isdigit():
        raise ValueError(f"dataset {name!r}: expected NAME@SIZE with an integer SIZE")
    return base, int(size)


GradFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mlp_grad_fn(task: Task) -> GradFn | None:
    """A hand-written batched forward/backward for a metagg `MLP` task, or None for other
    models: `fn(params [N, d], x [N, B, ...], y [N, B]) -> (grads [N, d], losses [N])`,
    equal (to float rounding) to `vmap(grad_and_value(task.loss))`.

    Why: the workers' local SGD is most of a PES step, and on a CPU thread vmapped
    autograd spends ~2× the matmul time on its own bookkeeping; this is three `bmm`s
    per layer and nothing else.
    """
    model = task.model
    if not isinstance(model, MLP):
        return None
    names = [f"hidden{i}" for i in range(model.num_hidden)] + ["output"]
    expected = tuple(f"{n}.{w}" for n in names for w in ("weight", "bias"))
    if task.layout.names != expected:
        return None
    act = type(model.act).__name__

    def backprop_activation(dh: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if act == "ReLU":
            return dh.masked_fill_(z <= 0, 0.0)
        if act == "Sigmoid":
            return dh.mul_(h * (1.0 - h))
        return dh.mul_(1.0 - h * h)  # Tanh

    def fn(params: torch.Tensor, x: torch.Tensor,
           y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = task.layout.unflatten(params)
        n, b = y.shape
        h = x.reshape(n, b, -1)
        hs, zs = [h], []
        for i, name in enumerate(names):
            z = torch.baddbmm(p[f"{name}.bias"][:, None, :], h,
                              p[f"{name}.weight"].transpose(1, 2))
            zs.append(z)
            if i < len(names) - 1:
                h = model.act(z)
                hs.append(h)
        logp = torch.log_softmax(zs[-1], dim=-1)
        losses = -logp.gather(-1, y[..., None]).squeeze(-1).mean(1)
        dz = logp.exp().scatter_add(-1, y[..., None], -torch.ones_like(y[..., None],
                                                                       dtype=logp.dtype)) / b
        grads: dict[str, torch.Tensor] = {}
        for i in range(len(names) - 1, -1, -1):
            grads[f"{names[i]}.weight"] = torch.bmm(dz.transpose(1, 2), hs[i])
            grads[f"{names[i]}.bias"] = dz.sum(1)
            if i > 0:
                dz = backprop_activation(torch.bmm(dz, p[f"{names[i]}.weight"]), zs[i - 1],
                                         hs[i])
        return task.layout.flatten(grads), losses

    return fn


class LocalSGDEnv:
    """The local-SGD task an aggregator is meta-trained and validated on.

    Holds the data, the model as a `Task`, the fixed partition into K shards and one
    `Cluster` (local-SGD mode) per live model seed. Batched helpers run many particles
    at once: `local_sgd` vmaps the workers' H SGD steps over particles × workers.
    """

    def __init__(self, cfg: MetaTrainPESConfig, data: Dataset | None = None):
        self.cfg = cfg
        if data is None:
            name, size = _parse_dataset(cfg.dataset)
            data = load_dataset(name, data_dir=cfg.data_dir, image_size=size)
        self.data = data
        self.task = Task(build_model(cfg.model, data.input_shape, data.num_classes),
                         num_classes=data.num_classes)
        self.shards = partition(data.y_train, cfg.num_workers, cfg.partition, seed=cfg.seed)
        self.loss_max = cfg.loss_clip * math.log(data.num_classes)
        self.autograd = vmap(grad_and_value(self.task.loss), in_dims=(0, 0, 0))
        self._grad = mlp_grad_fn(self.task) or self.autograd
        # one contiguous [N, features] table: index_select is ~6× faster than x[idx]
        self._x_flat = data.x_train.reshape(len(data.x_train), -1).contiguous()
        self._clusters: dict[int, Cluster] = {}

    @property
    def dim(self) -> int:
        return self.task.dim

    def cluster(self, seed: int) -> Cluster:
        """The K workers with the minibatch stream of `seed` (as the simulator draws it)."""
        c = self._clusters.get(seed)
        if c is None:
            c = self._clusters[seed] = Cluster(
                self.task, self.data.x_train, self.data.y_train, self.shards,
                batch_size=self.cfg.batch_size, mode="local_sgd",
                local_steps=self.cfg.local_steps, local_lr=self.cfg.local_lr, seed=seed)
        return c

    def forget(self, keep: Sequence[int]) -> None:
        """Drop the clusters of seeds no longer in use."""
        keep_set = set(keep)
        for s in [s for s in self._clusters if s not in keep_set]:
            del self._clusters[s]

    def batches(self, seeds: Sequence[int], rounds: Sequence[int],
                repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs [repeat·n, K, H, B, ...] and labels [repeat·n, K, H, B]: run i's
        minibatches of its round (`Cluster.batches`), the n runs repeated `repeat` times."""
        idx = torch.stack([self.cluster(s).sample_indices(t)
                           for s, t in zip(seeds, rounds, strict=True)])
        x = self._x_flat.index_select(0, idx.flatten())
        x = x.view(*idx.shape, *self.data.x_train.shape[1:])
        y = self.data.y_train[idx]
        if repeat > 1:  # gather once, copy contiguously (a random gather costs ~3× more)
            x = x.repeat(repeat, *[1] * (x.dim() - 1))
            y = y.repeat(repeat, *[1] * (y.dim() - 1))
        return x, y

    def local_sgd(self, theta: torch.Tensor, xb: torch.Tensor,
                  yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every particle's K workers' updates θ − θ_k [P, K, d] and the mean first-step
        loss (at θ) [P]; θ [P, d], batches [P, K, H, B, ...]. As `Cluster.compute`."""
        p, k, h = xb.shape[:3]
        theta_k = theta[:, None].expand(p, k, theta.shape[1]).reshape(p * k, -1)
        x = xb.reshape(p * k, h, *xb.shape[3:])
        y = yb.reshape(p * k, h, *yb.shape[3:])
        local, first = theta_k, None
        for step in range(h):
            grads, losses = self._grad(local, x[:, step], y[:, step])
            local = local - self.cfg.local_lr * grads
            if first is None:
                first = losses
        return (theta_k - local).view(p, k, -1), first.view(p, k).mean(1)

    def clip_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Per-round meta-loss: clipped to [0, loss_max], NaN/inf → loss_max."""
        m = self.loss_max
        return torch.nan_to_num(loss, nan=m, posinf=m, neginf=m).clamp(0.0, m)


def evaluate_local_sgd(agg: Aggregator, env: LocalSGDEnv, seeds: Sequence[int],
                       horizons: Sequence[int]) -> dict[str, Any]:
    """Run any aggregator from each model seed for max(horizons) rounds of local SGD;
    `loss@T` (full training set) and `acc@T` (test) per seed, and their means.

    The workers of all seeds are computed together (`LocalSGDEnv.local_sgd`, the
    minibatches `Cluster` draws); the aggregator steps one seed at a time through its
    ordinary `step`, as in the simulator. A non-finite θ marks the run diverged (loss inf).
    """
    out: dict[str, Any] = {f"{k}@{h}": [] for h in horizons for k in ("loss", "acc")}
    cfg, task = env.cfg, env.task
    k = cfg.num_workers
    ids = torch.arange(k)
    with torch.no_grad():
        theta = torch.stack([task.init_params(s) for s in seeds])
        states = [agg.init(task.layout, k) for _ in seeds]
        diverged = [False] * len(seeds)
        for t in range(max(horizons)):
            xb, yb = env.batches(seeds, [t] * len(seeds))
            updates, _ = env.local_sgd(theta, xb, yb)
            steps = []
            for i in range(len(seeds)):
                if diverged[i]:
                    steps.append(torch.zeros_like(theta[i]))
                    continue
                ctx = RoundContext(round=t, params=theta[i], layout=task.layout, num_workers=k,
                                   worker_ids=ids, mode="local_sgd", local_lr=cfg.local_lr,
                                   local_steps=cfg.local_steps)
                step, states[i] = agg.step(states[i], updates[i], ctx)
                steps.append(step)
            theta = theta - torch.stack(steps)
            diverged = [d or not bool(torch.isfinite(th).all()) for d, th in zip(diverged, theta,
                                                                                strict=True)]
            if t + 1 in horizons:
                for i in range(len(seeds)):
                    _record(out, t + 1, task, env.data, theta[i], diverged[i])
    return _means(out)


def _record(out: dict[str, Any], t: int, task: Task, data: Dataset, theta: torch.Tensor,
            diverged: bool) -> None:
    if diverged:
        out[f"loss@{t}"].append(math.inf)
        out[f"acc@{t}"].append(0.0)
        return
    loss = task.evaluate(theta, data.x_train, data.y_train)["loss"]
    out[f"loss@{t}"].append(loss if math.isfinite(loss) else math.inf)
    out[f"acc@{t}"].append(task.evaluate(theta, data.x_test, data.y_test)["accuracy"])


def _means(out: dict[str, Any]) -> dict[str, Any]:
    for key in [k for k in out if not k.startswith("mean_")]:
        out[f"mean_{key}"] = float(np.mean(out[key]))
    return out


def _score(result: dict[str, Any], horizons: Sequence[int]) -> float:
    """Mean over seeds and horizons of log(train loss): lower is better; inf if any diverged."""
    vals = [v for h in horizons for v in result[f"loss@{h}"]]
    if not all(math.isfinite(v) and v > 0 for v in vals):
        return math.inf
    return float(np.mean([math.log(v) for v in vals]))


# =========================================================================== the trainer


class PESTrainer:
    """The batched inner problem and its unroll for one configuration (no outer loop).

    `unroll` is the function `pes_step` perturbs; `validate` runs the unperturbed φ
    from held-out seeds through the same batched path.
    """

    def __init__(self, cfg: MetaTrainPESConfig, data: Dataset | None = None, *,
                 compile: bool = False):
        self.cfg = cfg
        self.env = LocalSGDEnv(cfg, data)
        self.phi = FlatPhi(cfg.lagg_config())
        self.plan = FeaturePlan.from_layout(self.env.task.layout)
        self._agg_step = vmap(self._particle_step)
        if compile:
            # Fuses the elementwise work around the matmuls (ReLU masks, softmax, the
            # features): the compiled parts ran 1.5-2.5× faster, a whole outer step 1.25×
            # (1 thread) to 1.3× (2 threads) on a quiet machine (benchmarks/pes.py); results
            # equal to ~1e-7; ~30 s of compilation once per process.
            self.env._grad = _compiled(self.env._grad)
            self._agg_step = _compiled(self._agg_step)
        self.validation_seeds = [derive_seed(cfg.seed, MetaStream.VALID_INIT, j)
                                 for j in range(cfg.validation_seeds)]

    def _particle_step(self, phi: torch.Tensor, acc: AdaState, theta: torch.Tensor,
                       updates: torch.Tensor) -> tuple[torch.Tensor, AdaState]:
        """One particle's server step (vmapped over particles): φ [n_meta], θ [d], [K, d]."""
        return ada_step(self.phi.unflatten(phi), acc, updates, theta, config=self.phi.config,
                        plan=self.plan)

    def aggregator(self, phi: torch.Tensor) -> LearnedAdaAggregator:
        """The ordinary (server-side) aggregator holding the flat φ."""
        return learned_ada(self.phi.config, self.phi.net(phi))

    # ------------------------------------------------------------------ inner runs
    def run_length(self, run: int) -> int:
        """Rounds of inner run number `run`: log-uniform in [min_inner, max_inner], rounded
        up to whole truncations so a reset always falls between two truncations."""
        cfg = self.cfg
        u = float(torch.rand((), generator=derive_generator(cfg.seed, MetaStream.RUN_LENGTH, run)))
        rounds = math.exp(math.log(cfg.min_inner)
                          + u * (math.log(cfg.max_inner) - math.log(cfg.min_inner)))
        return max(1, math.ceil(rounds / cfg.unroll)) * cfg.unroll

    def fresh_inner(self, runs: Sequence[int]) -> InnerState:
        """New inner runs (numbers `runs`, one per pair), both particles of a pair at the
        same model initialisation."""
        seeds = [derive_seed(self.cfg.seed, MetaStream.TRAIN_INIT, r) for r in runs]
        theta = torch.stack([self.env.task.init_params(s) for s in seeds])
        n = len(runs)
        acc0 = init_ada_state(self.plan)
        acc = AdaState(*(x.expand(2 * n, *x.shape).clone() for x in acc0))
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
        n = len(done)
        pidx = torch.cat([idx, idx + n])
        theta = inner.theta.index_copy(0, pidx, fresh.theta)
        acc = AdaState(*(a.index_copy(0, pidx, f) for a, f in zip(inner.acc, fresh.acc,
                                                                   strict=True)))
        out = InnerState(theta, acc, inner.round.index_copy(0, idx, fresh.round),
                         inner.length.index_copy(0, idx, fresh.length),
                         inner.seed.index_copy(0, idx, fresh.seed))
        self.env.forget(out.seed.tolist())
        return out

    # ------------------------------------------------------------------ rounds
    def run_rounds(self, phi: torch.Tensor, theta: torch.Tensor, acc: AdaState,
                   seeds: Sequence[int], start: Sequence[int], rounds: int,
                   record: Callable[[int, torch.Tensor], None] | None = None,
                   ) -> tuple[torch.Tensor, AdaState, torch.Tensor]:
        """`rounds` rounds for P particles: φ [P, n], θ [P, d], acc [P, ...]; particle i
        uses the minibatches of run seeds[i % len(seeds)] from round start[...]. Returns
        (θ, acc, per-round clipped loss [rounds, P]). `record(r, θ)` after each round."""
        p, n = theta.shape[0], len(seeds)
        rep = p // n
        losses = []
        with torch.no_grad():
            for r in range(rounds):
                # both particles of a pair see the same minibatches
                xb, yb = self.env.batches(seeds, [t + r for t in start], rep)
                updates, loss = self.env.local_sgd(theta, xb, yb)
                step, acc = self._agg_step(phi, acc, theta, updates)
                theta = theta - step
                losses.append(self.env.clip_loss(loss))
                if record is not None:
                    record(r + 1, theta)
        return theta, acc, torch.stack(losses)

    def unroll(self, phi_batch: torch.Tensor, inner: InnerState,
               seed: int = 0) -> tuple[torch.Tensor, InnerState]:
        """One truncation (`cfg.unroll` rounds) of every particle: (meta-loss [P], inner)."""
        theta, acc, losses = self.run_rounds(phi_batch, inner.theta, inner.acc,
                                             inner.seed.tolist(), inner.round.tolist(),
                                             self.cfg.unroll)
        return losses.mean(0), inner._replace(theta=theta, acc=acc,
                                              round=inner.round + self.cfg.unroll)

    # ------------------------------------------------------------------ validation
    def validate(self, phi: torch.Tensor) -> dict[str, Any]:
        """φ from every held-out seed (batched): train loss / test accuracy at the horizons."""
        cfg, task = self.cfg, self.env.task
        seeds = self.validation_seeds
        p = len(seeds)
        horizons = cfg.validation_rounds
        out: dict[str, Any] = {f"{k}@{h}": [] for h in horizons for k in ("loss", "acc")}

        def record(t: int, theta: torch.Tensor) -> None:
            if t in horizons:
                for i in range(p):
                    _record(out, t, task, self.env.data, theta[i],
                            not bool(torch.isfinite(theta[i]).all()))

        theta = torch.stack([task.init_params(s) for s in seeds])
        acc = AdaState(*(x.expand(p, *x.shape).clone() for x in init_ada_state(self.plan)))
        self.run_rounds(phi.expand(p, -1), theta, acc, seeds, [0] * p, max(horizons), record)
        return _means(out)

    def baselines(self) -> dict[str, dict[str, Any]]:
        """FedAvg (mean + SGD lr 1) and the spec's tuned SlowMo on the validation seeds."""
        cfg = self.cfg
        aggs = {"fedavg": build_aggregator("mean", optimizer=opt.sgd(1.0)),
                "slowmo": build_aggregator("mean", optimizer=opt.slowmo(0.6, 0.9,
                                                                        local_lr=cfg.local_lr))}
        out = {}
        for name, agg in aggs.items():
            res = evaluate_local_sgd(agg, self.env, self.validation_seeds, cfg.validation_rounds)
            out[name] = {k: v for k, v in res.items() if k.startswith("mean_")}
            out[name]["score"] = _score(res, cfg.validation_rounds)
        return out


# =========================================================================== outer loop


@dataclass
class _Run:
    """Everything the outer loop carries from step to step (what a checkpoint holds)."""

    step: int  # outer steps done
    phi: torch.Tensor
    adam_m: torch.Tensor
    adam_v: torch.Tensor
    adam_t: int  # AdamW updates applied (skipped non-finite steps do not count)
    accum: torch.Tensor  # [N, n]
    inner: InnerState
    runs_started: int  # inner runs drawn so far (numbers the next ones)
    best_score: float
    best_step: int
    best_phi: torch.Tensor
    best_validation: dict[str, Any]
    baselines: dict[str, Any]
    wall_s: float
    compile: bool = False  # whether the steps so far ran under torch.compile


def _adamw(cfg: MetaTrainPESConfig, run: _Run, grad: torch.Tensor, lr: float) -> None:
    """torch.optim.AdamW's update (decoupled weight decay), in place on `run`."""
    run.adam_t += 1
    t = run.adam_t
    run.adam_m = run.adam_m * cfg.beta1 + (1 - cfg.beta1) * grad
    run.adam_v = run.adam_v * cfg.beta2 + (1 - cfg.beta2) * grad.square()
    phi = run.phi * (1 - lr * cfg.weight_decay)
    denom = run.adam_v.sqrt() / math.sqrt(1 - cfg.beta2 ** t) + cfg.adam_eps
    run.phi = phi - (lr / (1 - cfg.beta1 ** t)) * run.adam_m / denom


def _save_run(out: Path, cfg: MetaTrainPESConfig, run: _Run) -> None:
    tensors = {"phi": run.phi, "adam_m": run.adam_m, "adam_v": run.adam_v,
               "accum": run.accum, "best_phi": run.best_phi,
               **flatten_state(run.inner, prefix="inner")}
    meta = {"format": "metagg.pes_checkpoint", "config": cfg.to_dict(), "step": run.step,
            "adam_t": run.adam_t, "runs_started": run.runs_started,
            "best_score": run.best_score if math.isfinite(run.best_score) else None,
            "best_step": run.best_step, "best_validation": run.best_validation,
            "baselines": run.baselines, "wall_s": run.wall_s, "compile": run.compile}
    save_checkpoint(out / CHECKPOINT, tensors, meta)


def _load_run(out: Path, cfg: MetaTrainPESConfig, template: _Run) -> _Run:
    tensors, meta = load_checkpoint(out / CHECKPOINT)
    if meta.get("format") != "metagg.pes_checkpoint":
        raise CheckpointError(f"{out / CHECKPOINT}.json is not a PES meta-training checkpoint")
    # keys added to MetaTrainPESConfig after the checkpoint was written take their defaults
    saved = {**MetaTrainPESConfig().to_dict(), **dict(meta.get("config", {}))}
    now = cfg.to_dict()
    # steps may grow on resume (the cosine schedule then follows the new total)
    diff = sorted(k for k in set(saved) | set(now)
                  if k != "steps" and saved.get(k) != now.get(k))
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in diff)
        raise CheckpointError(f"{out}: the checkpoint was written with a different config "
                              f"({changes})")
    for k in ("phi", "adam_m", "adam_v", "accum", "best_phi"):
        want = getattr(template, k)
        if k not in tensors or tensors[k].shape != want.shape:
            raise CheckpointError(f"{out / CHECKPOINT}: tensor {k} missing or of the wrong shape")
    inner = unflatten_state(template.inner, tensors, prefix="inner")
    best = meta.get("best_score")
    return _Run(step=int(meta["step"]), phi=tensors["phi"], adam_m=tensors["adam_m"],
                adam_v=tensors["adam_v"], adam_t=int(meta["adam_t"]), accum=tensors["accum"],
                inner=inner, runs_started=int(meta["runs_started"]),
                best_score=math.inf if best is None else float(best),
                best_step=int(meta["best_step"]), best_phi=tensors["best_phi"],
                best_validation=dict(meta.get("best_validation") or {}),
                baselines=dict(meta.get("baselines") or {}), wall_s=float(meta.get("wall_s", 0)),
                compile=bool(meta.get("compile", False)))


def _read_history(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= upto]


def meta_train_pes(
    cfg: MetaTrainPESConfig,
    out_dir: str | Path,
    progress: bool = True,
    resume: bool = False,
    *,
    data: Dataset | None = None,
    stop_at: int | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Meta-train LAgg-A / LOpt-A by truncated PES (see the module docstring).

    Writes to `out_dir`: aggregator.safetensors + .json (the best φ on validation;
    `lagg:OUT` / `lopt:OUT`), pes_state.safetensors + .json (checkpoint), meta_train.jsonl
    (one row per outer step and validation), summary.json.

    Args:
        cfg: the run's configuration.
        out_dir: output directory (created).
        progress: tqdm bar with the meta-loss (only when stderr is a terminal).
        resume: continue from `out_dir`'s checkpoint (same config, `steps` may grow);
            without a checkpoint there, start fresh.
        data: a `Dataset` to use instead of loading `cfg.dataset`.
        stop_at: return (after checkpointing) once this many outer steps are done; the
            run continues with `resume=True` exactly as if it had not stopped.
        compile: `torch.compile` the workers' local SGD and the learned step (faster
            after ~30 s of compilation; numbers differ from eager by float rounding, so
            resume a run with the setting it was started with).

    Returns:
        The summary dict (also written to summary.json): best step and validation, the
        FedAvg / SlowMo baselines, steps done, seconds per outer step.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = PESTrainer(cfg, data, compile=compile)
    n = trainer.phi.dim
    resuming = resume and (out / f"{CHECKPOINT}.json").exists()
    # a resume takes φ from the checkpoint: init_from need not exist any more
    phi0 = (trainer.phi.init(cfg.seed) if cfg.init_from is None or resuming
            else _initial_phi(trainer.phi, cfg))
    inner0 = trainer.fresh_inner(range(cfg.pairs))
    run = _Run(step=0, phi=phi0, adam_m=torch.zeros(n), adam_v=torch.zeros(n), adam_t=0,
               accum=torch.zeros(cfg.pairs, n), inner=inner0, runs_started=cfg.pairs,
               best_score=math.inf, best_step=0, best_phi=phi0.clone(), best_validation={},
               baselines={}, wall_s=0.0, compile=compile)
    history: list[dict[str, Any]] = []
    if resuming:
        run = _load_run(out, cfg, run)
        history = _read_history(out / HISTORY, run.step)
        log.info("resuming PES meta-training at outer step %d", run.step)
        if run.compile != compile:
            log.warning("the run so far used compile=%s, this resume compile=%s: it will "
                        "differ from an uninterrupted run by float rounding", run.compile,
                        compile)
            run.compile = compile
    target = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    wall0 = time.perf_counter() - run.wall_s

    def wall() -> float:
        return round(time.perf_counter() - wall0, 3)

    def validate() -> None:
        res = trainer.validate(run.phi)
        score = _score(res, cfg.validation_rounds)
        row = {"step": run.step, "validation_score": score,
               **{k: v for k, v in res.items() if k.startswith("mean_")}, "wall_s": wall()}
        history.append(row)
        # the first validation is always kept, so that OUT holds a loadable aggregator
        # even if every validation diverges (score inf)
        if score < run.best_score or not run.best_validation:
            run.best_score, run.best_step = score, run.step
            run.best_phi, run.best_validation = run.phi.clone(), row
            _write_aggregator(out, trainer, cfg, run)
        log.info("outer step %d: validation score %.4f (best %.4f at %d)", run.step, score,
                 run.best_score, run.best_step)

    if not run.baselines:
        run.baselines = trainer.baselines()
    if run.step == 0 and not any("validation_score" in r for r in history):
        validate()
        _checkpoint(out, cfg, run, history, wall())
    bar = None
    if progress and sys.stderr.isatty() and run.step < target:
        from tqdm.auto import tqdm

        bar = tqdm(total=target, initial=run.step, desc=f"meta-train {cfg.kind} (PES)",
                   unit="step", leave=False)
    try:
        while run.step < target:
            t0 = time.perf_counter()
            noise = derive_generator(cfg.seed, MetaStream.PES_NOISE, run.step)
            eps = antithetic_noise(cfg.pairs, n, cfg.sigma, noise)
            res = pes_step(trainer.unroll, run.phi, run.accum, run.inner, eps, sigma=cfg.sigma,
                           seed=run.step)
            lr = lr_schedule(cfg, run.step)
            # float64: a float32 norm of finite entries can overflow to inf
            grad, grad_norm = res.grad, float(res.grad.double().norm())
            finite = math.isfinite(grad_norm)
            clipped = finite and 0 < cfg.max_grad_norm < grad_norm
            if clipped:
                grad = grad * (cfg.max_grad_norm / grad_norm)
            if finite:  # a non-finite estimate would poison φ and AdamW's moments
                _adamw(cfg, run, grad, lr)
            done = res.inner.round >= res.inner.length
            k = int(done.sum())
            run.accum = reset_pairs(res.accum, done)
            run.inner = trainer.replace_pairs(res.inner, done,
                                              range(run.runs_started, run.runs_started + k))
            run.runs_started += k
            run.step += 1
            meta_loss = float(torch.cat([res.loss_pos, res.loss_neg]).mean())
            row = {"step": run.step, "meta_loss": meta_loss, "lr": lr,
                   "grad_norm": grad_norm, "clipped": clipped, "skipped": not finite,
                   "resets": k,
                   "step_s": round(time.perf_counter() - t0, 3), "wall_s": wall()}
            history.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(meta_loss=f"{meta_loss:.4f}", best=f"{run.best_score:.3f}")
            last = run.step == cfg.steps
            validated = run.step % cfg.validate_every == 0 or last
            if validated:
                validate()
            if validated or run.step % cfg.checkpoint_every == 0 or run.step == target:
                _checkpoint(out, cfg, run, history, wall())
    finally:
        if bar is not None:
            bar.close()
    summary = _summary(cfg, run, history, out)
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2))
    return summary


def _initial_phi(flat: FlatPhi, cfg: MetaTrainPESConfig) -> torch.Tensor:
    """φ of the saved aggregator `cfg.init_from`; it must be the architecture `cfg` trains."""
    agg = load_lagg(cfg.init_from)
    if agg.config != flat.config:
        raise ValueError(f"init_from={cfg.init_from!r} holds {agg.config}, but this run "
                         f"trains {flat.config}")
    return flat.of(agg.net)


def _checkpoint(out: Path, cfg: MetaTrainPESConfig, run: _Run, history: list[dict[str, Any]],
                wall_s: float) -> None:
    run.wall_s = wall_s
    # history first: a checkpoint never refers to rows that are not on disk
    atomic_write_text(out / HISTORY, "".join(json.dumps(r) + "\n" for r in history))
    _save_run(out, cfg, run)


def _write_aggregator(out: Path, trainer: PESTrainer, cfg: MetaTrainPESConfig,
                      run: _Run) -> Path:
    trained_on = {**cfg.to_dict(), "dim": trainer.env.dim,
                  "dataset_name": trainer.env.data.name, "meta_gradient": "truncated_pes"}
    validation = {"best_step": run.best_step, "score": run.best_score,
                  "score_definition": "mean over seeds and horizons of log(train loss)",
                  **run.best_validation, "baselines": run.baselines}
    return save_lagg(out, trainer.aggregator(run.best_phi), trained_on=trained_on,
                     validation=validation)


def _summary(cfg: MetaTrainPESConfig, run: _Run, history: list[dict[str, Any]],
             out: Path) -> dict[str, Any]:
    steps = [r["step_s"] for r in history if "step_s" in r]
    return {
        "kind": cfg.kind, "steps_done": run.step, "steps": cfg.steps,
        "best_step": run.best_step, "best_score": run.best_score,
        "best_validation": run.best_validation, "baselines": run.baselines,
        "seconds_per_step": float(np.median(steps)) if steps else None,
        "wall_s": run.wall_s, "path": str(out / "aggregator"),
        "use": f"aggregator {cfg.kind}:{out}",
    }


# =========================================================================== CLI


def add_meta_train_pes_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `metagg meta-train lagg|lopt` (the caller adds the `kind` positional)."""
    parser.add_argument("--task", default="fmnist8x8-mlp", choices=sorted(PES_TASKS),
                        help="dataset + worker model (default fmnist8x8-mlp: 8×8 Fashion-MNIST, "
                             "MLP 64-32-10 ReLU; digits-mlp needs no download)")
    parser.add_argument("--workers", type=int, default=8, help="number of workers K (default 8)")
    parser.add_argument("--local-steps", type=int, default=4,
                        help="local SGD steps H per round (default 4)")
    parser.add_argument("--steps", type=int, default=None,
                        help="PES outer steps (default: the config's, 5000)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="any other MetaTrainPESConfig field, e.g. --set step_mode=reference "
                             "--set pairs=4 (repeatable; values are YAML)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: robust on a shared machine)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the inner training and the learned step (default "
                             "on: ~1.3× faster outer steps after ~30 s; --no-compile for eager)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out (same result as an "
                             "uninterrupted run with the same --compile and --threads)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")


def cmd_meta_train_pes(args: argparse.Namespace) -> int:
    """Run `metagg meta-train lagg|lopt` from parsed arguments (`args.kind` set)."""
    from metagg.config import ConfigError, build_dataclass

    dataset, model = PES_TASKS[args.task]
    options: dict[str, Any] = {"kind": args.kind, "dataset": dataset, "model": model,
                               "num_workers": args.workers, "local_steps": args.local_steps}
    if args.steps is not None:
        options["steps"] = args.steps
    cfg = build_dataclass(MetaTrainPESConfig, options, args.overrides, "meta-train")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        summary = meta_train_pes(cfg, args.out, progress=True, resume=args.resume,
                                 compile=args.compile)
    finally:
        torch.set_num_threads(before)
    print(json.dumps(summary, indent=2))
    print(f"use it: metagg run CONFIG --set aggregator={args.kind}:{args.out}")
    return 0
