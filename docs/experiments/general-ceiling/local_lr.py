"""A learned aggregator (or local SGD + server Prodigy) with the workers' local lr tuned
per held-out task, as a user with a small budget could: the quick grid's lrs, each run on
the tuning seed (10000) to R = 100, the best one then on seeds 0..S-1 to 4R = 400.

    python docs/experiments/general-ceiling/local_lr.py digits \
        lagg:docs/meta-training/general-lagg-g5 2
    python docs/experiments/general-ceiling/local_lr.py breast_cancer prodigy 2

Prints one JSON line: the tuning losses, the chosen lr, the mean training loss over the
seeds at R and 4R (compare with the best tuned baseline in the held-out report) and every
run's curve (losses at rounds 0, 100, 200, 300, 400).
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

from metagg.config import config_from_dict
from metagg.config.run import config_to_dict
from metagg.experiments.runs import dataset_for, run_curve
from metagg.tasks.families import HELD_OUT

LOCAL_LRS = (1.0, 0.5, 0.3, 0.1)
TUNING_SEED, R, LONG = 10000, 100, 4


def config(task, method: str, lr: float, seed: int, rounds: int):
    if method == "prodigy":
        return task.run_config(rounds=rounds, seed=seed, local_lr=lr,
                               optimizer={"name": "prodigy", "lr": 1.0})
    data = config_to_dict(task.run_config(rounds=rounds, seed=seed, local_lr=lr))
    data["aggregator"] = {"name": method}
    return config_from_dict(data)


def main(dataset: str, method: str, seeds: int) -> None:
    torch.set_num_threads(1)
    task = next(t for t in HELD_OUT if t.dataset.startswith(dataset))
    tuning = {}
    for lr in LOCAL_LRS:
        cfg = config(task, method, lr, TUNING_SEED, R)
        loss = run_curve(cfg, dataset_for(cfg), 1)[-1]["train_loss"]
        tuning[lr] = loss if loss == loss else float("inf")  # NaN: diverged
    best = min(tuning, key=tuning.get)
    runs = []
    for seed in range(seeds):
        cfg = config(task, method, best, seed, LONG * R)
        runs.append([row["train_loss"] for row in run_curve(cfg, dataset_for(cfg), LONG)])
    print(json.dumps({"task": task.name, "method": method, "tuning": tuning, "local_lr": best,
                      "loss@R": statistics.fmean(r[1] for r in runs),
                      "loss@4R": statistics.fmean(r[LONG] for r in runs), "runs": runs}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
