"""Server optimizers: what the server does with the aggregated direction.

Each is a pair of pure functions in a NamedTuple (optax style):

    opt = adam(lr=1e-2)
    state = opt.init(d)
    step, state = opt.update(state, direction, ctx)    # θ ← θ − step

`direction` points like a gradient (the mean update, say). In local-SGD mode the
direction is the mean pseudo-gradient θ − θ_k, so `sgd(lr=1)` is FedAvg.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from metagg.aggregators.prodigy import DEFAULT_COEF, init_prodigy, prodigy_update

__all__ = [
    "OPTIMIZERS",
    "AdamState",
    "MomentumState",
    "ServerOptimizer",
    "SlowMoState",
    "adam",
    "build_optimizer",
    "momentum",
    "prodigy",
    "sgd",
    "slowmo",
]


class ServerOptimizer(NamedTuple):
    init: Callable[[int], Any]
    update: Callable[[Any, torch.Tensor, Any], tuple[torch.Tensor, Any]]


def _check_lr(lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")


def _check_beta(name: str, beta: float) -> None:
    if not 0 <= beta < 1:
        raise ValueError(f"{name} must be in [0, 1), got {beta}")


def sgd(lr: float) -> ServerOptimizer:
    """step = lr · direction."""
    _check_lr(lr)

    def init(d: int) -> tuple:
        return ()

    def update(state: tuple, direction: torch.Tensor, ctx: Any = None):
        return lr * direction, state

    return ServerOptimizer(init, update)


class MomentumState(NamedTuple):
    velocity: torch.Tensor  # [d]


def momentum(lr: float, beta: float = 0.9, nesterov: bool = False) -> ServerOptimizer:
    """Heavy ball: v ← β v + direction; step = lr · v (Nesterov: lr · (β v + direction))."""
    _check_lr(lr)
    _check_beta("momentum", beta)

    def init(d: int) -> MomentumState:
        return MomentumState(torch.zeros(d))

    def update(state: MomentumState, direction: torch.Tensor, ctx: Any = None):
        v = beta * state.velocity + direction
        step = lr * (beta * v + direction) if nesterov else lr * v
        return step, MomentumState(v)

    return ServerOptimizer(init, update)


class AdamState(NamedTuple):
    count: torch.Tensor  # int64 scalar: steps taken
    mu: torch.Tensor  # [d] first moment
    nu: torch.Tensor  # [d] second moment


def adam(lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> ServerOptimizer:
    """Adam (Kingma & Ba 2015) with bias correction, on the aggregated direction."""
    _check_lr(lr)
    _check_beta("beta1", beta1)
    _check_beta("beta2", beta2)

    def init(d: int) -> AdamState:
        return AdamState(torch.zeros((), dtype=torch.int64), torch.zeros(d), torch.zeros(d))

    def update(state: AdamState, direction: torch.Tensor, ctx: Any = None):
        count = state.count + 1
        mu = beta1 * state.mu + (1 - beta1) * direction
        nu = beta2 * state.nu + (1 - beta2) * direction.square()
        t = int(count)
        mu_hat = mu / (1 - beta1**t)
        nu_hat = nu / (1 - beta2**t)
        return lr * mu_hat / (nu_hat.sqrt() + eps), AdamState(count, mu, nu)

    return ServerOptimizer(init, update)


class SlowMoState(NamedTuple):
    u: torch.Tensor  # [d] slow momentum buffer


def slowmo(lr: float, beta: float = 0.9, local_lr: float | None = None) -> ServerOptimizer:
    """SlowMo (Wang et al. 2020): u ← β u + direction / γ; step = α γ u.

    α = `lr` (slow learning rate), γ = the workers' local learning rate (taken from
    the round context when `local_lr` is None). With α = 1, β = 0 it is FedAvg.
    The LAgg-A reference code writes θ ← θ − α u (no γ); that is this rule with
    α' = α/γ, so a grid over α covers both.
    """
    _check_lr(lr)
    _check_beta("beta", beta)

    def init(d: int) -> SlowMoState:
        return SlowMoState(torch.zeros(d))

    def update(state: SlowMoState, direction: torch.Tensor, ctx: Any = None):
        gamma = local_lr if local_lr is not None else getattr(ctx, "local_lr", 1.0)
        u = beta * state.u + direction / gamma
        return lr * gamma * u, SlowMoState(u)

    return ServerOptimizer(init, update)


def prodigy(lr: float = 1.0, d_coef: float | None = None) -> ServerOptimizer:
    """Prodigy (Mishchenko & Defazio 2024): Adam's direction with a step size it estimates
    itself (`metagg.aggregators.prodigy`); step = lr · D · u. `lr` is a multiplier on the
    estimated step (1: none), so nothing needs tuning. d_coef: 0.5 by default (Prodigy's
    is 1; see `DEFAULT_COEF` for why)."""
    _check_lr(lr)
    coef = DEFAULT_COEF if d_coef is None else d_coef

    def update(state: Any, direction: torch.Tensor, ctx: Any = None):
        params = getattr(ctx, "params", None)
        if params is None:
            raise ValueError("prodigy needs the round's params (θ) in its context")
        u, d, state = prodigy_update(state, direction, params.detach(), coef)
        return (lr * d * u).to(direction.dtype), state

    return ServerOptimizer(init_prodigy, update)


OPTIMIZERS = ("sgd", "momentum", "adam", "slowmo", "prodigy")


def build_optimizer(name: str, lr: float, *, beta: float = 0.9, beta2: float = 0.999,
                    eps: float = 1e-8, nesterov: bool = False) -> ServerOptimizer:
    """A server optimizer by name (the fields of a config's `optimizer` section):
    `build_optimizer(**dataclasses.asdict(cfg.optimizer))`."""
    if name == "sgd":
        return sgd(lr)
    if name == "momentum":
        return momentum(lr, beta, nesterov)
    if name == "adam":
        return adam(lr, beta, beta2, eps)
    if name == "slowmo":
        return slowmo(lr, beta)
    if name == "prodigy":
        return prodigy(lr)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
