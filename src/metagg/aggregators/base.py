"""The aggregator protocol shared by the simulator, the distributed runtime and Flower.

An aggregator turns the round's worker updates U [n, d] into one server step:

    state = agg.init(layout, num_workers)
    step, state = agg.step(state, updates, ctx)     # the server then does θ ← θ − step

Updates point like gradients (gradient mode: g_k; local-SGD mode: θ − θ_k), so
`mean` + SGD(lr=1) in local-SGD mode is exactly FedAvg. State is a pytree of
tensors (NamedTuples, tuples, dicts) so it can be checkpointed as safetensors.
Nothing here knows where it runs.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from metagg.layout import ParamLayout
from metagg.tasks import TrustedData

__all__ = [
    "Aggregator",
    "KernelRule",
    "RoundContext",
    "Rule",
    "RuleAggState",
    "RuleAggregator",
    "TooFewUpdates",
    "chosen_local_lr",
    "worker_slots",
]

State = Any


class TooFewUpdates(ValueError):
    """Raised when fewer updates arrived than the rule needs; the server skips the round."""


@dataclass
class RoundContext:
    """What the server knows in a round besides the updates.

    Attributes:
        round: index of the round being aggregated (0-based).
        params: current global parameters θ, [d].
        layout: names/shapes of the tensors inside θ.
        num_workers: configured number of workers M (rows may be fewer if some dropped).
        worker_ids: which worker each row of the updates came from, int64 [n].
        trusted: the server's small trusted sample, if configured (Zeno, FLTrust, ARNN).
        mode: "gradient" or "local_sgd".
        local_lr, local_steps: the workers' local SGD settings (local-SGD mode); local_lr
            is the one they used this round (the aggregator's `requested_local_lr`
            where it asks for one, else the configured lr).
        worker_momentum: β of the workers' momentum (0: updates are raw gradients or
            deltas), so a rule comparing them with its own update can do the same.
        coverage: bool [M, d], which coordinates each worker's model has, when workers
            hold different models (`metagg.cluster.HeteroCluster`); None: all of them.
        num_examples: int64 [n], how many examples each row was computed on, where the
            runtime knows (Flower clients report it); None otherwise.
    """

    round: int
    params: torch.Tensor
    layout: ParamLayout
    num_workers: int
    worker_ids: torch.Tensor
    trusted: TrustedData | None = None
    mode: str = "gradient"
    local_lr: float = 1.0
    local_steps: int = 1
    worker_momentum: float = 0.0
    coverage: torch.Tensor | None = None
    num_examples: torch.Tensor | None = None


class Aggregator(ABC):
    """Base class: `init(layout, num_workers) -> state`, `step(state, updates, ctx)`."""

    name: str = "aggregator"
    #: Set by aggregators that need `ctx.trusted` (the server's own data).
    uses_trusted_data: bool = False
    #: Fewest update rows `step` accepts; the server skips rounds with fewer.
    min_updates: int = 1
    #: The rule's guarantee as text (e.g. "n > 2f + 2"), for error messages.
    requirement: str = ""
    #: Whether `options: {allow_unsafe: true}` lets it run below `requirement`.
    can_run_unsafe: bool = False

    @abstractmethod
    def init(self, layout: ParamLayout, num_workers: int) -> State:
        """Fresh per-run state."""

    @abstractmethod
    def step(
        self, state: State, updates: torch.Tensor, ctx: RoundContext
    ) -> tuple[torch.Tensor, State]:
        """Return (step [d], new state); the server applies θ ← θ − step."""

    def requested_local_lr(self, state: State, ctx: RoundContext) -> float | None:
        """The local SGD learning rate this aggregator asks the workers to use in round
        `ctx.round` (local-SGD mode), or None (the default) to keep the configured one.

        The server asks before it sends θ, with the state after the previous round
        (`ctx.local_lr` is then the configured lr); it sends the answer with θ (the
        simulator, the torch.distributed runtime and Flower's fit config alike) and
        passes it in that round's `ctx.local_lr`. So the workers' lr can be part of what
        a learned aggregator chooses, with no per-task tuning.
        """
        return None

    def differentiable_step(self, state: State, updates: torch.Tensor,
                            ctx: RoundContext) -> torch.Tensor | None:
        """The step as a function of `updates` that autograd can differentiate (the
        `whitebox` attack optimises forged rows through it), or None where this
        aggregator's step is not differentiable in its inputs (a numpy kernel, a rule
        that detaches them). `state` is not changed."""
        try:
            with torch.enable_grad():
                step, _ = self.step(state, updates, ctx)
        except RuntimeError:  # e.g. numpy() of a tensor that requires grad
            return None
        return step if step.requires_grad else None

    def check_updates(self, updates: torch.Tensor, ctx: RoundContext) -> None:
        """Shape checks shared by every aggregator."""
        if updates.dim() != 2 or updates.shape[1] != ctx.layout.size:
            raise ValueError(
                f"{self.name}: updates must have shape [n, {ctx.layout.size}], "
                f"got {tuple(updates.shape)}"
            )
        if updates.shape[0] < self.min_updates:
            raise TooFewUpdates(
                f"{self.name} needs at least {self.min_updates} updates, got {updates.shape[0]}"
            )
        if self.uses_trusted_data and ctx.trusted is None:
            raise ValueError(f"{self.name} needs the server's trusted data (set trusted_samples)")


def chosen_local_lr(aggregator: Aggregator, state: State, ctx: RoundContext) -> float | None:
    """`aggregator.requested_local_lr(state, ctx)` as a float, checked: None (keep the
    configured lr) or finite and > 0, else a ValueError naming the aggregator."""
    lr = aggregator.requested_local_lr(state, ctx)
    if lr is None:
        return None
    lr = float(lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{aggregator.name} asked the workers for local lr {lr}; it must be "
                         "finite and > 0")
    return lr


class Rule(Protocol):
    """A reduction of the updates to one direction, possibly with state."""

    def init(self, layout: ParamLayout, num_workers: int) -> State: ...

    def __call__(
        self, state: State, updates: torch.Tensor, ctx: RoundContext
    ) -> tuple[torch.Tensor, State]: ...


class KernelRule:
    """A stateless rule from a pure [n, d] -> [d] kernel (see `metagg.robust`)."""

    def __init__(self, kernel: Callable[..., torch.Tensor], **kwargs: Any):
        # Check the options now, not at the first round: a typo must fail at build time.
        try:
            inspect.signature(kernel).bind(None, **kwargs)
        except TypeError as exc:
            raise ValueError(f"{kernel.__name__}: bad options {kwargs} ({exc})") from None
        self.kernel = kernel
        self.kwargs = kwargs

    def init(self, layout: ParamLayout, num_workers: int) -> State:
        return ()

    def __call__(
        self, state: State, updates: torch.Tensor, ctx: RoundContext
    ) -> tuple[torch.Tensor, State]:
        return self.kernel(updates, **self.kwargs), state


class RuleAggState(NamedTuple):
    rule: Any  # the rule's own state
    optimizer: Any  # the server optimizer's state


class RuleAggregator(Aggregator):
    """A reduction rule followed by a server optimizer (optax-style composition)."""

    def __init__(self, name: str, rule: Rule, optimizer: Any, *, min_updates: int = 1,
                 requirement: str = "", can_run_unsafe: bool = False,
                 uses_trusted_data: bool = False):
        self.name = name
        self.rule = rule
        self.optimizer = optimizer
        self.min_updates = min_updates
        self.requirement = requirement
        self.can_run_unsafe = can_run_unsafe
        self.uses_trusted_data = uses_trusted_data

    def init(self, layout: ParamLayout, num_workers: int) -> RuleAggState:
        return RuleAggState(self.rule.init(layout, num_workers), self.optimizer.init(layout.size))

    def step(
        self, state: RuleAggState, updates: torch.Tensor, ctx: RoundContext
    ) -> tuple[torch.Tensor, RuleAggState]:
        self.check_updates(updates, ctx)
        direction, rule_state = self.rule(state.rule, updates, ctx)
        step, opt_state = self.optimizer.update(state.optimizer, direction, ctx)
        return step, RuleAggState(rule_state, opt_state)

    def __repr__(self) -> str:
        return f"RuleAggregator({self.name!r})"


def worker_slots(
    updates: torch.Tensor, worker_ids: torch.Tensor | None, num_workers: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Put row k of `updates` [n, d] into slot `worker_ids[k]` of an [M, d] matrix.

    For aggregators whose input has one slot per worker (the learned ones). Returns
    (slots [M, d], present bool [M]); missing workers' slots are zero. `present` is
    None when all M are there in order (the common case, no copy).
    """
    n = updates.shape[0]
    if worker_ids is None:
        if n != num_workers:
            raise ValueError(f"got {n} updates for {num_workers} workers and no worker_ids")
        return updates, None
    ids = worker_ids.to(torch.int64).cpu()
    if ids.shape != (n,):
        raise ValueError(f"worker_ids must have shape [{n}] (one per update), "
                         f"got {tuple(ids.shape)}")
    if n == num_workers and torch.equal(ids, torch.arange(n)):
        return updates, None
    if n and (int(ids.min()) < 0 or int(ids.max()) >= num_workers or len(ids.unique()) != n):
        raise ValueError(f"worker_ids must be distinct and in [0, {num_workers}), "
                         f"got {ids.tolist()}")
    slots = updates.new_zeros(num_workers, updates.shape[1])
    slots[ids.to(updates.device)] = updates
    present = torch.zeros(num_workers, dtype=torch.bool)
    present[ids] = True
    return slots, present.to(updates.device)
