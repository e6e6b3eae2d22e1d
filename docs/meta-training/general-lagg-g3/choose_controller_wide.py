"""Choose the lr controller on g2's φ with validation over image-mlp, image-mlp-wide and
synthetic (augmented at c = 1/3, 1, 3; rounds 100 and 400). Usage: gain,agree,prog,bias,coupling ..."""
import sys, json, time, torch
from metagg.config.meta import MetaTrainPESConfig
from metagg.learned.meta.multitask import MultiTaskPES
from metagg.learned.lagg import load_lagg
torch.set_num_threads(1)
cfg = MetaTrainPESConfig(kind="lagg", step_mode="general", tasks="image-mlp,image-mlp-wide,synthetic",
                         hidden=8, residual_scale=0.6, task_groups=1, pairs=8, learned_local_lr=True,
                         lr_augment=3.0, validation_seeds=2, validation_rounds=(100, 400))
est = MultiTaskPES(cfg)
print(json.dumps([t.name for t in est.validation_tasks]), flush=True)
base = est.phi_of(load_lagg("docs/meta-training/general-lagg-g2"))
for item in sys.argv[1:]:
    gain, agree, prog, bias, coup = (float(x) for x in item.split(","))
    net = est.phi.net(base)
    with torch.no_grad():
        net.lr_control.copy_(torch.tensor([gain, agree, prog, bias]) / 0.01)
        net.lr_coupling.fill_(coup)
    t0 = time.time()
    s, means = est.validate(est.phi.of(net))
    print(json.dumps({"item": item, "score": round(s, 4), "s": round(time.time() - t0)}), flush=True)
