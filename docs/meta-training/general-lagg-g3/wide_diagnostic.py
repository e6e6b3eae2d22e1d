"""Diagnostic: augmented validation on wider image MLPs (not in the training families,
not held out) for controller gains on g2's φ."""
import sys, json, time, torch
from metagg.config.meta import MetaTrainPESConfig
from metagg.learned.meta.multitask import MultiTaskPES
from metagg.learned.lagg import load_lagg
from metagg.tasks.families import TaskSpec, HELD_OUT
torch.set_num_threads(1)
cfg = MetaTrainPESConfig(kind="lagg", step_mode="general", tasks="image-mlp,synthetic", hidden=8,
                         residual_scale=0.6, task_groups=1, pairs=8, learned_local_lr=True,
                         lr_augment=3.0, validation_seeds=2, validation_rounds=(100, 400))
est = MultiTaskPES(cfg)
est.validation_tasks = [TaskSpec("fashion_mnist@16", "mlp:128,128:relu", 8, 4, 128),
                        TaskSpec("fashion_mnist@16", "mlp:128:tanh", 8, 4, 128),
                        TaskSpec("fashion_mnist@12", "mlp:128,128:relu", 8, 4, 64, "dirichlet", 0.5)]
assert not {t.name for t in est.validation_tasks} & {t.name for t in HELD_OUT}
base = est.phi_of(load_lagg("docs/meta-training/general-lagg-g2"))
for gain in (float(x) for x in sys.argv[1:]):
    net = est.phi.net(base)
    with torch.no_grad():
        net.lr_control.zero_(); net.lr_control[0] = gain / 0.01
    t0 = time.time()
    s, means = est.validate(est.phi.of(net))
    print(json.dumps({"gain": gain, "score": round(s, 4), "s": round(time.time() - t0),
                      **{k: round(v, 4) for k, v in means.items() if "loss@400" in k}}), flush=True)
