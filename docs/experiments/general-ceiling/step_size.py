"""Held-out breast cancer, seeds 0-5: training loss at R = 100 and 4R = 400 for server
steps of growing size (FedAvg's server lr, SlowMo's beta, FedAdam's lr).

    python docs/experiments/general-ceiling/step_size.py

Seed 0 ends high for every method, and higher the larger the server's steps.
"""

import torch

from metagg.experiments.runs import dataset_for, run_curve
from metagg.tasks.families import HELD_OUT

torch.set_num_threads(1)
task = next(t for t in HELD_OUT if t.dataset == "breast_cancer")
V = {
 "fedavg l1 s1": (1.0, {"name": "sgd", "lr": 1.0}),
 "fedavg l1 s2": (1.0, {"name": "sgd", "lr": 2.0}),
 "fedavg l1 s4": (1.0, {"name": "sgd", "lr": 4.0}),
 "slowmo l1 s1 b.5": (1.0, {"name": "slowmo", "lr": 1.0, "beta": 0.5}),
 "slowmo l1 s1 b.8": (1.0, {"name": "slowmo", "lr": 1.0, "beta": 0.8}),
 "slowmo l.5 s.5 b.9": (0.5, {"name": "slowmo", "lr": 0.5, "beta": 0.9}),
 "fedadam l.5 s.03": (0.5, {"name": "adam", "lr": 0.03}),
 "fedadam l.5 s.01": (0.5, {"name": "adam", "lr": 0.01}),
}
for name, (ll, opt) in V.items():
    out = []
    for seed in range(6):
        cfg = task.run_config(rounds=400, seed=seed, local_lr=ll, optimizer=opt)
        rows = run_curve(cfg, dataset_for(cfg), 4)
        out.append((rows[1]["train_loss"], rows[4]["train_loss"]))
    at_r = " ".join(f"{a:.4f}" for a, _ in out)
    at_4r = " ".join(f"{b:.4f}" for _, b in out)
    print(f"{name:22s} R: {at_r} | 4R: {at_4r}", flush=True)
