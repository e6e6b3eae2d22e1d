"""While 2f ≥ n, pick the direction among candidates by the trusted loss (issue 15, tried in
session 17, not shipped), scored with the benchmark's bars on the validation seeds.

    python docs/experiments/trust-reference-workers/trusted_choice.py digits \
        shipped,top|shipped,safe-r,top|shipped|r

Candidates, each mixed with the server's update r as the shipped rule mixes it (λ = 0.5):
shipped (the learned gates), top (the n − f best-scored rows averaged); "safe-r" is the
shipped direction unless r alone leaves the lower trusted loss; "guard-r" / "top-guard-r"
the shipped / top direction unless it raises the trusted loss (then r). The server takes the
candidate with the lowest trusted loss at θ − γ·d (γ = 1, the benchmark's server lr; a
suffix @G sets γ). Every 7/10 setting of the meta-training mixture × worker momentum
0 / 0.9 × IID / Dirichlet × two validation seeds, 100 rounds, the shipped φ.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

import metagg.learned.meta.robust as robust
from metagg.aggregators.rules import momentum_reference
from metagg.config.meta import MetaTrainTrustConfig
from metagg.learned.meta.estimators import validation_seeds
from metagg.learned.meta.robust import Setting, TrustES
from metagg.learned.trust.io import load_trust
from metagg.learned.trust.model import TrustRule, _norms
from metagg.seeding import MetaStream

_spec = importlib.util.spec_from_file_location(
    "trust_validate", Path(__file__).parents[1] / "trust-validate.py")
trust_validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trust_validate)

VARIANT, GAMMA = "shipped", 1.0
CANDIDATES = {"safe-r": ("shipped", "r"), "top|shipped": ("top", "shipped"),
              "top|shipped|r": ("top", "shipped", "r"), "top|r": ("top", "r"),
              "guard-r": ("shipped", "r"), "top-guard-r": ("top", "r")}
GUARDS = ("guard-r", "top-guard-r")


class ChoosingRule(TrustRule):
    def __call__(self, state, updates, ctx):
        n = len(updates)
        if VARIANT == "shipped" or 2 * self.f < n:
            return super().__call__(state, updates, ctx)
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
            losses = ctx.trusted.loss(torch.stack([ctx.params, ctx.params - GAMMA * cands[0]]))
            return cands[int(losses[1].detach() > losses[0].detach())].to(updates.dtype), state
        losses = ctx.trusted.loss(torch.stack([ctx.params - GAMMA * d for d in cands]))
        return cands[int(losses.detach().argmin())].to(updates.dtype), state


def main(dataset: str, variants: list[str]) -> None:
    global VARIANT, GAMMA
    torch.set_num_threads(1)
    robust.TrustRule = ChoosingRule  # the rule TrustES's runs build
    shipped = load_trust("pretrained/robust")
    c = shipped.config
    es = TrustES(MetaTrainTrustConfig(dataset=dataset, budget=c.budget,
                                      reference_share=c.reference_share,
                                      peer_weight=c.peer_weight))
    seeds = validation_seeds(es.cfg.seed, int(MetaStream.ROBUST_VALID), 2)
    settings = sorted({(a, b) for a, b in es.mixture if b == 7})
    cache: dict = {}  # Zeno's, FLTrust's and the no-attack accuracies, shared
    for variant in variants:
        VARIANT, _, gamma = variant.partition("@")
        GAMMA = float(gamma or 1.0)
        rows = [{"attack": a, "byzantine": b, "momentum": m, "partition": p, "seed": s,
                 "acc": es.run(shipped.phi, Setting(a, b, m, p, s))["test_accuracy"]}
                for a, b in settings for m in (0.0, 0.9) for p in ("iid", "dirichlet")
                for s in seeds]
        worst = min(rows, key=lambda r: r["acc"])
        print(dataset, variant, trust_validate.target_counts(es, shipped.phi, rows, cache),
              f"worst {worst['acc']:.3f} ({worst['attack']}, {worst['partition']}, "
              f"momentum {worst['momentum']})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
