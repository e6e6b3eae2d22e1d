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
from metagg.aggregators.rules import CenteredClipRule, FLTrustRule, PreAggregatedRule, ZenoRule
from metagg.config import OptimizerConfig

__all__ = [
    "PRE_AGGREGATIONS",
    "aggregator_names",
    "build_aggregator",
    "build_optimizer",
    "check_aggregator_name",
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


PRE_AGGREGATIONS = ("nnm", "bucketing")


def parse_aggregator_name(name: str) -> tuple[str, str | None]:
    """'rnn:runs/rnn' -> ('rnn', 'runs/rnn'); 'mean' -> ('mean', None)."""
    kind, sep, arg = name.partition(":")
    return kind.strip().lower(), (arg if sep else None)


def check_aggregator_name(name: str) -> str | None:
    """None if `name` names an aggregator ('krum', 'nnm+krum', 'rnn:PATH'), else why not."""
    kind, _ = parse_aggregator_name(name)
    pre, plus, base = kind.rpartition("+")
    if plus and pre not in PRE_AGGREGATIONS:
        return (f"unknown pre-aggregation {pre!r} in {name!r}; allowed: "
                f"{', '.join(PRE_AGGREGATIONS)}")
    if base not in _BUILDERS:
        return f"unknown value {base!r}; allowed: {', '.join(aggregator_names())}"
    return None


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
    seed: int = 0,
) -> Aggregator:
    """Build the aggregator `name` assuming `f` Byzantine workers.

    Classical and robust rules are followed by `optimizer` (default SGD, lr 1).
    `seed` seeds the rule's own randomness (Zeno's subsample, bucketing's shuffle).
    `options: {allow_unsafe: true}` runs a rule outside its guarantee where it is
    still defined; rules without a guarantee ignore it.
    """
    problem = check_aggregator_name(name)
    if problem:
        raise ValueError(f"aggregator: {problem}")
    kind, arg = parse_aggregator_name(name)
    pre, _, kind = kind.rpartition("+")
    optimizer = optimizer if optimizer is not None else opt.sgd(1.0)
    options = dict(options or {})
    unsafe = bool(options.pop("allow_unsafe", False))
    bucket_size = int(options.pop("bucket_size", 2)) if pre == "bucketing" else 2
    builder = _BUILDERS[kind]
    if unsafe and getattr(builder, "takes_allow_unsafe", False):
        options["allow_unsafe"] = True
    if getattr(builder, "takes_seed", False):
        options.setdefault("seed", seed)
    try:
        agg = builder(f=f, optimizer=optimizer, options=options, arg=arg)
    except TypeError as exc:
        raise ValueError(f"aggregator {kind!r}: bad options {options} ({exc})") from None
    if pre:
        if not isinstance(agg, RuleAggregator):
            raise ValueError(f"{pre}+{kind}: pre-aggregation applies to rule-based aggregators")
        agg.rule = PreAggregatedRule(pre, agg.rule, f=f, bucket_size=bucket_size, seed=seed,
                                     allow_unsafe=unsafe)
        agg.name = f"{pre}+{agg.name}"
        if pre == "bucketing":  # the rule sees ceil(n / s) bucket means
            agg.min_updates = agg.min_updates * bucket_size
        else:  # NNM's own guarantee, n > 2f; with allow_unsafe it needs n - f >= 1
            agg.min_updates = max(agg.min_updates, f + 1 if unsafe else 2 * f + 1)
            agg.requirement = agg.requirement or "n > 2f"
            agg.can_run_unsafe = True
    return agg


def _kernel(
    name: str,
    kernel_name: str,
    *,
    guarantee: tuple[Callable[[int], int], str] | None = None,
    defined: Callable[[int], int] | None = None,
) -> None:
    """Register the robust kernel `metagg.robust.<kernel_name>` as aggregator `name`.

    `guarantee` = (fewest updates for the rule's robustness guarantee, the inequality
    as text); `defined` = fewest updates for which the rule is computable at all,
    used with `options: {allow_unsafe: true}`. Rules without f take neither.
    """

    def build(*, f: int, optimizer, options: dict[str, Any], arg: str | None) -> Aggregator:
        from metagg import robust

        kernel = getattr(robust, kernel_name)
        if guarantee is None:  # no f, no guarantee to step outside of
            return RuleAggregator(name, KernelRule(kernel, **options), optimizer)
        unsafe = bool(options.get("allow_unsafe", False))
        least, inequality = guarantee
        agg = RuleAggregator(name, KernelRule(kernel, f=f, **options), optimizer,
                             min_updates=defined(f) if unsafe and defined else least(f))
        agg.requirement = inequality
        agg.can_run_unsafe = defined is not None
        return agg

    build.takes_allow_unsafe = guarantee is not None
    register(name)(build)


_kernel("mean", "mean")
_kernel("median", "coordinate_median")
_kernel("geometric_median", "geometric_median")
_kernel("trimmed_mean", "trimmed_mean", guarantee=(lambda f: 2 * f + 1, "n > 2f"))
_kernel("krum", "krum", guarantee=(lambda f: 2 * f + 3, "n > 2f + 2"), defined=lambda f: f + 3)
_kernel("multi_krum", "multi_krum", guarantee=(lambda f: 2 * f + 3, "n > 2f + 2"),
        defined=lambda f: f + 3)
_kernel("bulyan", "bulyan", guarantee=(lambda f: 4 * f + 3, "n >= 4f + 3"),
        defined=lambda f: 4 * f + 1)


@register("centered_clip")
def _centered_clip(*, f: int, optimizer, options: dict[str, Any], arg: str | None) -> Aggregator:
    return RuleAggregator("centered_clip", CenteredClipRule(**options), optimizer)


@register("zeno")
def _zeno(*, f: int, optimizer, options: dict[str, Any], arg: str | None) -> Aggregator:
    options.setdefault("discard", f)
    return RuleAggregator("zeno", ZenoRule(**options), optimizer, uses_trusted_data=True)


_zeno.takes_seed = True


@register("fltrust")
def _fltrust(*, f: int, optimizer, options: dict[str, Any], arg: str | None) -> Aggregator:
    return RuleAggregator("fltrust", FLTrustRule(**options), optimizer, uses_trusted_data=True)


# Learned aggregators register themselves on import (they import this module).
import metagg.learned.lagg  # noqa: E402  registers lagg/lopt
import metagg.learned.rnn  # noqa: E402, F401  registers rnn/arnn
