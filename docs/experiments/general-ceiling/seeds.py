"""Held-out breast cancer (K = 16, H = 2, B = 16, MLP 30-16-2 ReLU) seed by seed: the quick
suite's tuned baselines (their tuned settings, read from the committed tuning) and local
SGD + server Prodigy, training loss every 50 rounds to 400.

    python docs/experiments/general-ceiling/seeds.py 6

Shows that every adaptive server optimizer (tuned FedAdam included) stalls at a loss
10-100x higher on some seeds, and plain FedAvg on none.
"""

from __future__ import annotations

import sys

import torch

from metagg.experiments.runs import dataset_for, run_curve
from metagg.tasks.families import HELD_OUT

TASK = next(t for t in HELD_OUT if t.dataset == "breast_cancer")
# the quick suite's tuned settings here (docs/reproductions/generalization-quick/tuning)
METHODS = {
    "fedavg (tuned: local lr 1)": (1.0, {"name": "sgd", "lr": 1.0}),
    "fedadam (tuned: 0.5, server 0.1)": (0.5, {"name": "adam", "lr": 0.1}),
    "slowmo (tuned: 1, server 1, beta 0.95)": (1.0, {"name": "slowmo", "lr": 1.0, "beta": 0.95}),
    "local SGD 0.5 + server Prodigy": (0.5, {"name": "prodigy", "lr": 1.0}),
}


def main(seeds: int) -> None:
    torch.set_num_threads(1)
    print("| method | seed | " + " | ".join(str(r) for r in range(50, 401, 50)) + " |")
    print("|---|---|" + "---|" * 8)
    for name, (local_lr, optimizer) in METHODS.items():
        for seed in range(seeds):
            cfg = TASK.run_config(rounds=400, seed=seed, local_lr=local_lr, optimizer=optimizer)
            rows = run_curve(cfg, dataset_for(cfg), 8)
            print(f"| {name} | {seed} | " + " | ".join(f"{r['train_loss']:.4f}" for r in rows[1:])
                  + " |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
