"""Untuned hypergradient SlowMo on the quick held-out tasks vs the best tuned baseline."""
import json, math, sys, time
from typing import Any, NamedTuple
import torch
import metagg.simulation as simmod
from metagg.aggregators.optimizers import ServerOptimizer
from metagg.experiments.generalization import SCALES
from metagg.simulation import Simulation
from metagg.config import config_from_dict, config_to_dict

torch.set_num_threads(1)

class HDState(NamedTuple):
    u: torch.Tensor
    log_alpha: torch.Tensor
    prev: torch.Tensor

def hd_slowmo(alpha0=1.0, beta=0.9, eta=0.05, lo=-6.0, hi=3.0):
    def init(d):
        return HDState(torch.zeros(d), torch.tensor(math.log(alpha0)), torch.zeros(d))
    def update(state, direction, ctx=None):
        gamma = getattr(ctx, "local_lr", 1.0)
        d = direction / gamma
        n = (d.norm() * state.prev.norm()).clamp_min(1e-30)
        cos = (d @ state.prev) / n
        la = (state.log_alpha + eta * cos).clamp(lo, hi)
        u = beta * state.u + d
        step = torch.exp(la) * gamma * u
        return step, HDState(u, la, step)
    return ServerOptimizer(init, update)

def run(task, seed, opt, rounds=400, local_lr=0.5):
    cfg = task.run_config(rounds=rounds, seed=seed, checkpoint_every=0)
    raw = config_to_dict(cfg)
    raw["workers"]["local_lr"] = local_lr
    raw["aggregator"] = {"name": "mean"}
    raw["eval_every"] = rounds
    cfg = config_from_dict(raw)
    orig = simmod.build_optimizer
    simmod.build_optimizer = lambda **kw: opt
    try:
        sim = Simulation(cfg)
    finally:
        simmod.build_optimizer = orig
    out = {}
    alphas = []
    while sim.round < rounds:
        sim.step()
        if sim.round in (100, rounds):
            out[sim.round] = sim.evaluate()["train_loss"]
        st = sim.agg_state
        try:
            alphas.append(float(st.opt.log_alpha) if hasattr(st, "opt") else None)
        except Exception:
            pass
    return out, sim

summary = json.load(open("/work/main/docs/reproductions/generalization-quick/summary.json"))
best = {}
for r in summary["rows"]:
    if r.get("baseline") and r["method"] == r["best_baseline"]:
        best[r["task"]] = (r["loss_at_R"], r["loss_at_end"])
variants = {"slowmo": dict(eta=0.0)}
for e in [float(x) for x in sys.argv[1].split(",")]:
    variants[f"hd{e}"] = dict(eta=e)
lr = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
for task in SCALES["quick"].tasks:
    for name, kw in variants.items():
        res = [run(task, s, hd_slowmo(**kw), local_lr=lr)[0] for s in (0, 1)]
        l100 = sum(r[100] for r in res) / 2
        l400 = sum(r[400] for r in res) / 2
        b = best[task.name]
        print(f"{task.name[:40]:40s} {name:8s} @100 {l100:.4f} ({l100/b[0]:.2f}x best) @400 {l400:.4f} ({l400/b[1]:.2f}x)", flush=True)
