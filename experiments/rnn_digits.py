"""Meta-train an RNN aggregator on digits and compare it with tuned mean+SGD / mean+Adam.

    . .venv/bin/activate
    python experiments/rnn_digits.py train  --out runs/rnn-digits/lstm-normalized
    python experiments/rnn_digits.py compare --out runs/rnn-digits/lstm-normalized
    python experiments/rnn_digits.py train --output paper --out runs/rnn-digits/lstm-paper
    python experiments/rnn_digits.py compare --rnn-only --out runs/rnn-digits/lstm-paper

Setting (Ji §5.2 on the built-in digits): MLP 64-20-10 sigmoid (d = 1510), 10 IID
workers, batch 32, gradient mode; meta-training T = 100, K = 20, Adam 1e-3, clip 1.
Evaluation: 5 held-out model seeds (stream 7, disjoint from training (0) and
validation (1) seeds), train loss on the full train split at 100 and 400 rounds,
test accuracy beside it.
"""

import argparse
import json
import time

import torch

from metagg.aggregators import optimizers as opt
from metagg.aggregators.registry import build_aggregator
from metagg.learned import MetaEnv, MetaTrainConfig, evaluate_aggregator, load_aggregator
from metagg.learned.meta_bptt import derive_seed, meta_train_rnn

p = argparse.ArgumentParser()
p.add_argument("what", choices=["train", "compare"])
p.add_argument("--out", required=True)
p.add_argument("--iterations", type=int, default=300)
p.add_argument("--output", default="normalized")
p.add_argument("--cell", default="lstm")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--rnn-only", action="store_true", help="compare: skip the baseline grids")
args = p.parse_args()
torch.set_num_threads(1)  # d = 1510: one thread is as fast and shares the machine

if args.what == "train":
    t = time.perf_counter()
    r = meta_train_rnn(iterations=args.iterations, out_dir=args.out, output=args.output,
                       cell=args.cell, seed=args.seed, progress=False)
    print(json.dumps({"best_iteration": r.best_iteration, "best_score": r.best_score,
                      "iterations_run": max(h["iteration"] for h in r.history),
                      "wall_s": round(time.perf_counter() - t, 1)}))
else:
    env = MetaEnv(MetaTrainConfig())
    seeds = [derive_seed(0, 7, j) for j in range(5)]
    horizons = (100, 400)
    rows = {}
    t = time.perf_counter()
    rows["rnn"] = evaluate_aggregator(load_aggregator(args.out), env, seeds, horizons)
    for lr in () if args.rnn_only else (0.5, 1, 2, 4, 8):
        rows[f"mean+sgd lr={lr}"] = evaluate_aggregator(
            build_aggregator("mean", optimizer=opt.sgd(lr)), env, seeds, horizons)
    for lr in () if args.rnn_only else (0.01, 0.03, 0.1, 0.3):
        rows[f"mean+adam lr={lr}"] = evaluate_aggregator(
            build_aggregator("mean", optimizer=opt.adam(lr)), env, seeds, horizons)
    summary = {k: {m: round(v[f"mean_{m}"], 5) for m in
                   ("loss@100", "loss@400", "acc@100", "acc@400")} for k, v in rows.items()}
    for k, v in summary.items():
        print(f"{k:22s} " + "  ".join(f"{m} {x:.4f}" for m, x in v.items()))
    name = "rnn_only.json" if args.rnn_only else "comparison.json"
    with open(f"{args.out}/{name}", "w") as fh:
        json.dump({"seeds": seeds, "summary": summary, "per_seed": rows}, fh, indent=1)
    print(f"compare took {time.perf_counter() - t:.0f} s")
