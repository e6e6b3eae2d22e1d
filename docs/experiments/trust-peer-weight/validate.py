"""Choose the trust rule's peer weight μ on validation seeds (never the benchmark's seed 0).

    python docs/experiments/trust-peer-weight/validate.py 0,10,30,100 digits out.json
    python docs/experiments/trust-peer-weight/validate.py 0,10,30,100 fashion_mnist out.json

For each μ: `trust:pretrained/robust`'s φ with peer_weight μ, every 3/10 setting of the
meta-training mixture × worker momentum 0 / 0.9 × IID / Dirichlet (α 0.5) × the first two
validation seeds, 100 rounds (the meta-training inner run). Prints the mean log final
train loss (lower is better: the meta-training's validation score) and the accuracies;
μ only acts while 0 < 2f < n, so no-attack and 7/10 runs are left out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time

import torch

from metagg.config.meta import MetaTrainTrustConfig
from metagg.learned.meta.estimators import validation_seeds
from metagg.learned.meta.robust import Setting, TrustES
from metagg.learned.trust.io import load_trust
from metagg.seeding import MetaStream


def main(mus: list[float], dataset: str, out: str) -> None:
    torch.set_num_threads(1)
    shipped = load_trust("pretrained/robust")
    results = {}
    for mu in mus:
        cfg = MetaTrainTrustConfig(dataset=dataset, budget=shipped.config.budget,
                                   reference_share=shipped.config.reference_share,
                                   peer_weight=mu)
        es = TrustES(cfg)
        assert dataclasses.replace(shipped.config, peer_weight=mu) == es.trust
        seeds = validation_seeds(cfg.seed, int(MetaStream.ROBUST_VALID), 2)
        attacks = sorted({a for a, b in es.mixture if b == 3})
        rows, start = [], time.perf_counter()
        for attack in attacks:
            for momentum in (0.0, 0.9):
                for partition in ("iid", "dirichlet"):
                    for seed in seeds:
                        r = es.run(shipped.phi, Setting(attack, 3, momentum, partition, seed))
                        rows.append({"attack": attack, "momentum": momentum,
                                     "partition": partition, "seed": seed,
                                     "loss": r["train_loss"], "acc": r["test_accuracy"]})
        score = statistics.fmean(math.log(r["loss"]) for r in rows)
        accs = [r["acc"] for r in rows]
        results[str(mu)] = {"score": score, "rows": rows}
        print(f"μ {mu:g}: score {score:.4f}, mean acc {statistics.fmean(accs):.4f}, "
              f"worst {min(accs):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        for attack in attacks:
            for partition in ("iid", "dirichlet"):
                sel = [r["acc"] for r in rows
                       if r["attack"] == attack and r["partition"] == partition]
                print(f"   {attack} {partition}: mean {statistics.fmean(sel):.3f}, "
                      f"min {min(sel):.3f}", flush=True)
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main([float(x) for x in sys.argv[1].split(",")], sys.argv[2], sys.argv[3])
