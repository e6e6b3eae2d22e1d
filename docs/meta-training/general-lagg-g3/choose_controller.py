"""Score lr-controller settings on g2's φ with the package's augmented validation
(training families' validation tasks × lr factors 1/3, 1, 3; lower is better).
Usage: python docs/meta-training/general-lagg-g3/choose_controller.py 'gain,agree,prog,bias,coupling' ... (drift units per round)"""
import sys, json, time, torch
from metagg.config.meta import MetaTrainPESConfig
from metagg.learned.meta.multitask import MultiTaskPES
from metagg.learned.lagg import load_lagg
torch.set_num_threads(1)
G2 = "docs/meta-training/general-lagg-g2"
cfg = MetaTrainPESConfig(kind="lagg", step_mode="general", tasks="image-mlp,synthetic", hidden=8,
                         residual_scale=0.6, task_groups=1, pairs=8, learned_local_lr=True,
                         lr_augment=3.0, validation_seeds=2, validation_rounds=(100, 300))
est = MultiTaskPES(cfg)
base = est.phi_of(load_lagg(G2))
for item in sys.argv[1:]:
    gain, agree, prog, bias, coup = (float(x) for x in item.split(","))
    net = est.phi.net(base)
    with torch.no_grad():
        net.lr_control.copy_(torch.tensor([gain, agree, prog, bias]) / 0.01)
        net.lr_coupling.fill_(coup)
    t0 = time.time()
    score, means = est.validate(est.phi.of(net))
    print(json.dumps({"item": item, "score": round(score, 4), "s": round(time.time() - t0)}), flush=True)
