"""Choose one `TrustConfig` field of the shipped trust rule on validation seeds (never the
robustness benchmark's seed 0).

    python docs/experiments/trust-validate.py peer_weight 0,10,30,100 digits out.json
    python docs/experiments/trust-validate.py reference_workers none,2,3,4 fashion_mnist \
        out.json --counts 3,7

For each value ("none": null): `trust:pretrained/robust`'s φ and config (or those of
`--weights PATH`) with that field replaced, every setting of the meta-training mixture
with `--counts` Byzantine workers (default 3) × worker momentum 0 / 0.9 × IID / Dirichlet
(α 0.5) × the first two validation seeds, 100 rounds (the meta-training inner run).
Prints the mean log final train loss (lower is better: the meta-training's validation
score), the accuracies per count and partition, and writes every run to out.json. With
`reference_workers` the shipped `reference_share` is set to 0 (the two are exclusive).

With `--target` it also runs Zeno and FLTrust on the same settings and the rule without
attack (the mean) per momentum × partition × seed, and counts, as the robustness
benchmark does, the runs within 1 point of the better of Zeno and FLTrust and those also
at ≥ 95 % of the no-attack accuracy: the issue's measure, which the mean log loss does
not follow (a candidate that won on the score lost 19 of 190 benchmark cells, most by a
point on IID data: docs/experiments/trust-reference-workers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

import torch

from metagg.aggregators.registry import build_aggregator
from metagg.config.meta import MetaTrainTrustConfig
from metagg.learned.meta.estimators import validation_seeds
from metagg.learned.meta.robust import Setting, TrustES
from metagg.learned.trust.io import load_trust
from metagg.seeding import MetaStream

# the TrustConfig fields that meta-training also takes (MetaTrainTrustConfig options)
FIELDS = ("budget", "reference_share", "reference_workers", "peer_weight")


def parse_value(text: str) -> float | None:
    return None if text == "none" else float(text)


def baseline_accuracy(es: TrustES, phi: torch.Tensor, rule: str, setting: Setting) -> float:
    """Final test accuracy of Zeno or FLTrust (told f) on one validation setting."""
    sim = es.simulation(phi, setting)  # the trust rule's run, its rule then replaced
    sim.aggregator.rule = build_aggregator(rule, f=setting.num_byzantine, seed=setting.seed).rule
    sim.reset()  # the state of the rule now in place
    for _ in range(es.cfg.rounds):
        sim.step()
    return sim.evaluate()["test_accuracy"]


def target_counts(es: TrustES, phi: torch.Tensor, rows: list[dict], cache: dict) -> str:
    """The runs meeting the benchmark's bars (vs Zeno/FLTrust − 1; and ≥ 95 % no-attack)."""
    first = second = 0
    for r in rows:
        key = (r["attack"], r["byzantine"], r["momentum"], r["partition"], r["seed"])
        setting = Setting(*key)
        if key not in cache:
            cache[key] = max(baseline_accuracy(es, phi, "zeno", setting),
                             baseline_accuracy(es, phi, "fltrust", setting))
        clean_key = ("none", 0, r["momentum"], r["partition"], r["seed"])
        if clean_key not in cache:
            cache[clean_key] = es.run(phi, Setting(*clean_key))["test_accuracy"]
        if r["acc"] >= cache[key] - 0.01 - 1e-9:
            first += 1
            second += r["acc"] >= 0.95 * cache[clean_key] - 1e-9
    return f"{first}/{len(rows)} within 1 point of Zeno/FLTrust ({second} also >= 95 % clean)"


def main(field: str, values: list[float | None], dataset: str, out: str,
         counts: list[int], weights: str = "pretrained/robust", target: bool = False) -> None:
    torch.set_num_threads(1)
    shipped = load_trust(weights)
    base = {k: getattr(shipped.config, k) for k in FIELDS}
    results, cache = {}, {}
    for value in values:
        chosen = {**base, field: value}
        if field == "reference_workers" and value is not None:
            chosen["reference_share"] = 0.0
        cfg = MetaTrainTrustConfig(dataset=dataset, **chosen)
        es = TrustES(cfg)
        assert es.trust == dataclasses.replace(shipped.config, **chosen)
        seeds = validation_seeds(cfg.seed, int(MetaStream.ROBUST_VALID), 2)
        settings = sorted({(a, b) for a, b in es.mixture if b in counts})
        rows, start = [], time.perf_counter()
        for attack, b in settings:
            for momentum in (0.0, 0.9):
                for partition in ("iid", "dirichlet"):
                    for seed in seeds:
                        r = es.run(shipped.phi, Setting(attack, b, momentum, partition, seed))
                        rows.append({"attack": attack, "byzantine": b, "momentum": momentum,
                                     "partition": partition, "seed": seed,
                                     "loss": r["train_loss"], "acc": r["test_accuracy"]})
        score = statistics.fmean(math.log(r["loss"]) for r in rows)
        accs = [r["acc"] for r in rows]
        results[str(value)] = {"score": score, "rows": rows}
        counted = f", {target_counts(es, shipped.phi, rows, cache)}" if target else ""
        print(f"{field} {value}: score {score:.4f}, mean acc {statistics.fmean(accs):.4f}, "
              f"worst {min(accs):.4f}{counted} ({len(rows)} runs, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
        for b in counts:
            for partition in ("iid", "dirichlet"):
                sel = [r for r in rows if r["byzantine"] == b and r["partition"] == partition]
                print(f"   {b}/{cfg.num_workers} {partition}: score "
                      f"{statistics.fmean(math.log(r['loss']) for r in sel):.4f}, mean acc "
                      f"{statistics.fmean(r['acc'] for r in sel):.3f}, "
                      f"min {min(r['acc'] for r in sel):.3f}", flush=True)
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("field", choices=FIELDS)
    parser.add_argument("values", help="comma-separated; 'none' for null")
    parser.add_argument("dataset")
    parser.add_argument("out")
    parser.add_argument("--counts", default="3", help="Byzantine counts, e.g. 3,7")
    parser.add_argument("--weights", default="pretrained/robust",
                        help="the trust rule whose φ and config are run")
    parser.add_argument("--target", action="store_true",
                        help="also count the runs meeting the benchmark's bars")
    args = parser.parse_args()
    main(args.field, [parse_value(v) for v in args.values.split(",")], args.dataset, args.out,
         [int(c) for c in args.counts.split(",")], args.weights, args.target)
