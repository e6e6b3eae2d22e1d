"""Aggregators by name: `build_aggregator("krum", f=3, optimizer=sgd(0.5))`.

Names are what configs and the CLI use (`aggregator: median`, `--aggregators
mean,krum`). Learned aggregators take an argument after a colon
(`rnn:runs/rnn`, `lagg:pretrained/...`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metagg.aggregators import optimizers as opt
from metagg.aggregators.base import Aggregator, KernelRule, RuleAggregator
from metagg.config import OptimizerConfig

__all__ = [
    "aggregator_names",
    "build_aggregator",
    "build_optimizer",
    "parse_aggregator_name",
    "register",
]

# name -> builder(f, optimizer, options) -> Aggregator
_BUILDERS: dict[str, Callable[..., Aggregator]] = {}


def register(name: str) -> Callable:
    """Decorator: register an aggregator builder under `name`."""

    def wrap(fn: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
        _BUILDERS[name] = fn
        return fn

    return wrap


def aggregator_names() -> list[str]:
    return sorted(_BUILDERS)


def parse_aggregator_name(name: str) -> tuple[str, str | None]:
    """'rnn:runs/rnn' -> ('rnn', 'runs/rnn'); 'mean' -> ('mean', None)."""
    kind, sep, arg = name.partition(":")
    return kind.strip().lower(), (arg if sep else None)


def build_optimizer(cfg: OptimizerConfig) -> opt.ServerOptimizer:
    if cfg.name == "sgd":
        return opt.sgd(cfg.lr)
    if cfg.name == "momentum":
        return opt.momentum(cfg.lr, cfg.beta, cfg.nesterov)
    if cfg.name == "adam":
        return opt.adam(cfg.lr, cfg.beta, cfg.beta2, cfg.eps)
    if cfg.name == "slowmo":
        return opt.slowmo(cfg.lr, cfg.beta)
    raise ValueError(f"unknown optimizer {cfg.name!r}; allowed: {', '.join(opt.OPTIMIZERS)}")


def build_aggregator(
    name: str,
    *,
    f: int = 0,
    optimizer: opt.ServerOptimizer | None = None,
    options: dict[str, Any] | None = None,
) -> Aggregator:
    """Build the aggregator `name` assuming `f` Byzantine workers.

    Classical and robust rules are followed by `optimizer` (default SGD, lr 1).
    """
    kind, arg = parse_aggregator_name(name)
    if kind not in _BUILDERS:
        raise ValueError(f"unknown aggregator {kind!r}; allowed: {', '.join(aggregator_names())}")
    optimizer = optimizer if optimizer is not None else opt.sgd(1.0)
    options = dict(options or {})
    try:
        return _BUILDERS[kind](f=f, optimizer=optimizer, options=options, arg=arg)
    except TypeError as exc:
        raise ValueError(f"aggregator {kind!r}: bad options {options} ({exc})") from None


def _kernel(name: str, kernel_name: str, min_updates: Callable[[int], int], takes_f: bool):
    """Register a robust kernel from metagg.robust as `name`."""

    def build(*, f: int, optimizer, options: dict[str, Any], arg: str | None) -> Aggregator:
        from metagg import robust

        kernel = getattr(robust, kernel_name)
        kwargs = ({"f": f} if takes_f else {}) | options
        return RuleAggregator(name, KernelRule(kernel, **kwargs), optimizer,
                              min_updates=min_updates(f))

    register(name)(build)


_kernel("mean", "mean", lambda f: 1, takes_f=False)
_kernel("median", "coordinate_median", lambda f: 1, takes_f=False)
_kernel("trimmed_mean", "trimmed_mean", lambda f: 2 * f + 1, takes_f=True)
_kernel("krum", "krum", lambda f: 2 * f + 3, takes_f=True)
_kernel("multi_krum", "multi_krum", lambda f: 2 * f + 3, takes_f=True)
_kernel("geometric_median", "geometric_median", lambda f: 1, takes_f=False)
_kernel("bulyan", "bulyan", lambda f: 4 * f + 3, takes_f=True)
