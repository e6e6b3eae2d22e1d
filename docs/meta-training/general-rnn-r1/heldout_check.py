"""Gradient-mode check of a general RNN aggregator on the quick held-out tasks, against
mean aggregation + server SGD and + server Adam, each tuned on each task.

    python docs/meta-training/general-rnn-r1/heldout_check.py docs/meta-training/general-rnn-r1

Per held-out task that needs no download and no CNN (digits MLP20 sigmoid, Fashion-MNIST
784-128-128, breast cancer, synthetic 128 features; `metagg.tasks.HELD_OUT`): M workers
(the RNN's), the task's batch size, gradient mode. Each baseline's server lr is chosen from
its grid by the training loss at T on a tuning seed (7777), then every method runs on
seeds 101, 102 to 4T. Prints one JSON line per task: losses at T and 4T per seed, the
chosen lrs, and whether the RNN is below both tuned baselines on every seed (the issue's
target for the general RNN).
"""
import dataclasses
import json
import math
import sys
import time

import torch

from metagg.aggregators import optimizers as opt
from metagg.aggregators.registry import build_aggregator
from metagg.config.meta import MetaTrainConfig
from metagg.learned.meta import GradientEnv, evaluate_aggregator
from metagg.learned.zoo import load_aggregator
from metagg.tasks.families import HELD_OUT

GRIDS = {"sgd": [0.03, 0.1, 0.3, 1.0, 3.0], "adam": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}
TUNING_SEED, SEEDS = 7777, (101, 102)

torch.set_num_threads(1)
path = sys.argv[1]
T = int(sys.argv[2]) if len(sys.argv) > 2 else 100
rnn = load_aggregator(path)


def final_loss(agg, env, seeds, horizons):
    return evaluate_aggregator(agg, env, list(seeds), horizons)


for spec in HELD_OUT:
    if spec.dataset.startswith(("text", "wine")) or "cnn" in spec.model:
        continue
    t0 = time.time()
    cfg = dataclasses.replace(MetaTrainConfig(), dataset=spec.dataset, model=spec.model,
                              num_workers=rnn.config.num_workers,
                              batch_size=spec.batch_size, partition=spec.partition)
    env = GradientEnv(cfg, spec.load())
    row = {}
    for name, grid in GRIDS.items():
        def tuned_loss(lr, name=name):
            loss = final_loss(build_aggregator("mean", optimizer=getattr(opt, name)(lr)), env,
                              [TUNING_SEED], (T,))[f"loss@{T}"][0]
            return loss if math.isfinite(loss) else math.inf
        lr = min(grid, key=tuned_loss)
        res = final_loss(build_aggregator("mean", optimizer=getattr(opt, name)(lr)), env,
                         SEEDS, (T, 4 * T))
        row[name] = {"lr": lr, "T": res[f"loss@{T}"], "4T": res[f"loss@{4 * T}"]}
    res = final_loss(rnn, env, SEEDS, (T, 4 * T))
    row["rnn"] = {"T": res[f"loss@{T}"], "4T": res[f"loss@{4 * T}"]}
    row["below_both_every_seed"] = {
        h: all(r < min(row["sgd"][h][i], row["adam"][h][i]) for i, r in enumerate(row["rnn"][h]))
        for h in ("T", "4T")}
    print(json.dumps({"task": spec.name, **row, "s": round(time.time() - t0)}), flush=True)
