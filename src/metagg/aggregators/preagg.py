"""Pre-aggregation before a rule: NNM (nearest-neighbour mixing) or bucketing, then any
rule ("nnm+krum", "bucketing+median"; the kernels are `metagg.robust.nnm` / `bucketing`)."""

from __future__ import annotations

from typing import Any

import torch

from metagg import robust
from metagg.aggregators.base import RoundContext, Rule
from metagg.layout import ParamLayout
from metagg.seeding import RoundStream, round_generator

__all__ = ["PRE_AGGREGATIONS", "PreAggregatedRule"]

PRE_AGGREGATIONS = ("nnm", "bucketing")


class PreAggregatedRule:
    """A pre-aggregation step (NNM or bucketing) applied before another rule."""

    def __init__(self, pre: str, rule: Rule, *, f: int, bucket_size: int = 2, seed: int = 0,
                 allow_unsafe: bool = False):
        if pre not in ("nnm", "bucketing"):
            raise ValueError(f"unknown pre-aggregation {pre!r}; allowed: nnm, bucketing")
        self.pre, self.rule, self.f = pre, rule, f
        self.bucket_size, self.seed, self.allow_unsafe = bucket_size, seed, allow_unsafe

    def init(self, layout: ParamLayout, num_workers: int) -> Any:
        return self.rule.init(layout, num_workers)

    def __call__(self, state: Any, updates: torch.Tensor, ctx: RoundContext):
        if self.pre == "nnm":
            mixed = robust.nnm(updates, self.f, allow_unsafe=self.allow_unsafe)
        else:
            g = round_generator(self.seed, ctx.round, RoundStream.AGGREGATOR)
            mixed = robust.bucketing(updates, self.bucket_size, generator=g)
        return self.rule(state, mixed, ctx)
