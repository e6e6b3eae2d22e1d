"""Prototype: a learned trust-weighted aggregator, meta-trained by antithetic ES over an
attack mixture on digits. Not in the package; measuring whether the structure can learn."""
from __future__ import annotations
import json, math, sys, time
import torch
from metagg.aggregators.base import Aggregator
from metagg.config import load_config
from metagg.simulation import Simulation

torch.set_num_threads(1)
NF, H = 5, 8
P = NF * H + H + H + 1 + 1 + NF  # w1, b1, w2, b2, log clip, q (linear skip)

def unpack(phi):
    i = 0
    w1 = phi[i:i + NF * H].view(NF, H); i += NF * H
    b1 = phi[i:i + H]; i += H
    w2 = phi[i:i + H]; i += H
    b2 = phi[i]; i += 1
    c = phi[i]; i += 1
    q = phi[i:i + NF]
    return w1, b1, w2, b2, c, q

PROBE = 1.0  # γ of the trusted-loss probe (phi-zeno.pt was trained with 1.0)
GATE = False  # True: w = sigmoid(s), normalised by max(sum w, 1) (not over the crowd)

class Trust(Aggregator):
    name = "trust"
    uses_trusted_data = True
    def __init__(self, phi, lr=1.0):
        self.phi, self.lr = phi, lr
    def init(self, layout, num_workers):
        return ()
    @torch.no_grad()
    def step(self, state, updates, ctx):
        self.check_updates(updates, ctx)
        u = updates.to(torch.float32)
        n = u.shape[0]
        theta = ctx.params.to(torch.float32)
        tr = ctx.trusted
        g0 = tr.grad(theta)
        g0n = g0.norm().clamp_min(1e-12)
        # probe at γ = PROBE: at γ = 1 noisy honest rows raise the trusted loss and tiny
        # colluding rows (IPM at 7/10) look best (measured); Zeno uses γ = 0.1
        losses = tr.loss(torch.cat([theta[None], theta[None] - PROBE * u]))
        l0, li = losses[0], losses[1:]
        rel = torch.nan_to_num((li - l0) / (l0.abs() + 1e-8), nan=1e6, posinf=1e6, neginf=-1e6)
        z1 = torch.asinh(rel / (0.1 * PROBE))
        norms = u.norm(dim=1).clamp_min(1e-12)
        z2 = (u @ g0) / (norms * g0n)
        z3 = (norms / g0n).log().clamp(-5, 5)
        ranks = z1.argsort().argsort().to(torch.float32)
        z4 = ranks / max(n - 1, 1)
        med = u.median(0).values
        z5 = (u @ med) / (norms * med.norm().clamp_min(1e-12))
        f = torch.stack([z1 / 5, z2, z3 / 5, z4, z5], 1)
        w1, b1, w2, b2, c, q = unpack(self.phi)
        s = torch.tanh(f @ w1 + b1) @ w2 + f @ q + b2
        if GATE:
            w = torch.sigmoid(s)
            w = w / w.sum().clamp_min(1.0)
        else:
            w = torch.softmax(s, 0)
        clip = torch.clamp(torch.exp(c) * g0n / norms, max=1.0)
        direction = (w * clip) @ u
        return self.lr * direction, state

def phi_init(seed=0, zeno=False):
    g = torch.Generator().manual_seed(seed)
    phi = 0.3 * torch.randn(P, generator=g)
    if zeno:  # start as a soft Zeno: weight falls with the trusted-loss increase
        phi[NF * H + H: NF * H + 2 * H] = 0.0   # w2: MLP off
        phi[-NF:] = torch.tensor([-25.0, 0.0, 0.0, 0.0, 0.0])
        phi[NF * H + 2 * H + 1] = 2.0  # log clip: updates up to e^2 x the trusted grad norm
    return phi

SETTINGS = [("none", 0), ("none", 0), ("whitebox", 3), ("whitebox", 7), ("min_sum", 3), ("sign_flip", 3), ("sign_flip", 7), ("gaussian", 3), ("gaussian", 7),
            ("alie", 3), ("alie", 7), ("ipm", 3), ("ipm", 7), ("min_max", 3), ("min_max", 7),
            ("min_sum", 7), ("label_flip", 7), ("mimic", 7)]

def run(phi, attack, b, seed, rounds, momentum=0.0, partition="iid", acc=False):
    opts = ["attack.options.scale=4"] if attack == "sign_flip" else []
    cfg = load_config(None, [f"rounds={rounds}", f"seed={seed}", "trusted_samples=100",
                             f"attack.name={attack}", f"attack.num_byzantine={b}",
                             f"workers.momentum={momentum}", f"data.partition={partition}", *opts])
    sim = Simulation(cfg)
    sim.server.aggregator = sim.aggregator = Trust(phi)
    sim.reset()
    for _ in range(rounds):
        sim.step()
    ev = sim.evaluate()
    loss = ev["train_loss"]
    if not math.isfinite(loss):
        loss = 10.0
    return ev["test_accuracy"] if acc else min(loss, 10.0)

def es(steps, pairs=6, sigma=0.1, lr=0.03, rounds=40, seed=0, out="docs/experiments/trust-prototype/phi.pt",
       zeno=False):
    phi = phi_init(seed, zeno)
    m = torch.zeros(P); v = torch.zeros(P)
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(1, steps + 1):
        t0 = time.time()
        grad = torch.zeros(P)
        tot = 0.0
        for k in range(pairs):
            eps = torch.randn(P, generator=g)
            attack, b = SETTINGS[int(torch.randint(len(SETTINGS), (1,), generator=g))]
            mom = 0.9 if torch.rand(1, generator=g) < 0.3 else 0.0
            s = int(torch.randint(1000, (1,), generator=g))
            lp = math.log(run(phi + sigma * eps, attack, b, s, rounds, mom))
            lm = math.log(run(phi - sigma * eps, attack, b, s, rounds, mom))
            grad += (lp - lm) / (2 * sigma) * eps
            tot += (lp + lm) / 2
        grad /= pairs
        m = 0.9 * m + 0.1 * grad; v = 0.999 * v + 0.001 * grad ** 2
        phi = phi - lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        print(f"step {t} mean loss {tot / pairs:.4f} ({time.time() - t0:.1f}s)", flush=True)
        if t % 10 == 0:
            torch.save(phi, out)
    torch.save(phi, out)
    return phi

if __name__ == "__main__":
    if sys.argv[1] == "train":
        es(int(sys.argv[2]))
    elif sys.argv[1] == "train-gate":
        GATE, PROBE = True, 0.1
        es(int(sys.argv[2]), rounds=100, zeno=True, out="docs/experiments/trust-prototype/phi-gate.pt")
    elif sys.argv[1] == "train-zeno":
        es(int(sys.argv[2]), rounds=100, zeno=True, out="docs/experiments/trust-prototype/phi-zeno.pt")
    else:
        phi = torch.load("docs/experiments/trust-prototype/phi.pt")
        for attack, b in SETTINGS:
            accs = [run(phi, attack, b, s, 150, acc=True) for s in (0,)]
            print(attack, b, f"{100 * sum(accs) / len(accs):.1f}", flush=True)
