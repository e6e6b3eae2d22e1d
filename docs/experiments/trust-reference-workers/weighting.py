"""Other ways to weight the rows while 2f ≥ n (an assumed Byzantine majority), scored on
the validation seeds with the benchmark's bars (`trust-validate.py --target`).

    python docs/experiments/trust-reference-workers/weighting.py digits shipped,top,topgate

shipped: the learned gates on every row, normalised by max(Σ gates, e^ν); top: the n − f
best-scored rows averaged; topgate: only the n − f best-scored rows keep their learned
gate. Every 7/10 setting of the meta-training mixture × worker momentum 0 / 0.9 × IID /
Dirichlet × two validation seeds, 100 rounds, the shipped φ and config.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import metagg.learned.meta.robust as robust
from metagg.config.meta import MetaTrainTrustConfig
from metagg.learned.meta.estimators import validation_seeds
from metagg.learned.meta.robust import Setting, TrustES
from metagg.learned.trust.io import load_trust
from metagg.learned.trust.model import TrustRule
from metagg.seeding import MetaStream

_spec = importlib.util.spec_from_file_location(
    "trust_validate", Path(__file__).parents[1] / "trust-validate.py")
trust_validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trust_validate)

VARIANT = "shipped"


class VariantRule(TrustRule):
    def weights(self, feats, agreement=None):
        n, keep = len(feats), len(feats) - self.f
        if VARIANT == "shipped" or 2 * self.f < n:
            return super().weights(feats, agreement)
        score = self.score(feats)  # no peer term while 2f ≥ n
        best = torch.zeros_like(score).index_put(
            (score.detach().argsort(descending=True)[:keep],), torch.ones(keep))
        if VARIANT == "top":
            return best / keep
        gates = torch.sigmoid(score) * best  # topgate
        floor = self.config.layout.unflatten(self.phi.to(feats.dtype))["log_floor"].exp()
        return gates / torch.maximum(gates.sum(), floor)


def score_variants(dataset: str, rule: type[TrustRule], variants: list[str],
                   choose: Callable[[str], None]) -> None:
    """Every 7/10 validation run of each variant (`choose(variant)` selects it in `rule`),
    printed with the benchmark's bars and the worst run."""
    torch.set_num_threads(1)
    robust.TrustRule = rule  # the rule TrustES's runs build
    shipped = load_trust("pretrained/robust")
    c = shipped.config
    es = TrustES(MetaTrainTrustConfig(dataset=dataset, budget=c.budget,
                                      reference_share=c.reference_share,
                                      peer_weight=c.peer_weight))
    seeds = validation_seeds(es.cfg.seed, int(MetaStream.ROBUST_VALID), 2)
    settings = sorted({(a, b) for a, b in es.mixture if b == 7})
    cache: dict = {}  # Zeno's, FLTrust's and the no-attack accuracies, shared
    for variant in variants:
        choose(variant)
        rows = [{"attack": a, "byzantine": b, "momentum": m, "partition": p, "seed": s,
                 "acc": es.run(shipped.phi, Setting(a, b, m, p, s))["test_accuracy"]}
                for a, b in settings for m in (0.0, 0.9) for p in ("iid", "dirichlet")
                for s in seeds]
        worst = min(rows, key=lambda r: r["acc"])
        print(dataset, variant, trust_validate.target_counts(es, shipped.phi, rows, cache),
              f"worst {worst['acc']:.3f} ({worst['attack']}, {worst['partition']}, "
              f"momentum {worst['momentum']})", flush=True)


def main(dataset: str, variants: list[str]) -> None:
    def choose(variant: str) -> None:
        global VARIANT
        VARIANT = variant

    score_variants(dataset, VariantRule, variants, choose)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
