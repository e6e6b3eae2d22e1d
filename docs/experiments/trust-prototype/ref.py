import sys, math
sys.path.insert(0, "docs/experiments/trust-prototype")
import torch, trust
from metagg.config import load_config
from metagg.simulation import Simulation
torch.set_num_threads(1)
def run_rule(rule, attack, b, seed, rounds, acc=False):
    opts = ["attack.options.scale=4"] if attack == "sign_flip" else []
    cfg = load_config(None, [f"rounds={rounds}", f"seed={seed}", "trusted_samples=100", f"aggregator.name={rule}",
                             f"attack.name={attack}", f"attack.num_byzantine={b}", *opts])
    sim = Simulation(cfg)
    for _ in range(rounds): sim.step()
    ev = sim.evaluate()
    return ev["test_accuracy"] if acc else min(ev["train_loss"], 10.0)
rounds = int(sys.argv[1]); acc = rounds > 100
trust.GATE = "gate" in (sys.argv[2] if len(sys.argv) > 2 else "")
trust.PROBE = 0.1 if trust.GATE else 1.0
phi = torch.load(sys.argv[2] if len(sys.argv) > 2 else "docs/experiments/trust-prototype/phi.pt")
print("setting zeno fltrust trust")
for attack, b in trust.SETTINGS:
    z = run_rule("zeno", attack, b, 0, rounds, acc) if b < 7 or True else None
    f = run_rule("fltrust", attack, b, 0, rounds, acc)
    t = trust.run(phi, attack, b, 0, rounds, acc=acc)
    print(f"{attack}:{b} {z:.3f} {f:.3f} {t:.3f}", flush=True)
