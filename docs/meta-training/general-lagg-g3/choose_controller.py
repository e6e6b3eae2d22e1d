"""Score lr-controller settings on g2's φ with the package's augmented validation
(validation tasks drawn from the training families × lr factors 1/3, 1, 3; lower is better).

    python docs/meta-training/general-lagg-g3/choose_controller.py 0,0,0,0,0 0.1,0,0,0,0
    python docs/meta-training/general-lagg-g3/choose_controller.py --families \
        image-mlp,image-mlp-wide,synthetic --rounds 100,400 0.1,0,0,0,0
    python docs/meta-training/general-lagg-g3/choose_controller.py --families \
        image-mlp,image-mlp-wide,synthetic --rounds 100,400 --seeds 4 --range 4 0.1,0,0,0,0

Prints each (validation task @ lr factor)'s score, then the mean.

Each setting is gain,agreement,progress,bias,coupling (log-lr drift per round per unit
feature; coupling: the server's α follows the lr by that power).
"""
import argparse
import json
import time

import torch

from metagg.config.meta import MetaTrainPESConfig
from metagg.learned.lagg import load_lagg
from metagg.learned.meta.multitask import MultiTaskPES

p = argparse.ArgumentParser()
p.add_argument("settings", nargs="+")
p.add_argument("--families", default="image-mlp,synthetic")
p.add_argument("--rounds", default="100,300")
p.add_argument("--seeds", type=int, default=2)
p.add_argument("--range", type=float, default=0.0)
args = p.parse_args()
torch.set_num_threads(1)
cfg = MetaTrainPESConfig(kind="lagg", step_mode="general", tasks=args.families, hidden=8,
                         residual_scale=0.6, task_groups=1, pairs=8, learned_local_lr=True,
                         local_lr_range=args.range, lr_augment=3.0, validation_seeds=args.seeds,
                         validation_rounds=tuple(int(r) for r in args.rounds.split(",")))
est = MultiTaskPES(cfg)
base = est.phi_of(load_lagg("docs/meta-training/general-lagg-g2"))
for item in args.settings:
    gain, agree, prog, bias, coup = (float(x) for x in item.split(","))
    net = est.phi.net(base)
    with torch.no_grad():
        net.lr_control.copy_(torch.tensor([gain, agree, prog, bias]) / 0.01)
        net.lr_coupling.fill_(coup)
    t0 = time.time()
    phi = est.phi.of(net)
    parts = {}
    for i, spec in enumerate(est.validation_tasks):
        for c in est.validation_factors:
            res = est.runner(spec).validation_runs(phi, lr_factor=c)
            parts[f"{i}@{c:.3g}"] = round(est._relative(i, res, c), 3)
    score = sum(parts.values()) / len(parts)
    print(json.dumps(parts), flush=True)
    print(json.dumps({"setting": item, "score": round(score, 4), "s": round(time.time() - t0)}),
          flush=True)
