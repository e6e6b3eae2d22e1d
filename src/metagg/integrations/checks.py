"""The checks an adapter runs on its aggregator, without the framework it adapts to.

`metagg.integrations.flower` needs flwr; these do not, so they are tested (and usable)
where flwr is not installed. They apply the rules `metagg run` applies to a config:

- `build_checked_aggregator`: the name, f and options are validated by the config's own
  `AggregatorConfig` (one `ConfigError` listing every problem: a negative f, an unknown
  name, a bad option), then built by the registry; when the number of clients is known
  (`num_workers`), it must be at least what the rule needs for f (`min_updates`, from
  the registry's `AggregatorSpec.min_updates(f, unsafe)`), as `workers.num_workers` must
  in a config.
- `check_enough_clients`: the same bound against the clients a round actually offers,
  for frameworks that only know the federation's size at round time.

    agg = build_checked_aggregator("krum", f=1, num_workers=5)   # fine: 5 >= 2f + 3
    build_checked_aggregator("krum", f=-1)    # ConfigError: f: must be >= 0, got -1
    check_enough_clients(agg, 4, f=1)         # ConfigError: krum with f=1 needs at least 5 ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from metagg.aggregators.base import Aggregator
from metagg.aggregators.optimizers import ServerOptimizer, build_optimizer
from metagg.aggregators.registry import build_aggregator
from metagg.config import AggregatorConfig, ConfigError, OptimizerConfig

__all__ = ["build_checked_aggregator", "check_enough_clients"]

# AggregatorConfig's keys -> the adapters' argument names, for error messages
_ARGUMENT = {"name": "aggregator"}


def build_checked_aggregator(
    aggregator: str | Aggregator,
    *,
    f: int = 0,
    optimizer: ServerOptimizer | OptimizerConfig | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    num_workers: int | None = None,
) -> Aggregator:
    """The aggregator an adapter runs, checked as a config's `aggregator` section is.

    Args:
        aggregator: a registered name ("krum", "nnm+median", "rnn:PATH") or an
            `Aggregator` instance (used as it is: f, optimizer and options must be unset).
        f: the number of Byzantine clients the rule assumes (an integer >= 0).
        optimizer: the server optimizer after the rule (names only); default SGD, lr 1.
        options: the rule's own options, as `aggregator.options` in a config.
        seed: seeds the rule's own randomness.
        num_workers: the number of clients, when known; checked against what the rule
            needs for f.

    Raises:
        ConfigError: every problem with the arguments, each naming the argument.
        TypeError: `aggregator` is neither a name nor an `Aggregator`.
    """
    if isinstance(aggregator, Aggregator):
        if f or optimizer is not None or options:
            raise ConfigError("f, optimizer and options apply to aggregator names; "
                              "an Aggregator instance is used as it is")
        agg = aggregator
    elif isinstance(aggregator, str):
        if f is None:  # a config's null f means attack.num_byzantine; an adapter has none
            raise ConfigError("f: expected an integer >= 0 (the Byzantine clients the rule "
                              "assumes), got None")
        try:
            AggregatorConfig(name=aggregator, f=f, options=options or {})
        except ConfigError as exc:
            raise ConfigError([_argument_problem(p) for p in exc.problems]) from None
        if isinstance(optimizer, OptimizerConfig):
            optimizer = build_optimizer(**dataclasses.asdict(optimizer))
        try:
            agg = build_aggregator(aggregator, f=f, optimizer=optimizer,
                                   options=dict(options or {}), seed=seed)
        except ValueError as exc:  # bad options, a learned aggregator's missing weights
            raise exc if isinstance(exc, ConfigError) else ConfigError(str(exc)) from None
    else:
        raise TypeError(f"aggregator must be a name or an Aggregator, got {aggregator!r}")
    if num_workers is not None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"num_workers: must be an integer >= 1, got {num_workers!r}")
        check_enough_clients(agg, num_workers, f=f if isinstance(aggregator, str) else None,
                             options=options, got=f"got num_workers={num_workers}")
    return agg


def check_enough_clients(
    aggregator: Aggregator,
    clients: int,
    *,
    f: int | None = None,
    options: Mapping[str, Any] | None = None,
    got: str | None = None,
    where: str = "",
) -> None:
    """Raise `ConfigError` when `clients` updates can never be enough for `aggregator`.

    Args:
        aggregator: a built aggregator (its `min_updates` is the registry's
            `AggregatorSpec.min_updates(f, unsafe)`, pre-aggregation included).
        clients: the most updates it can get (the clients sampled, or the federation).
        f: the f it was built with, for the message (None: not named).
        options: its options, to tell whether `allow_unsafe` is already on.
        got: what `clients` counts, for the message (default "got N").
        where: who checks, to begin the message with ("AggregatorStrategy").
    """
    need = aggregator.min_updates
    if clients >= need:
        return
    with_f = f" with f={f}" if f is not None else ""
    msg = f"{where}: " if where else ""
    msg += f"{aggregator.name}{with_f} needs at least {need} clients"
    if aggregator.requirement:
        msg += f" ({aggregator.requirement})"
    msg += f", {got or f'got {clients}'}: "
    msg += "lower f or use more clients" if f is not None else "use more clients"
    if aggregator.can_run_unsafe and not (options or {}).get("allow_unsafe"):
        msg += ", or pass options={'allow_unsafe': True} to run it outside its guarantee"
    raise ConfigError(msg)


def _argument_problem(problem: str) -> str:
    key, sep, rest = problem.partition(":")
    return f"{_ARGUMENT.get(key, key)}{sep}{rest}" if sep else problem
