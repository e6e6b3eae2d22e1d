"""While 2f ≥ n, pick the direction among candidates by the trusted loss (issue 15, tried in
session 17, not shipped), scored with the benchmark's bars on the validation seeds.

    python docs/experiments/trust-reference-workers/trusted_choice.py digits \
        shipped,top|shipped,safe-r,top|shipped|r

Candidates, each mixed with the server's update r as the shipped rule mixes it (λ = 0.5):
shipped (the learned gates), top (the n − f best-scored rows averaged); "safe-r" is the
shipped direction unless r alone leaves the lower trusted loss; "guard-r" / "top-guard-r"
the shipped / top direction unless it raises the trusted loss (then r). A "split:" prefix
computes r and the rows' features on one half of the trusted sample and judges the
candidates on the other (r is then not judged on the sample it was fitted to). The server takes the
candidate with the lowest trusted loss at θ − γ·d (γ = 1, the benchmark's server lr; a
suffix @G sets γ). Every 7/10 setting of the meta-training mixture × worker momentum
0 / 0.9 × IID / Dirichlet × two validation seeds, 100 rounds, the shipped φ.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch

from metagg.aggregators.rules import momentum_reference
from metagg.learned.trust.model import TrustRule, _norms

_spec = importlib.util.spec_from_file_location("weighting", Path(__file__).with_name(
    "weighting.py"))
weighting = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(weighting)  # its 7/10 validation runs and their scoring

VARIANT, GAMMA, SPLIT = "shipped", 1.0, False
CANDIDATES = {"safe-r": ("shipped", "r"), "top|shipped": ("top", "shipped"),
              "top|shipped|r": ("top", "shipped", "r"), "top|r": ("top", "r"),
              "guard-r": ("shipped", "r"), "top-guard-r": ("top", "r")}
GUARDS = ("guard-r", "top-guard-r")


class ChoosingRule(TrustRule):
    def __call__(self, state, updates, ctx):
        n = len(updates)
        if VARIANT == "shipped" or 2 * self.f < n:
            return super().__call__(state, updates, ctx)
        judge = ctx.trusted
        if SPLIT:  # r and the features from one half of the sample, the choice by the other
            half = len(judge) // 2
            ctx = dataclasses.replace(ctx, trusted=dataclasses.replace(
                judge, x=judge.x[:half], y=judge.y[:half]))
            judge = dataclasses.replace(judge, x=judge.x[half:], y=judge.y[half:])
        with torch.no_grad():
            reference, state = momentum_reference(state, ctx)
        reference = reference.to(ctx.params.dtype)
        u = updates.to(ctx.params.dtype)
        feats = self.features(updates, ctx, reference)
        p = self.config.layout.unflatten(self.phi.to(ctx.params.dtype))
        clip = (p["log_clip"].exp() * reference.norm() / _norms(u).clamp_min(1e-12)).clamp(max=1)
        share = self.reference_share(n)
        keep = n - self.f
        best_rows = self.score(feats).detach().argsort(descending=True)[:keep]
        top = torch.zeros(n, dtype=u.dtype).index_put((best_rows,), torch.ones(keep)) / keep
        directions = {"shipped": self.weights(feats), "top": top}
        cands = [reference if c == "r" else (1 - share) * ((directions[c] * clip) @ u)
                 + share * reference for c in CANDIDATES[VARIANT]]
        if VARIANT in GUARDS:  # the first candidate unless it goes uphill on the trusted data
            losses = judge.loss(torch.stack([ctx.params, ctx.params - GAMMA * cands[0]]))
            return cands[int(losses[1].detach() > losses[0].detach())].to(updates.dtype), state
        losses = judge.loss(torch.stack([ctx.params - GAMMA * d for d in cands]))
        return cands[int(losses.detach().argmin())].to(updates.dtype), state


def main(dataset: str, variants: list[str]) -> None:
    def choose(variant: str) -> None:
        global VARIANT, GAMMA, SPLIT
        name, _, gamma = variant.partition("@")
        SPLIT = name.startswith("split:")
        VARIANT = name.removeprefix("split:")
        GAMMA = float(gamma or 1.0)

    weighting.score_variants(dataset, ChoosingRule, variants, choose)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
