"""Aggregators by name: `build_aggregator("krum", f=3, optimizer=sgd(0.5))`.

Names are what configs and the CLI use (`aggregator: median`, `--aggregators
mean,krum`); a pre-aggregation composes with a rule (`nnm+krum`, `bucketing+median`);
learned aggregators take an argument after a colon (`rnn:runs/rnn`, `lagg:pretrained/...`).

Every entry is a declarative `AggregatorSpec`: how to build the reduction rule, how many
updates its guarantee needs for a given f (and how few it can run on outside it), and
whether it needs the server's trusted data. The registry builds each aggregator once,
complete, from that spec. Learned aggregators are registered by a "module:function"
string and imported only when built, so nothing here imports `metagg.learned`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metagg import robust
from metagg.aggregators import optimizers as opt
from metagg.aggregators.base import Aggregator, KernelRule, Rule, RuleAggregator
from metagg.aggregators.preagg import PRE_AGGREGATIONS, PreAggregatedRule
from metagg.aggregators.rules import CenteredClipRule, CoverageMeanRule, FLTrustRule, ZenoRule

__all__ = [
    "PRE_AGGREGATIONS",
    "AggregatorSpec",
    "aggregator_names",
    "aggregator_spec",
    "build_aggregator",
    "check_aggregator_name",
    "parse_aggregator_name",
]

@dataclass(frozen=True)
class AggregatorSpec:
    """One registered aggregator.

    Attributes:
        name: what configs call it.
        summary: one line for `metagg list`.
        rule: `rule(f, seed, options) -> Rule` for a reduction followed by the server
            optimizer (classical and robust rules).
        build: "module:function" of a learned aggregator's builder
            `function(arg, options) -> Aggregator` (it produces the step itself).
        learned_rule: "module:function" of a learned *rule*'s builder
            `function(arg, options) -> Rule`: a reduction like `rule`, followed by the
            server optimizer (the trust rule).
        fewest: updates the rule's robustness guarantee needs, as a function of f.
        requirement: that guarantee as text ("n > 2f + 2"), for error messages.
        fewest_unsafe: updates the rule needs to be defined at all, with
            `options: {allow_unsafe: true}`; None: it cannot run below `fewest`.
        uses_trusted_data: it needs the server's trusted sample (Zeno, FLTrust, ARNN).
    """

    name: str
    summary: str
    rule: Callable[[int, int, dict[str, Any]], Rule] | None = None
    build: str | None = None
    learned_rule: str | None = None
    fewest: Callable[[int], int] | None = None
    requirement: str = ""
    fewest_unsafe: Callable[[int], int] | None = None
    uses_trusted_data: bool = False

    def min_updates(self, f: int, unsafe: bool = False) -> int:
        if self.fewest is None:
            return 1
        if unsafe and self.fewest_unsafe is not None:
            return self.fewest_unsafe(f)
        return self.fewest(f)


def _kernel(name: str, summary: str, kernel: Callable[..., Any], *, takes_f: bool = False,
            **limits: Any) -> AggregatorSpec:
    """A pure `metagg.robust` kernel as a rule (f passed on when the kernel takes it)."""

    def rule(f: int, seed: int, options: dict[str, Any]) -> Rule:
        return KernelRule(kernel, f=f, **options) if takes_f else KernelRule(kernel, **options)

    return AggregatorSpec(name, summary, rule=rule, **limits)


def _zeno(f: int, seed: int, options: dict[str, Any]) -> Rule:
    return ZenoRule(**{"discard": f, "seed": seed, **options})


_SPECS: tuple[AggregatorSpec, ...] = (
    _kernel("mean", "average of the updates (FedAvg with sgd lr 1 in local-SGD mode)",
            robust.mean),
    _kernel("median", "coordinate-wise median", robust.coordinate_median),
    _kernel("geometric_median", "smoothed Weiszfeld geometric median (options: iters, nu)",
            robust.geometric_median),
    _kernel("trimmed_mean", "coordinate-wise mean without the f largest and f smallest",
            robust.trimmed_mean, takes_f=True, fewest=lambda f: 2 * f + 1,
            requirement="n > 2f"),
    _kernel("krum", "the update closest to its n − f − 2 nearest neighbours",
            robust.krum, takes_f=True, fewest=lambda f: 2 * f + 3, requirement="n > 2f + 2",
            fewest_unsafe=lambda f: f + 3),
    _kernel("multi_krum", "mean of the m best Krum scores (option m, default n − f)",
            robust.multi_krum, takes_f=True, fewest=lambda f: 2 * f + 3,
            requirement="n > 2f + 2", fewest_unsafe=lambda f: f + 3),
    _kernel("bulyan", "Krum selection of n − 2f, then a trimmed mean of the middle",
            robust.bulyan, takes_f=True, fewest=lambda f: 4 * f + 3, requirement="n >= 4f + 3",
            fewest_unsafe=lambda f: 4 * f + 1),
    AggregatorSpec("centered_clip", "centered clipping around the last aggregate "
                   "(options: tau, iters)", rule=lambda f, seed, o: CenteredClipRule(**o)),
    AggregatorSpec("zeno", "mean of the n − f updates that lower the trusted loss most "
                   "(options: gamma, rho, batch)", rule=_zeno, uses_trusted_data=True),
    AggregatorSpec("fltrust", "updates weighted by their cosine with the server's own update",
                   rule=lambda f, seed, o: FLTrustRule(**o), uses_trusted_data=True),
    AggregatorSpec("coverage_mean", "per-coordinate mean over the workers whose model has the "
                   "coordinate (heterogeneous workers)",
                   rule=lambda f, seed, o: CoverageMeanRule(**o)),
    AggregatorSpec("rnn", "learned coordinatewise LSTM/GRU (Ji et al. 2019): rnn:PATH",
                   build="metagg.learned.rnn.io:build_rnn"),
    AggregatorSpec("arnn", "learned RNN that also sees the trusted-sample losses: arnn:PATH",
                   build="metagg.learned.rnn.io:build_arnn", uses_trusted_data=True),
    AggregatorSpec("lagg", "learned optimizer on every worker's update (LAgg-A): lagg:PATH",
                   build="metagg.learned.lagg.io:build_lagg"),
    AggregatorSpec("lopt", "learned optimizer on the mean update (LOpt-A): lopt:PATH",
                   build="metagg.learned.lagg.io:build_lopt"),
    AggregatorSpec("trust", "learned robust weights from the trusted sample: trust:PATH "
                   "(trust:pretrained/robust)",
                   learned_rule="metagg.learned.trust.io:build_trust_rule",
                   uses_trusted_data=True),
)
_REGISTRY: dict[str, AggregatorSpec] = {s.name: s for s in _SPECS}


def aggregator_names() -> list[str]:
    return sorted(_REGISTRY)


def aggregator_spec(name: str) -> AggregatorSpec:
    """The registry entry of a base name ('krum', not 'nnm+krum' or 'rnn:PATH')."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown aggregator {name!r}; allowed: {', '.join(aggregator_names())}")
    return _REGISTRY[name]


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
    if base not in _REGISTRY:
        return f"unknown value {base!r}; allowed: {', '.join(aggregator_names())}"
    if plus and _REGISTRY[base].rule is None and _REGISTRY[base].learned_rule is None:
        return f"{pre}+{base}: pre-aggregation applies to rule-based aggregators"
    return None


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
    still defined; rules without a guarantee ignore it. `bucket_size` (default 2)
    goes to bucketing; every other option to the rule (or learned builder).
    """
    problem = check_aggregator_name(name)
    if problem:
        raise ValueError(f"aggregator: {problem}")
    kind, arg = parse_aggregator_name(name)
    pre, _, kind = kind.rpartition("+")
    spec = _REGISTRY[kind]
    options = dict(options or {})
    if spec.build is not None:
        module, _, function = spec.build.partition(":")
        return getattr(importlib.import_module(module), function)(arg, options)

    unsafe = bool(options.pop("allow_unsafe", False))
    bucket_size = int(options.pop("bucket_size", 2)) if pre == "bucketing" else 2
    if unsafe and spec.fewest is not None:
        options["allow_unsafe"] = True  # the kernel checks its own guarantee too
    if spec.learned_rule is not None:
        module, _, function = spec.learned_rule.partition(":")
        rule = getattr(importlib.import_module(module), function)(arg, options, f)
    else:
        assert spec.rule is not None
        try:
            rule = spec.rule(f, seed, options)
        except TypeError as exc:
            raise ValueError(f"aggregator {kind!r}: bad options {options} ({exc})") from None
    fewest = spec.min_updates(f, unsafe)
    requirement, can_run_unsafe = spec.requirement, spec.fewest_unsafe is not None
    if pre == "bucketing":  # the rule sees ceil(n / s) bucket means
        fewest *= bucket_size
    elif pre == "nnm":  # NNM's own guarantee, n > 2f; with allow_unsafe it needs n - f >= 1
        fewest = max(fewest, f + 1 if unsafe else 2 * f + 1)
        requirement, can_run_unsafe = requirement or "n > 2f", True
    if pre:
        rule = PreAggregatedRule(pre, rule, f=f, bucket_size=bucket_size, seed=seed,
                                 allow_unsafe=unsafe)
    return RuleAggregator(f"{pre}+{kind}" if pre else kind, rule,
                          optimizer if optimizer is not None else opt.sgd(1.0),
                          min_updates=fewest, requirement=requirement,
                          can_run_unsafe=can_run_unsafe,
                          uses_trusted_data=spec.uses_trusted_data)
