"""LOpt-A and LAgg-A's meta-parameters φ and their one step (Joseph et al. 2025).

    config = LAggConfig(kind="lagg", num_workers=8)
    net = AdaMLP(config, seed=0)                           # φ, reference initialisation
    phi = dict(net.named_parameters())          # or FlatPhi(config).unflatten(flat), PES
    step, state = ada_step(phi, state, updates, params, config=config, plan=plan)

Per round, with updates u_k = θ − θ_k (= −Δ_k, gradient-like) and ḡ = mean_k u_k:
the Ada accumulators are updated with ḡ and the per-element features are built
(`metagg.learned.features`, names in `LAggConfig.feature_names()`):

    LOpt-A input  [ḡ, 27 Ada channels, 11 time]              width 39 (worker-count invariant)
    LAgg-A input  [u_1 … u_K, 27 Ada channels, 11 time]      width K + 38 (46 for K = 8)
    general LAgg-A [ḡ, spread, agreement, 27 Ada, 11 time]   width 41 (any K; see below)

LAgg-A is not permutation invariant: worker k (ctx.worker_ids) always feeds channel k;
a missing worker's channel is zero (and ḡ is the mean of the updates that arrived).
With K identical workers every worker channel equals normalised ḡ, so LAgg-A with
first-layer weights w/K on each worker channel computes exactly LOpt-A with weight w
on its ḡ channel (tested).

A shared MLP (in → 32 → ReLU → 32 → ReLU → 2, weights truncated-normal σ = 1/√fan_in
cut at ±2σ, zero biases) maps each element's features to (d, g), and

    step_mode="reference" (default):  step = 0.001 · d · exp(0.001 · g)
    step_mode="residual":             step = α · base + c · rms_T(ḡ) · d · exp(0.001 · g)
        base = ḡ ("mean", FedAvg) or m_0.9 / (1 − β_0.9) ("momentum", SlowMo's
        u = Σ β^i ḡ); α = exp(log_scale), a meta-parameter initialised to
        `residual_scale`; c = `correction_scale`; rms_T(ḡ) the per-tensor RMS of ḡ;
        the output layer starts at zero, so the untrained aggregator *is* the baseline.

    step_mode="general" (meant for meta-training on many tasks, after Celo / Celo2):
        step = α_t · base + γ_t · rms_T(ḡ) · d̂,   d̂ = mag / max(rms_T(mag), 1) per tensor
        mag = d · exp(0.001 · g); α_t = exp(log_scale + a · f_t), γ_t = exp(log_step + c · f_t)
    The correction is RMS-normalised per tensor at every step (Celo2's per-step output
    normalisation) once the MLP's output has RMS ≥ 1, so its size is then γ_t·rms_T(ḡ)
    whatever the MLP's output scale, on every task, and never more; below that it is
    linear in the output, which starts at zero (the output layer is zero-initialised as
    in residual mode: the untrained aggregator is exactly SlowMo-like, and PES's
    perturbations of it move the step smoothly). A small learned global schedule sets
    α_t and γ_t from three task-agnostic scalars f_t = [cos(ḡ, m_0.9 before this
    round), agreement ‖ḡ‖² / mean_k ‖u_k‖² (0 for LOpt-A, which sees only ḡ),
    log(1 + t) / log(1000)]; a, c start at zero,
    log_step at log(correction_scale), log_scale at log(residual_scale). LAgg-A sees the
    workers through per-element statistics that mean the same for any K and any order:
    ḡ, the spread std_k(u_k) and the sign agreement mean_k sign(u_k) — so one φ serves
    every number of workers. The inputs are normalised per tensor without the 1e-5
    floor of the reference (the floor made small updates look different from large ones).

    With `local_lr` > 0 the aggregator also chooses the workers' local lr (sent with θ
    each round; `Aggregator.requested_local_lr`): its state carries log η_t, and
        log η_{t+1} = clip(log η_t + 0.01·(w·f_t + b), log η_min, log η_max),   η_0 = local_lr
    ([η_min, η_max] = [0.01, 3], or [η_0 / k, η_0 · k] within it with `local_lr_range` = k)
        α_t ← α_t · exp(κ · (log η_t − log η_0))
    with w, b (`lr_control`, w starting at (100·local_lr_gain, 0, 0): a hypergradient-like
    rule, the lr grows while successive mean updates agree) and κ (`lr_coupling`, from
    0) meta-learned: the step size a task needs is then partly the workers' to take,
    with no per-task tuning.

Sign: as in learned_optimization (gradient in, p ← p − step) the inputs point like
gradients and the server subtracts the step, so d = +(normalised ḡ) moves θ like FedAvg
(tested). The reference feeds Δ_k = θ_k − θ; with our u_k = −Δ_k the odd channels
(ḡ, u_k, m, fac_g, fac_m, …) flip sign, which only matters for weights trained there.

The decays are meta-parameters too: β = 1 − (1 − β₀)·exp(10·o), o initialised to 0.
φ lives in `AdaMLP` (an nn.Module, for initialisation and storage); the per-run state
is `AdaState` (accumulators and the round counter).

`ada_step` is the one definition of the step: pure and out of place, it takes φ as a
mapping of tensors, so the server's aggregator (`metagg.learned.lagg.aggregator`, under
`torch.no_grad`) and PES meta-training (`torch.func.vmap` over particles, φ unflattened
from one flat vector per particle) execute the same code. The per-tensor normalisation
of the inputs is folded into the first layer (x·s)ᵀW₁ = xᵀ(s·W₁), so the normalised
inputs are never written out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from metagg.aggregators.prodigy import DEFAULT_COEF as PRODIGY_COEF
from metagg.aggregators.prodigy import ProdigyState, init_prodigy, prodigy_update
from metagg.config.engine import Section, option
from metagg.config.meta import KINDS, RESIDUAL_BASES, STEP_MODES
from metagg.layout import ParamLayout
from metagg.learned.features import (
    DECAYS,
    NORM_EPS,
    NUM_ADA_FEATURES,
    NUM_TIME_FEATURES,
    AdaState,
    FeaturePlan,
    channel_scale,
    decays_from_offsets,
    feature_names,
    init_ada_state,
    safe_sqrt,
    tensor_inputs,
    time_features,
    update_ada_state,
)

__all__ = [
    "EXP_MULT",
    "KINDS",
    "RESIDUAL_BASES",
    "STEP_MODES",
    "STEP_MULT",
    "AdaMLP",
    "FlatPhi",
    "LAggConfig",
    "LocalLrState",
    "ProdigyBaseState",
    "StepState",
    "accumulators",
    "ada_step",
    "init_step_state",
]

STEP_MULT = 0.001  # step = d · exp(EXP_MULT · g) · STEP_MULT (reference)
GENERAL_WORKER_CHANNELS = 3  # general LAgg-A: ḡ, spread, agreement
SCHEDULE_FEATURES = 3  # general mode: cos(ḡ, m), agreement, log(1 + t) / log(1000)
GENERAL_NORM_EPS = 1e-30  # general mode: inputs normalised without a floor
LOCAL_LR_MIN, LOCAL_LR_MAX = 0.01, 3.0  # the range a learned local lr stays in
# the lr controller's drift per round is LR_DRIFT · (w·f + b): an integral controller's
# effect grows with the rounds, so φ's entries are scaled down for PES's perturbations
# (σ = 0.01 on w moves log η by ~1e-4 a round, ~0.05 over a 500-round run)
LR_DRIFT = 0.01
MLP_BLOCK = 8192  # elements per block of the per-element MLP (see ada_step)
EXP_MULT = 0.001


@dataclass(frozen=True)
class LAggConfig(Section):
    """What defines a LOpt-A / LAgg-A aggregator (saved beside its weights).

    Attributes:
        kind: "lopt" (input ḡ) or "lagg" (input every worker's update).
        num_workers: LAgg-A's K (input width K + 38); 0 = take it from `init()`
            (untrained aggregators only). Must be 0 for LOpt-A and in general mode
            (any K).
        hidden: MLP width (32 in the reference).
        step_mode: "reference" (the paper's parameterisation), "residual" (a baseline
            step plus the MLP's correction) or "general" (residual with a normalised
            correction and a learned global schedule; see the module docstring).
        residual_base: "mean" (FedAvg), "momentum" (SlowMo-like) or, general mode
            only, "prodigy": server Prodigy on ḡ (D·u, `metagg.aggregators.prodigy`),
            the correction then in units of D — no step size in the base to learn.
        residual_scale: initial α of the base step (0.6 with "momentum" starts at the
            tuned SlowMo of the spec: α/γ_local = 0.3/0.5).
        correction_scale: c, the MLP correction's size relative to rms_T(ḡ) (general
            mode: γ's initial value).
        local_lr: 0: the workers keep their configured local lr; > 0 (general mode):
            the aggregator sets it every round, starting from this value (the learned
            controller in the module docstring).
        local_lr_gain: the controller's initial gain on cos(ḡ, m) (0: it starts fixed).
        local_lr_range: k > 1 keeps the chosen lr within [local_lr / k, local_lr · k]
            (and always within [0.01, 3]); 0: only the absolute range.
        correction_cap: general mode: > 0 limits the learned correction, per tensor, to
            this multiple of the base step's RMS (it then fades with the base where the
            gradients vanish); 0: no limit.
    """

    kind: str = option("lopt", choices=KINDS)
    num_workers: int = option(0, ge=0)
    hidden: int = option(32, ge=1)
    step_mode: str = option("reference", choices=STEP_MODES)
    residual_base: str = option("mean", choices=RESIDUAL_BASES)
    residual_scale: float = option(1.0, gt=0)
    correction_scale: float = option(1.0, ge=0)
    local_lr: float = option(0.0, ge=0)
    local_lr_gain: float = option(0.0)
    local_lr_range: float = option(0.0, ge=0)
    correction_cap: float = option(0.0, ge=0)

    def problems(self) -> list[str]:
        if self.kind == "lopt" and self.num_workers != 0:
            return [f"num_workers: must be 0 for lopt (it only sees ḡ), got {self.num_workers}"]
        if self.general and self.num_workers != 0:
            return [f"num_workers: must be 0 in general mode (any K), got {self.num_workers}"]
        if self.residual_base == "prodigy" and (not self.general or self.local_lr > 0):
            return ["residual_base: 'prodigy' needs step_mode general with the workers' "
                    "local lr fixed (local_lr 0): Prodigy sets the server's step size"]
        if self.local_lr > 0 and not self.general:
            return ["local_lr: only the general step mode sets the workers' local lr"]
        if self.local_lr > 0 and not LOCAL_LR_MIN <= self.local_lr <= LOCAL_LR_MAX:
            return [f"local_lr: must be in [{LOCAL_LR_MIN}, {LOCAL_LR_MAX}], got {self.local_lr}"]
        if 0 < self.local_lr_range <= 1:
            return [f"local_lr_range: must be 0 (absolute bounds only) or > 1, got "
                    f"{self.local_lr_range}"]
        if self.correction_cap and not self.general:
            return ["correction_cap: only the general step mode has a normalised correction"]
        if self.local_lr_range and not self.sets_local_lr:
            return ["local_lr_range: needs local_lr > 0 (the aggregator choosing the lr)"]
        return []

    @property
    def local_lr_bounds(self) -> tuple[float, float]:
        """(lowest, highest) local lr the controller may choose."""
        k = self.local_lr_range
        if not k:
            return LOCAL_LR_MIN, LOCAL_LR_MAX
        return max(LOCAL_LR_MIN, self.local_lr / k), min(LOCAL_LR_MAX, self.local_lr * k)

    @property
    def sets_local_lr(self) -> bool:
        """Whether the aggregator chooses the workers' local lr each round."""
        return self.local_lr > 0

    @property
    def general(self) -> bool:
        return self.step_mode == "general"

    @property
    def first_channels(self) -> int:
        """Leading input channels: 1 (ḡ) for LOpt-A, K for LAgg-A (3 in general mode)."""
        if self.kind == "lopt":
            return 1
        return GENERAL_WORKER_CHANNELS if self.general else self.num_workers

    @property
    def input_size(self) -> int:
        return self.first_channels + NUM_ADA_FEATURES + NUM_TIME_FEATURES

    def feature_names(self) -> tuple[str, ...]:
        if self.general and self.kind == "lagg":
            return ("g", "spread", "agreement", *feature_names(None)[1:])
        return feature_names(None if self.kind == "lopt" else self.num_workers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AdaMLP(nn.Module):
    """φ: the per-element MLP (weights stored [in, out]), the decay offsets o [7], in
    residual mode log α, and in general mode log α, log γ and the schedule [2, 3]; with
    a learned local lr also its controller [4] and coupling [].

        h₁ = relu(x W₁ + b₁), h₂ = relu(h₁ W₂ + b₂), (d, g) = h₂ W₃ + b₃
    """

    def __init__(self, config: LAggConfig, *, seed: int = 0):
        super().__init__()
        if config.first_channels < 1:
            raise ValueError("LAgg-A's network needs num_workers >= 1 (its input width)")
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        sizes = (config.input_size, config.hidden, config.hidden, 2)
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), 1):
            w = torch.empty(fan_in, fan_out)
            std = 1.0 / math.sqrt(fan_in)
            nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std, generator=gen)
            if i == 3 and config.step_mode in ("residual", "general"):
                w.zero_()  # residual and general modes start exactly at their baseline
            self.register_parameter(f"w{i}", nn.Parameter(w))
            self.register_parameter(f"b{i}", nn.Parameter(torch.zeros(fan_out)))
        self.decay_offsets = nn.Parameter(torch.zeros(len(DECAYS)))
        if config.step_mode in ("residual", "general"):
            self.log_scale = nn.Parameter(torch.tensor(math.log(config.residual_scale)))
        if config.general:
            step = max(config.correction_scale, 1e-8)  # log(0) would be −inf
            self.log_step = nn.Parameter(torch.tensor(math.log(step)))
            self.schedule = nn.Parameter(torch.zeros(2, SCHEDULE_FEATURES))
        if config.sets_local_lr:
            control = torch.zeros(SCHEDULE_FEATURES + 1)
            control[0] = config.local_lr_gain / LR_DRIFT  # on cos(ḡ, m): hypergradient-like
            self.lr_control = nn.Parameter(control)
            self.lr_coupling = nn.Parameter(torch.zeros(()))


class FlatPhi:
    """φ of one architecture as a flat float32 vector, the form PES perturbs and vmaps.

        fp = FlatPhi(config)
        phi = fp.init(seed=0)                 # [fp.dim], AdaMLP(config, seed=0)'s values
        ada_step(fp.unflatten(phi), ...)      # views, no copy (works under vmap)
        net = fp.net(phi)                     # a frozen AdaMLP holding them
    """

    def __init__(self, config: LAggConfig):
        if config.first_channels < 1:
            raise ValueError("LAgg-A's φ needs num_workers >= 1 (its input width)")
        self.config = config
        self.layout = ParamLayout.from_module(AdaMLP(config))

    @property
    def dim(self) -> int:
        return self.layout.size

    def of(self, net: AdaMLP) -> torch.Tensor:
        """The flat φ of `net` (a copy)."""
        return self.layout.from_module_params(net)

    def init(self, seed: int) -> torch.Tensor:
        """The reference (or residual) initialisation of `AdaMLP(config, seed=seed)`."""
        return self.of(AdaMLP(self.config, seed=seed))

    def unflatten(self, phi: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(phi)

    def net(self, phi: torch.Tensor) -> AdaMLP:
        """A frozen `AdaMLP` holding φ."""
        net = AdaMLP(self.config)
        net.load_state_dict({k: v.clone() for k, v in self.unflatten(phi.detach()).items()})
        return net.requires_grad_(False)


class LocalLrState(NamedTuple):
    """The state of a general LAgg-A / LOpt-A that sets the workers' local lr."""

    acc: AdaState
    log_lr: torch.Tensor  # [] log of the workers' local lr in the coming round


class ProdigyBaseState(NamedTuple):
    """The state of a general LAgg-A / LOpt-A on a Prodigy base (`residual_base`)."""

    acc: AdaState
    base: ProdigyState


StepState = AdaState | LocalLrState | ProdigyBaseState


def init_step_state(plan: FeaturePlan, config: LAggConfig) -> StepState:
    """A fresh run's state: zero accumulators (and the starting local lr)."""
    acc = init_ada_state(plan)
    if config.residual_base == "prodigy":
        return ProdigyBaseState(acc, init_prodigy(plan.size))
    if not config.sets_local_lr:
        return acc
    return LocalLrState(acc, torch.tensor(math.log(config.local_lr)))


def accumulators(state: StepState) -> AdaState:
    """The Ada accumulators inside a step state."""
    return state.acc if isinstance(state, LocalLrState | ProdigyBaseState) else state


def ada_step(phi: Mapping[str, torch.Tensor], state: StepState, updates: torch.Tensor,
             params: torch.Tensor, *, config: LAggConfig, plan: FeaturePlan,
             slots: torch.Tensor | None = None) -> tuple[torch.Tensor, StepState]:
    """One LOpt-A / LAgg-A step: (step [d], new state); the server does θ ← θ − step.

    Args:
        phi: the meta-parameters by name (`AdaMLP`'s): w1, b1, w2, b2, w3, b3,
            decay_offsets and, in residual mode, log_scale.
        state: the accumulators before this round (`LocalLrState` when the aggregator
            sets the workers' local lr: the updates were computed with exp(log_lr)).
        updates: the round's rows [n, d] (float32); ḡ is their mean.
        params: θ [d].
        config: the architecture and step rule.
        plan: per-tensor slices of θ's layout (`FeaturePlan.from_layout`).
        slots: LAgg-A's K worker channels [K, d] (`worker_slots`: a missing worker's
            row is zero); None means `updates` are all K workers in order.
    """
    lr_state = state if isinstance(state, LocalLrState) else None
    prodigy_state = state.base if isinstance(state, ProdigyBaseState) else None
    state = accumulators(state)
    g = updates.mean(0)
    if config.general:
        first = g[None] if config.kind == "lopt" else worker_statistics(updates, g)
    else:
        first = g[None] if config.kind == "lopt" else (updates if slots is None else slots)
    decays = decays_from_offsets(phi["decay_offsets"])
    new = update_ada_state(state, g, plan, decays)
    c = first.shape[0] + NUM_ADA_FEATURES
    w1, w2, w3 = phi["w1"], phi["w2"], phi["w3"]
    eps = GENERAL_NORM_EPS if config.general else NORM_EPS
    # the 11 time features are equal for every element: folded into the first bias
    b1 = phi["b1"] + time_features(state.t) @ w1[c:]
    outs = []
    for tp in plan.nonempty:
        x = tensor_inputs(new, g, params, first, tp)  # [C, n] raw channels
        w1_scaled = channel_scale(x, eps=eps)[:, None] * w1[:c]
        # the MLP in row blocks: its [rows, 32] activations stay small enough for the
        # C allocator to reuse instead of mapping fresh pages every round (measured:
        # whole-tensor activations made the server's step ~1.8× slower on this CPU)
        for s in range(0, x.shape[1], MLP_BLOCK):
            # relu_ writes only to the product just made: no input is modified
            h = torch.addmm(b1, x[:, s:s + MLP_BLOCK].T, w1_scaled).relu_()
            h = torch.addmm(phi["b2"], h, w2).relu_()
            outs.append(torch.addmm(phi["b3"], h, w3))
    out = torch.cat(outs)  # [d, 2]: (d, g) per element
    mag = torch.exp(EXP_MULT * out[:, 1]) * out[:, 0]  # d · exp(0.001 g)
    if config.step_mode == "reference":
        return mag * STEP_MULT, new
    if prodigy_state is not None:
        u, size, prodigy_state = prodigy_update(prodigy_state, g, params, PRODIGY_COEF)
        base, rms = size.float() * u, size.float()  # the correction in units of D too
    else:
        base = g if config.residual_base == "mean" else new.m[0] / (1.0 - decays[0])
        # the correction is scaled by each tensor's RMS of ḡ
        rms = per_tensor_rms(g, plan)
    if not config.general:
        return base * torch.exp(phi["log_scale"]) + config.correction_scale * rms * mag, new
    f = schedule_features(g, state.m[0], updates, state.t, lopt=config.kind == "lopt")
    log_alpha, log_gamma = phi["schedule"] @ f + torch.stack([phi["log_scale"],
                                                              phi["log_step"]])
    new_state: StepState = new
    if prodigy_state is not None:
        new_state = ProdigyBaseState(new, prodigy_state)
    if lr_state is not None:
        # the local lr: an integral controller on the schedule features, its drift
        # starting as a hypergradient-like gain on cos(ḡ, m); the server's α may follow
        # how far the lr has moved (lr_coupling)
        moved = lr_state.log_lr - math.log(config.local_lr)
        log_alpha = log_alpha + phi["lr_coupling"] * moved
        drift = LR_DRIFT * (phi["lr_control"][:-1] @ f + phi["lr_control"][-1])
        low, high = config.local_lr_bounds
        log_lr = (lr_state.log_lr + drift).clamp(math.log(low), math.log(high))
        new_state = LocalLrState(new, log_lr)
    # RMS-normalised per tensor once the MLP's output is large (RMS ≥ 1), linear below:
    # the untrained (zero) output is exactly the baseline, and PES's small perturbations
    # of it already move the step (a pure d / rms(d) would jump from 0 to full size)
    unit = mag / per_tensor_rms(mag, plan).clamp_min(1.0)
    base = base * torch.exp(log_alpha)
    correction = torch.exp(log_gamma) * rms * unit
    if config.correction_cap > 0:
        # per tensor, the correction at most cap × the base step's RMS: where a task is
        # fitted the gradients vanish and an Adam-like base step fades, but a normalised
        # correction would keep its size and walk θ off (measured: g5 on breast cancer
        # fitted seed 3 by round 520, then rose to 35 nats by 1200)
        limit = config.correction_cap * per_tensor_rms(base, plan)
        correction = correction * (limit / per_tensor_rms(correction, plan)
                                   .clamp_min(1e-30)).clamp(max=1.0)
    return base + correction, new_state


def per_tensor_rms(x: torch.Tensor, plan: FeaturePlan) -> torch.Tensor:
    """Each tensor's RMS of x [d], broadcast back to its elements [d]."""
    return torch.cat([safe_sqrt(x[tp.elems].square().mean()).expand(tp.elems.stop
                                                                    - tp.elems.start)
                      for tp in plan.nonempty])



def worker_statistics(updates: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """General LAgg-A's worker channels [3, d]: ḡ, the spread std_k(u_k) and the sign
    agreement mean_k sign(u_k) — the same meaning for any number and order of workers."""
    spread = safe_sqrt(updates.square().mean(0) - g.square())
    return torch.stack([g, spread, updates.sign().mean(0)])


def schedule_features(g: torch.Tensor, momentum: torch.Tensor, updates: torch.Tensor,
                      t: torch.Tensor, *, lopt: bool) -> torch.Tensor:
    """The general mode's task-agnostic global scalars [3] (see the module docstring)."""
    tiny = 1e-30
    cos = (g * momentum).sum() * torch.rsqrt(g.square().sum() * momentum.square().sum() + tiny)
    if lopt:
        agreement = torch.zeros_like(cos)
    else:
        agreement = g.square().sum() / (updates.square().sum(1).mean() + tiny)
    progress = torch.log1p(t.to(g.dtype)) / math.log(1000.0)
    return torch.stack([cos, agreement, progress])
