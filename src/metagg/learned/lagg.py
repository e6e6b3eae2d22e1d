"""LOpt-A and LAgg-A: per-parameter MLP learned optimizers as aggregators (Joseph et al. 2025).

    agg = LOptA(seed=0)                       # untrained, reference initialisation
    agg = LAggA(num_workers=8, seed=0)
    agg = load_lagg("runs/lopt")              # or aggregator "lopt:PATH" / "lagg:PATH"
    state = agg.init(layout, num_workers=8)
    step, state = agg.step(state, updates, ctx)   # the server applies θ ← θ − step

Per round, with updates u_k = θ − θ_k (= −Δ_k, gradient-like) and ḡ = mean_k u_k:
the Ada accumulators are updated with ḡ and the per-element features are built
(`metagg.learned.features`, names in `LAggConfig.feature_names()`):

    LOpt-A input  [ḡ, 27 Ada channels, 11 time]              width 39 (worker-count invariant)
    LAgg-A input  [u_1 … u_K, 27 Ada channels, 11 time]      width K + 38 (46 for K = 8)

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

Sign: as in learned_optimization (gradient in, p ← p − step) the inputs point like
gradients and the server subtracts the step, so d = +(normalised ḡ) moves θ like FedAvg
(tested). The reference feeds Δ_k = θ_k − θ; with our u_k = −Δ_k the odd channels
(ḡ, u_k, m, fac_g, fac_m, …) flip sign, which only matters for weights trained there.

The decays are meta-parameters too: β = 1 − (1 − β₀)·exp(10·o), o initialised to 0.
φ lives in `AdaMLP` (an nn.Module); the per-run state is `AdaState` (accumulators and
the round counter). The server step runs without autograd.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metagg.aggregators.base import Aggregator, RoundContext, worker_slots
from metagg.checkpoint import CheckpointError, save_checkpoint
from metagg.layout import ParamLayout
from metagg.learned.features import (
    DECAYS,
    NUM_ADA_FEATURES,
    NUM_TIME_FEATURES,
    AdaState,
    FeaturePlan,
    Features,
    build_features,
    decays_from_offsets,
    feature_names,
    init_ada_state,
    update_ada_state,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "RESIDUAL_BASES",
    "STEP_MODES",
    "AdaMLP",
    "LAggA",
    "LAggConfig",
    "LOptA",
    "LearnedAdaAggregator",
    "load_lagg",
    "save_lagg",
]

KINDS = ("lopt", "lagg")
STEP_MODES = ("reference", "residual")
RESIDUAL_BASES = ("mean", "momentum")
STEP_MULT = 0.001  # step = d · exp(EXP_MULT · g) · STEP_MULT (reference)
EXP_MULT = 0.001
FORMAT = "metagg.lagg_aggregator"
FORMAT_VERSION = 1
STEM = "aggregator"


@dataclass(frozen=True)
class LAggConfig:
    """What defines a LOpt-A / LAgg-A aggregator (saved beside its weights).

    Attributes:
        kind: "lopt" (input ḡ) or "lagg" (input every worker's update).
        num_workers: LAgg-A's K (input width K + 38); 0 = take it from `init()`
            (untrained aggregators only). Must be 0 for LOpt-A.
        hidden: MLP width (32 in the reference).
        step_mode: "reference" (the paper's parameterisation) or "residual"
            (a baseline step plus the MLP's correction; see the module docstring).
        residual_base: "mean" (FedAvg) or "momentum" (SlowMo-like) base step.
        residual_scale: initial α of the base step (0.6 with "momentum" starts at the
            tuned SlowMo of the spec: α/γ_local = 0.3/0.5).
        correction_scale: c, the MLP correction's size relative to rms_T(ḡ).
    """

    kind: str = "lopt"
    num_workers: int = 0
    hidden: int = 32
    step_mode: str = "reference"
    residual_base: str = "mean"
    residual_scale: float = 1.0
    correction_scale: float = 1.0

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"LAggConfig.{key} must be {allowed}, got {value!r}")

        if self.kind not in KINDS:
            raise bad("kind", self.kind, f"one of {KINDS}")
        if self.kind == "lopt" and self.num_workers != 0:
            raise bad("num_workers", self.num_workers, "0 for lopt (it only sees ḡ)")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) \
                or self.num_workers < 0:
            raise bad("num_workers", self.num_workers, "an integer >= 0")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise bad("hidden", self.hidden, "an integer >= 1")
        if self.step_mode not in STEP_MODES:
            raise bad("step_mode", self.step_mode, f"one of {STEP_MODES}")
        if self.residual_base not in RESIDUAL_BASES:
            raise bad("residual_base", self.residual_base, f"one of {RESIDUAL_BASES}")
        if not (self.residual_scale > 0 and math.isfinite(self.residual_scale)):
            raise bad("residual_scale", self.residual_scale, "a finite number > 0")
        if not (self.correction_scale >= 0 and math.isfinite(self.correction_scale)):
            raise bad("correction_scale", self.correction_scale, "a finite number >= 0")

    @property
    def first_channels(self) -> int:
        """Leading input channels: 1 (ḡ) for LOpt-A, K for LAgg-A."""
        return 1 if self.kind == "lopt" else self.num_workers

    @property
    def input_size(self) -> int:
        return self.first_channels + NUM_ADA_FEATURES + NUM_TIME_FEATURES

    def feature_names(self) -> tuple[str, ...]:
        return feature_names(None if self.kind == "lopt" else self.num_workers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AdaMLP(nn.Module):
    """φ: the per-element MLP (weights stored [in, out]), the decay offsets o [7], and
    in residual mode log α.

        h₁ = relu(x W₁ + b₁), h₂ = relu(h₁ W₂ + b₂), (d, g) = h₂ W₃ + b₃
    """

    def __init__(self, config: LAggConfig, *, seed: int = 0):
        super().__init__()
        if config.kind == "lagg" and config.num_workers < 1:
            raise ValueError("LAgg-A's network needs num_workers >= 1 (its input width)")
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        sizes = (config.input_size, config.hidden, config.hidden, 2)
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), 1):
            w = torch.empty(fan_in, fan_out)
            std = 1.0 / math.sqrt(fan_in)
            nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std, generator=gen)
            if i == 3 and config.step_mode == "residual":
                w.zero_()  # residual mode starts exactly at its baseline
            self.register_parameter(f"w{i}", nn.Parameter(w))
            self.register_parameter(f"b{i}", nn.Parameter(torch.zeros(fan_out)))
        self.decay_offsets = nn.Parameter(torch.zeros(len(DECAYS)))
        if config.step_mode == "residual":
            self.log_scale = nn.Parameter(torch.tensor(math.log(config.residual_scale)))

    def forward(self, feats: Features) -> torch.Tensor:
        """(d, g) per element, [d, 2]. The 11 time features, equal for every element,
        are folded into the first bias: b₁ + time·W₁[F+27:]."""
        x = feats.normalized  # [C, d], channel-major
        c = x.shape[0]
        b1 = torch.addmv(self.b1, self.w1[c:].T, feats.time)
        h = torch.addmm(b1, x.T, self.w1[:c]).relu_()
        h = torch.addmm(self.b2, h, self.w2).relu_()
        return torch.addmm(self.b3, h, self.w3)


class LearnedAdaAggregator(Aggregator):
    """LOpt-A / LAgg-A (see the module docstring). Use `LOptA` / `LAggA` to build one.

    Args:
        config: architecture and step rule.
        net: φ; a fresh `AdaMLP(config, seed=seed)` if None (for LAgg-A with
            num_workers 0, built at `init()` once K is known).
        seed: initialisation seed when `net` is None.
    """

    def __init__(self, config: LAggConfig, net: AdaMLP | None = None, *, seed: int = 0):
        if net is not None and net.config != config:
            raise ValueError(f"net was built for {net.config}, not {config}")
        self.config = config
        self.seed = seed
        self.name = config.kind
        self.net = net
        if net is None and config.first_channels > 0:
            self.net = AdaMLP(config, seed=seed)
        self._plans: dict[ParamLayout, FeaturePlan] = {}

    def _plan(self, layout: ParamLayout) -> FeaturePlan:
        plan = self._plans.get(layout)
        if plan is None:
            plan = self._plans[layout] = FeaturePlan.from_layout(layout)
        return plan

    def init(self, layout: ParamLayout, num_workers: int) -> AdaState:
        """Zero accumulators for `layout`; fixes K for an untrained LAgg-A built without it."""
        cfg = self.config
        if cfg.kind == "lagg":
            if cfg.num_workers == 0:
                self.config = dataclasses.replace(cfg, num_workers=num_workers)
                self.net = AdaMLP(self.config, seed=self.seed)
            elif num_workers != cfg.num_workers:
                raise ValueError(f"lagg: this aggregator takes {cfg.num_workers} workers (its "
                                 f"input width), got {num_workers}")
        return init_ada_state(self._plan(layout))

    def step(self, state: AdaState, updates: torch.Tensor,
             ctx: RoundContext) -> tuple[torch.Tensor, AdaState]:
        """Return (step [d], new state); the server applies θ ← θ − step."""
        self.check_updates(updates, ctx)
        if self.net is None:
            raise ValueError("lagg: call init(layout, num_workers) before step")
        d = updates.shape[1]
        if state.m.shape[1] != d:
            raise ValueError(f"{self.name}: state is for d={state.m.shape[1]}, updates have d={d}")
        plan = self._plan(ctx.layout)
        with torch.no_grad():
            u = updates.detach().to(torch.float32)
            g = u.mean(0)  # ḡ over the updates that arrived
            first = g[None] if self.config.kind == "lopt" else self._slots(u, ctx)
            new = update_ada_state(state, g, plan, decays_from_offsets(self.net.decay_offsets))
            feats = build_features(new, g, ctx.params.detach().to(torch.float32), first, plan,
                                   round_index=int(state.t))
            out = self.net(feats)
            step = self._step(out, g, new, plan)
        return step.to(updates.dtype), new

    def _slots(self, u: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        k = self.config.num_workers
        if ctx.num_workers != k:
            raise ValueError(f"lagg: trained for {k} workers, the round has "
                             f"num_workers={ctx.num_workers}")
        slots, _ = worker_slots(u, ctx.worker_ids, k)  # [K, d], missing workers zero
        return slots

    def _step(self, out: torch.Tensor, g: torch.Tensor, state: AdaState,
              plan: FeaturePlan) -> torch.Tensor:
        """The step rule of `config.step_mode` from the MLP output [d, 2]."""
        cfg, net = self.config, self.net
        mag = torch.exp(EXP_MULT * out[:, 1]).mul_(out[:, 0])  # d · exp(0.001 g)
        if cfg.step_mode == "reference":
            return mag.mul_(STEP_MULT)
        if cfg.residual_base == "mean":
            base = g
        else:
            beta = decays_from_offsets(net.decay_offsets)[0]
            base = state.m[0] / (1.0 - beta)
        step = base * torch.exp(net.log_scale)
        for tp in plan.tensors:  # correction scaled by the tensor's RMS of ḡ
            e = tp.elems
            if e.stop > e.start:
                rms = g[e].square().mean().sqrt()
                step[e].add_(mag[e], alpha=cfg.correction_scale * float(rms))
        return step

    def __repr__(self) -> str:
        c = self.config
        return (f"{type(self).__name__}(kind={c.kind}, K={c.num_workers}, hidden={c.hidden}, "
                f"step_mode={c.step_mode})")


class LOptA(LearnedAdaAggregator):
    """LOpt-A: the learned optimizer on ḡ (input width 39); any number of workers."""

    def __init__(self, config: LAggConfig | None = None, net: AdaMLP | None = None, *,
                 seed: int = 0, **options: Any):
        if config is None:
            config = LAggConfig(kind="lopt", **options)
        elif options:
            raise ValueError(f"give either config or options, not both ({sorted(options)})")
        if config.kind != "lopt":
            raise ValueError(f"LOptA needs kind='lopt', got {config.kind!r}")
        super().__init__(config, net, seed=seed)


class LAggA(LearnedAdaAggregator):
    """LAgg-A: sees each of K workers' updates (input width K + 38); fixed K."""

    def __init__(self, num_workers: int = 0, config: LAggConfig | None = None,
                 net: AdaMLP | None = None, *, seed: int = 0, **options: Any):
        if config is None:
            config = LAggConfig(kind="lagg", num_workers=num_workers, **options)
        elif options or num_workers:
            raise ValueError("give either config or num_workers/options, not both")
        if config.kind != "lagg":
            raise ValueError(f"LAggA needs kind='lagg', got {config.kind!r}")
        super().__init__(config, net, seed=seed)


# --------------------------------------------------------------------------- storage


def save_lagg(path: str | Path, agg: LearnedAdaAggregator, *,
              trained_on: dict[str, Any] | None = None,
              validation: dict[str, Any] | None = None) -> Path:
    """Write φ and its description to `path`/aggregator.safetensors + .json (or the stem
    `path` names with a .safetensors / .json suffix); returns the stem. Format
    {"format": "metagg.lagg_aggregator", "format_version": 1, "kind", "config",
    "feature_names", "trained_on", "validation", "metagg_version", "sha256"}."""
    if agg.net is None:
        raise ValueError("lagg: nothing to save before init() fixed num_workers")
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path / STEM
    tensors = {k: v.detach().float().contiguous() for k, v in agg.net.state_dict().items()}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": agg.config.kind,
        "config": agg.config.to_dict(), "feature_names": list(agg.config.feature_names()),
        "trained_on": trained_on or {}, "validation": validation or {},
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(stem, tensors, meta)
    return stem


def load_lagg(path: str | Path) -> LearnedAdaAggregator:
    """Load a saved LOpt-A / LAgg-A; raises CheckpointError with the reason."""
    from metagg.learned.store import load_learned_files

    tensors, meta, where = load_learned_files(path, fmt=FORMAT, version=FORMAT_VERSION,
                                              what="LOpt-A/LAgg-A")
    raw = meta.get("config")
    allowed = [f.name for f in dataclasses.fields(LAggConfig)]
    if not isinstance(raw, dict) or set(raw) - set(allowed):
        raise CheckpointError(f"{where}: 'config' must be a mapping with keys from {allowed}")
    try:
        config = LAggConfig(**raw)
        net = AdaMLP(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad config ({exc})") from None
    expected = net.state_dict()
    problems = [f"missing tensor {k}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in expected]
    problems += [f"tensor {k} has shape {tuple(tensors[k].shape)}, the config needs "
                 f"{tuple(v.shape)}" for k, v in expected.items()
                 if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{where}: weights do not match aggregator.json "
                              f"({'; '.join(problems)})")
    net.load_state_dict(tensors)
    return (LOptA if config.kind == "lopt" else LAggA)(config=config, net=net)


# --------------------------------------------------------------------------- registry builders


def _build(kind: str, arg: str | None, options: dict[str, Any]) -> LearnedAdaAggregator:
    options = dict(options)
    init = bool(options.pop("init", False))
    if arg:
        if init or options:
            raise ValueError(f"aggregator {kind!r}: a saved aggregator ({kind}:{arg}) takes no "
                             f"options, got {sorted(['init', *options] if init else options)}")
        agg = load_lagg(arg)
        if agg.config.kind != kind:
            raise ValueError(f"{arg} holds a {agg.config.kind!r} aggregator, not {kind!r}; "
                             f"use '{agg.config.kind}:{arg}'")
        return agg
    if not init:
        raise ValueError(f"aggregator {kind!r} needs meta-trained weights: give '{kind}:PATH' "
                         f"(a directory with aggregator.safetensors + aggregator.json), or "
                         f"options {{init: true}} for an untrained, reference-initialised one")
    seed = int(options.pop("init_seed", 0))
    config = LAggConfig(kind=kind, **options)
    return (LOptA if kind == "lopt" else LAggA)(config=config, seed=seed)


def build_lopt(arg: str | None, options: dict) -> LOptA:
    """Registry builder: `lopt:PATH`, or `lopt` with options {init: true, init_seed,
    step_mode, ...}: LOpt-A (the MLP produces the step; no server optimizer)."""
    return _build("lopt", arg, options)


def build_lagg(arg: str | None, options: dict) -> LAggA:
    """Registry builder: `lagg:PATH`, or `lagg` with options {init: true, num_workers
    (default: the run's), init_seed, step_mode, ...}: LAgg-A."""
    return _build("lagg", arg, options)
