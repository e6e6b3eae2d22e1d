"""Reduction rules that need more than a pure kernel: state or the server's own data.

- `CenteredClipRule`: centered clipping around the previous aggregate (momentum).
- `ZenoRule`: Xie et al. 2019, scores each update by the loss decrease it buys on
  the server's trusted batch; survives a Byzantine majority.
- `FLTrustRule`: Cao et al. 2021, weights each update by its cosine with the
  server's own update on its root data; survives a Byzantine majority.
- `CoverageMeanRule`: the mean per coordinate over the workers whose model has it
  (workers with different models, `RoundContext.coverage`).

All follow the `Rule` protocol of `metagg.aggregators.base`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from metagg import robust
from metagg.aggregators.base import RoundContext
from metagg.layout import ParamLayout
from metagg.seeding import RoundStream, round_generator

__all__ = [
    "CenteredClipRule",
    "CoverageMeanRule",
    "FLTrustRule",
    "FLTrustState",
    "ZenoRule",
    "momentum_reference",
    "server_update",
]


class CenteredClipState(NamedTuple):
    previous: torch.Tensor  # [d] last round's aggregate, the clipping centre


class CenteredClipRule:
    """Karimireddy et al. 2021: v ← v + mean_i clip_τ(x_i − v), from the previous aggregate."""

    def __init__(self, tau: float = 10.0, iters: int = 1):
        if not tau > 0:
            raise ValueError(f"centered_clip: tau must be > 0, got {tau}")
        if iters < 1:
            raise ValueError(f"centered_clip: iters must be >= 1, got {iters}")
        self.tau, self.iters = tau, iters

    def init(self, layout: ParamLayout, num_workers: int) -> CenteredClipState:
        return CenteredClipState(torch.zeros(layout.size))

    def __call__(self, state: CenteredClipState, updates: torch.Tensor, ctx: RoundContext):
        v = robust.centered_clip(updates, state.previous.to(updates), tau=self.tau,
                                 iters=self.iters)
        return v, CenteredClipState(v)


def _trusted(ctx: RoundContext, rule: str):
    if ctx.trusted is None:
        raise ValueError(f"{rule} needs the server's trusted data: set trusted_samples > 0")
    return ctx.trusted


def server_update(ctx: RoundContext) -> torch.Tensor:
    """The server's own update on its trusted data, computed like a worker's.

    Gradient mode: the gradient at θ. Local-SGD mode: θ − θ_s after the workers'
    number of local SGD steps with their learning rate (full trusted batch).
    """
    trusted = _trusted(ctx, "the server update")
    if ctx.mode == "gradient":
        return trusted.grad(ctx.params)
    theta = ctx.params
    for _ in range(ctx.local_steps):
        theta = theta - ctx.local_lr * trusted.grad(theta)
    return ctx.params - theta


class ZenoRule:
    """Zeno (Xie, Koyejo & Gupta 2019), suspicion-based: average the n − b best-scored updates.

    score_i = L(θ) − L(θ − γ x_i) − ρ ‖x_i‖², L on the server's trusted batch (a
    seeded subsample of `batch` examples per round when `batch` is set, as in the
    paper's small n_r). Only the ranking matters, so a Byzantine majority is fine
    as long as one honest update is kept. Defaults: γ = 0.1, ρ = γ / 200 (the spec's
    default), b = f. γ should be small enough for the first-order regime: with γ = 1
    on digits, noisy honest minibatch gradients often *raise* the trusted loss and
    lose to tiny colluding vectors (IPM at 7/10 then wins; γ = 0.1 holds, measured).
    """

    def __init__(self, *, discard: int, gamma: float = 0.1, rho: float | None = None,
                 batch: int | None = None, seed: int = 0):
        self.discard, self.gamma, self.batch, self.seed = discard, gamma, batch, seed
        self.rho = gamma / 200 if rho is None else rho

    def init(self, layout: ParamLayout, num_workers: int) -> tuple:
        return ()

    def scores(self, updates: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        trusted = _trusted(ctx, "zeno")
        if self.batch is not None and self.batch < len(trusted):
            g = round_generator(self.seed, ctx.round, RoundStream.AGGREGATOR)
            idx = torch.randperm(len(trusted), generator=g)[: self.batch]
            trusted = type(trusted)(trusted.task, trusted.x[idx], trusted.y[idx])
        x = updates.to(ctx.params.dtype)  # the model runs in its own dtype
        with torch.no_grad():
            base = trusted.loss(ctx.params)
            after = trusted.loss(ctx.params - self.gamma * x)  # [n], one vmapped call
        return base - after - self.rho * x.square().sum(1)

    def __call__(self, state: tuple, updates: torch.Tensor, ctx: RoundContext):
        n = updates.shape[0]
        keep = max(n - self.discard, 1)
        best = self.scores(updates, ctx).topk(keep).indices
        return updates[best].mean(0), state


def momentum_reference(state: Any, ctx: RoundContext) -> tuple[torch.Tensor, Any]:
    """The server's own update to compare the workers' rows with, and the new state.

    `state` is a NamedTuple with fields `reference` [d] and `started` (bool scalar). When
    the workers send momenta (`ctx.worker_momentum` = β > 0) the reference is the server's
    momentum of its own updates with the same β, so like is compared with like: a momentum
    lags the current gradient, and against a fresh update honest momenta get negative
    cosines whenever the iterate oscillates (measured on digits with FLTrust: IPM at 7/10
    then wins, 11 % accuracy; with the matching reference, 90 %+). β = 0: the update itself.
    """
    g0 = server_update(ctx)
    beta = ctx.worker_momentum
    if beta > 0:
        previous = state.reference.to(g0)
        g0 = torch.lerp(previous, g0, 1 - beta) if bool(state.started) else g0
        state = state._replace(reference=g0, started=torch.tensor(True))
    return g0, state


class FLTrustState(NamedTuple):
    reference: torch.Tensor  # [d] the server's momentum of g₀ (used when workers send momenta)
    started: torch.Tensor  # bool scalar: reference holds a value


class FLTrustRule:
    """FLTrust (Cao et al. 2021).

    g₀ = the server's own update on its root (trusted) data; trust score
    TS_i = ReLU(cos(x_i, g₀)); each x_i is rescaled to ‖g₀‖; the aggregate is
    Σ TS_i · x̄_i / Σ TS_i (zero if every score is zero).

    When the workers send momenta (`workers.momentum` = β > 0), g₀ is replaced by
    the server's momentum of its own updates with the same β (`momentum_reference`).
    """

    def init(self, layout: ParamLayout, num_workers: int) -> FLTrustState:
        return FLTrustState(torch.zeros(layout.size), torch.tensor(False))

    def __call__(self, state: FLTrustState, updates: torch.Tensor, ctx: RoundContext):
        with torch.no_grad():
            g0, state = momentum_reference(state, ctx)
        g0 = g0.to(updates.dtype)
        g0_norm = g0.norm()
        norms = updates.norm(dim=1)
        cos = (updates @ g0) / (norms * g0_norm).clamp_min(1e-12)
        trust = torch.relu(cos)
        weights = trust * g0_norm / norms.clamp_min(1e-12)
        total = trust.sum()
        if total <= 0:
            return torch.zeros_like(g0), state
        return (weights @ updates) / total, state


class CoverageMeanRule:
    """Mean per coordinate over the workers whose model has it (`ctx.coverage`); equal to
    the mean when every worker covers every coordinate (or `ctx.coverage` is None).
    Uncovered entries of the updates are 0, so the sum only counts covering workers."""

    def init(self, layout: ParamLayout, num_workers: int) -> tuple:
        return ()

    def __call__(self, state: tuple, updates: torch.Tensor,
                 ctx: RoundContext) -> tuple[torch.Tensor, tuple]:
        if ctx.coverage is None:
            return updates.mean(0), state
        count = ctx.coverage[ctx.worker_ids].sum(0).clamp_min(1).to(updates.dtype)
        return updates.sum(0) / count, state
