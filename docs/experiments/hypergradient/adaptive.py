"""Diagnostic: adaptive server step + server-chosen local lr on the quick held-out tasks."""
import json, math, sys, time
from typing import NamedTuple
import torch
import metagg.simulation as simmod
from metagg.aggregators.optimizers import ServerOptimizer
from metagg.experiments.generalization import SCALES
from metagg.simulation import Simulation
from metagg.config import config_from_dict, config_to_dict
torch.set_num_threads(1)

class Ctl:
    def __init__(s, mode, eta=0.1, lr0=0.5, beta=0.9, share=0.5, up=1.03, down=0.7, lo=0.05, hi=2.0, a0=0.03, base="slowmo", b2=0.999, kappa=0.1, lt=0.95, marg=0.0):
        s.mode, s.eta, s.lr0, s.beta, s.share, s.up, s.down, s.lo, s.hi = mode, eta, lr0, beta, share, up, down, lo, hi
        s.a0, s.base, s.b2, s.v, s.t = a0, base, b2, None, 0
        s.kappa, s.lt, s.marg = kappa, lt, marg
        s.log_s = 0.0; s.prev = None; s.u = None; s.loss_ema = None; s.cos = 0.0
    def alpha(s):
        a0 = s.a0 if s.base == "adam" else 1.0
        return a0 * math.exp((1 - s.share) * s.log_s) if s.mode != "fixed" else a0
    def lr(s):
        if s.mode == "fixed": return s.lr0
        return min(max(s.lr0 * math.exp(s.share * s.log_s), s.lo), s.hi)
    def opt(s):
        def init(d): return ()
        def update(state, direction, ctx=None):
            d = direction / ctx.local_lr   # sum of H local gradients
            if s.u is None: s.u = torch.zeros_like(d)
            if s.prev is not None:
                s.cos = float((d @ s.prev) / (d.norm() * s.prev.norm()).clamp_min(1e-30))
            if s.base == "adam":
                if s.v is None: s.v = torch.zeros_like(d)
                s.t += 1
                s.u = s.beta * s.u + (1 - s.beta) * direction
                s.v = s.b2 * s.v + (1 - s.b2) * direction.square()
                mh = s.u / (1 - s.beta ** s.t); vh = s.v / (1 - s.b2 ** s.t)
                step = s.alpha() * mh / (vh.sqrt() + 1e-8)
            else:
                s.u = s.beta * s.u + d
                step = s.alpha() * ctx.local_lr * s.u
            s.prev = step
            return step, state
        return ServerOptimizer(init, update)
    def after(s, loss):
        if s.mode == "hd":
            s.log_s = min(max(s.log_s + s.eta * s.cos, -6), 4)
        elif s.mode == "bold":
            if s.loss_ema is not None:
                s.log_s += math.log(s.up) if loss < s.loss_ema else math.log(s.down)
            s.loss_ema = loss if s.loss_ema is None else 0.7 * s.loss_ema + 0.3 * loss
        elif s.mode == "hdtrend":
            ll = math.log(max(loss, 1e-12))
            if s.loss_ema is None: s.fast = s.slow = ll
            s.fast = 0.7 * s.fast + 0.3 * ll; s.slow = s.lt * s.slow + (1 - s.lt) * ll
            s.loss_ema = loss
            up = 1.0 if s.fast > s.slow + s.marg else 0.0
            s.log_s = min(max(s.log_s + s.eta * s.cos - s.kappa * up, -6), 4)
        elif s.mode == "hdguard":
            s.log_s = min(max(s.log_s + s.eta * s.cos, -6), 4)
            if s.loss_ema is not None and loss > 1.5 * s.loss_ema:
                s.log_s += math.log(0.5)
            s.loss_ema = loss if s.loss_ema is None else 0.8 * s.loss_ema + 0.2 * loss

def run(task, seed, ctl, rounds=400):
    cfg = task.run_config(rounds=rounds, seed=seed, checkpoint_every=0)
    raw = config_to_dict(cfg); raw["workers"]["local_lr"] = ctl.lr(); raw["eval_every"] = rounds
    cfg = config_from_dict(raw)
    orig = simmod.build_optimizer; simmod.build_optimizer = lambda **kw: ctl.opt()
    try: sim = Simulation(cfg)
    finally: simmod.build_optimizer = orig
    out = {}
    lrs = []
    while sim.round < rounds:
        lr = ctl.lr()
        sim.cluster.local_lr = lr; sim.cluster._lr = torch.tensor(lr); sim.server.local_lr = lr
        sim.step()
        l = sim.server.last_worker_loss
        if not math.isfinite(l): out = {100: float('nan'), rounds: float('nan')}; break
        ctl.after(l); lrs.append(lr)
        if sim.round in (100, rounds): out[sim.round] = sim.evaluate()["train_loss"]
    return out, lrs

summary = json.load(open("/work/main/docs/reproductions/generalization-quick/summary.json"))
best = {r["task"]: (r["loss_at_R"], r["loss_at_end"]) for r in summary["rows"]
        if r.get("baseline") and r["method"] == r["best_baseline"]}
variants = json.loads(sys.argv[1])
for task in SCALES["quick"].tasks:
    for name, kw in variants.items():
        t0 = time.time(); res = []; lrs = []
        for s in (0, 1):
            o, l = run(task, s, Ctl(**kw)); res.append(o); lrs.append(l)
        l100 = sum(r[100] for r in res) / 2; l400 = sum(r[400] for r in res) / 2
        b = best[task.name]
        lr_end = lrs[0][-1] if lrs[0] else float('nan'); lr_mid = lrs[0][99] if len(lrs[0]) > 99 else float('nan')
        print(f"{task.name[:34]:34s} {name:10s} @100 {l100:.4f} ({l100/b[0]:.2f}x) @400 {l400:.4f} ({l400/b[1]:.2f}x) lr@100 {lr_mid:.3f} lr@400 {lr_end:.3f} {time.time()-t0:.0f}s", flush=True)
