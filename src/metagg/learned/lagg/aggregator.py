"""LOpt-A / LAgg-A as server aggregators (Joseph et al. 2025).

    agg = LOptA(seed=0)                       # untrained, reference initialisation
    agg = LAggA(num_workers=8, seed=0)
    agg = load_lagg("runs/lopt")              # or aggregator "lopt:PATH" / "lagg:PATH"
    state = agg.init(layout, num_workers=8)
    step, state = agg.step(state, updates, ctx)   # the server applies θ ← θ − step

The step is `metagg.learned.lagg.model.ada_step` (see there for the maths), run under
`torch.no_grad` on the rows that arrived; LAgg-A puts worker k's row in channel k
(`ctx.worker_ids`), a missing worker's channel zero. General LAgg-A (step_mode
"general") sees per-element statistics of the rows that arrived, for any K; with
`local_lr` > 0 it also chooses the workers' local lr (`requested_local_lr`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from metagg.aggregators.base import Aggregator, RoundContext, worker_slots
from metagg.layout import ParamLayout
from metagg.learned.features import FeaturePlan
from metagg.learned.lagg.model import (
    AdaMLP,
    LAggConfig,
    LocalLrState,
    StepState,
    accumulators,
    ada_step,
    init_step_state,
)

__all__ = ["LAggA", "LOptA", "LearnedAdaAggregator", "learned_ada"]


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

    def init(self, layout: ParamLayout, num_workers: int) -> StepState:
        """Zero accumulators for `layout`; fixes K for an untrained LAgg-A built without it."""
        cfg = self.config
        if cfg.kind == "lagg" and not cfg.general:
            if cfg.num_workers == 0:
                self.config = dataclasses.replace(cfg, num_workers=num_workers)
                self.net = AdaMLP(self.config, seed=self.seed)
            elif num_workers != cfg.num_workers:
                raise ValueError(f"lagg: this aggregator takes {cfg.num_workers} workers (its "
                                 f"input width), got {num_workers}")
        return init_step_state(self._plan(layout), self.config)

    def requested_local_lr(self, state: StepState, ctx: RoundContext) -> float | None:
        """The workers' local lr this aggregator chose for the coming round (general
        mode with `local_lr` > 0), else None (the configured one)."""
        if isinstance(state, LocalLrState):
            return float(torch.exp(state.log_lr))
        return None

    def step(self, state: StepState, updates: torch.Tensor,
             ctx: RoundContext) -> tuple[torch.Tensor, StepState]:
        """Return (step [d], new state); the server applies θ ← θ − step."""
        with torch.no_grad():
            return self._step(state, updates.detach(), ctx)

    def differentiable_step(self, state: StepState, updates: torch.Tensor,
                            ctx: RoundContext) -> torch.Tensor | None:
        """`ada_step` is pure: the step in the autograd graph of `updates` (φ fixed)."""
        with torch.enable_grad():
            return self._step(state, updates, ctx)[0]

    def _step(self, state: StepState, updates: torch.Tensor,
              ctx: RoundContext) -> tuple[torch.Tensor, StepState]:
        self.check_updates(updates, ctx)
        if self.net is None:
            raise ValueError("lagg: call init(layout, num_workers) before step")
        d = updates.shape[1]
        acc = accumulators(state)
        if acc.m.shape[1] != d:
            raise ValueError(f"{self.name}: state is for d={acc.m.shape[1]}, updates have d={d}")
        u = updates.to(torch.float32)
        fixed_k = self.config.kind == "lagg" and not self.config.general
        slots = self._slots(u, ctx) if fixed_k else None
        phi = {k: v.detach() for k, v in self.net.named_parameters()}
        step, new = ada_step(phi, state, u, ctx.params.detach().to(torch.float32),
                             config=self.config, plan=self._plan(ctx.layout), slots=slots)
        return step.to(updates.dtype), new

    def _slots(self, u: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        k = self.config.num_workers
        if ctx.num_workers != k:
            raise ValueError(f"lagg: trained for {k} workers, the round has "
                             f"num_workers={ctx.num_workers}")
        slots, _ = worker_slots(u, ctx.worker_ids, k)  # [K, d], missing workers zero
        return slots

    def __repr__(self) -> str:
        c = self.config
        k = "any" if c.general or c.kind == "lopt" else c.num_workers
        return (f"{type(self).__name__}(kind={c.kind}, K={k}, hidden={c.hidden}, "
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
    """LAgg-A: sees each of K workers' updates (input width K + 38); fixed K, or any K
    in general mode (`step_mode="general"`)."""

    def __init__(self, num_workers: int = 0, config: LAggConfig | None = None,
                 net: AdaMLP | None = None, *, seed: int = 0, **options: Any):
        if config is None:
            config = LAggConfig(kind="lagg", num_workers=num_workers, **options)
        elif options or num_workers:
            raise ValueError("give either config or num_workers/options, not both")
        if config.kind != "lagg":
            raise ValueError(f"LAggA needs kind='lagg', got {config.kind!r}")
        super().__init__(config, net, seed=seed)


def learned_ada(config: LAggConfig, net: AdaMLP) -> LearnedAdaAggregator:
    """The aggregator of `config.kind` (LOpt-A or LAgg-A) holding φ = `net`."""
    return (LOptA if config.kind == "lopt" else LAggA)(config=config, net=net)
