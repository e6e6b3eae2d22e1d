"""Re-check the controller choice with N validation seeds: python docs/meta-training/general-lagg-g3/recheck_seeds.py 4"""
import sys, json, time, torch
from metagg.config.meta import MetaTrainPESConfig
from metagg.learned.meta.multitask import MultiTaskPES
from metagg.learned.lagg import load_lagg
torch.set_num_threads(1)
n = int(sys.argv[1])
cfg = MetaTrainPESConfig(kind="lagg", step_mode="general", tasks="image-mlp,synthetic", hidden=8,
                         residual_scale=0.6, task_groups=1, pairs=8, learned_local_lr=True,
                         lr_augment=3.0, validation_seeds=n, validation_rounds=(100, 300))
est = MultiTaskPES(cfg)
base = est.phi_of(load_lagg("docs/meta-training/general-lagg-g2"))
for gain in (0.0, 0.1, 0.2):
    net = est.phi.net(base)
    with torch.no_grad():
        net.lr_control.zero_(); net.lr_control[0] = gain / 0.01
    s, means = est.validate(est.phi.of(net))
    print(json.dumps({"seeds": n, "gain": gain, "score": round(s, 4)}), flush=True)
