"""The gate variant against the gradient white-box attack: Trust.step run without
torch.no_grad, so `whitebox` descends through it (python docs/experiments/trust-prototype/whitebox_gradient.py)."""
import sys, torch
sys.path.insert(0, "docs/experiments/trust-prototype")
import trust
from metagg.config import load_config
from metagg.simulation import Simulation
torch.set_num_threads(1)
trust.GATE, trust.PROBE = True, 0.1
# the same step, in the autograd graph (no torch.no_grad): the whitebox attack's gradient
trust.Trust.step = trust.Trust.step.__wrapped__
phi = torch.load("docs/experiments/trust-prototype/phi-gate.pt")
for b in (3, 7):
    cfg = load_config(None, ["rounds=150", "seed=0", "trusted_samples=100", "attack.name=whitebox", f"attack.num_byzantine={b}"])
    sim = Simulation(cfg)
    sim.server.aggregator = sim.aggregator = trust.Trust(phi)
    sim.reset()
    for _ in range(150): sim.step()
    print(b, sim.server.attack.last_method, sim.evaluate()["test_accuracy"], flush=True)
