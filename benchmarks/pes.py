"""Seconds per PES outer step (LAgg-A or LOpt-A meta-training), eager vs torch.compile.

    python benchmarks/pes.py                       # 8x8 Fashion-MNIST, K = 8, H = 4, 16 particles
    python benchmarks/pes.py --threads 1,2 --steps 5

One outer step = 50 rounds of 16 perturbed inner runs (each: K workers × H local SGD
steps, then the learned step), as `metagg meta-train lagg` runs it. Prints JSON: median
and min seconds per step for each (mode, threads), with the first (compiling) step
reported separately. The spec's estimate for this task was ~1 s per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from metagg.config.meta import MetaTrainPESConfig
from metagg.learned.meta.pes import PES


def bench(cfg: MetaTrainPESConfig, compiled: bool, threads: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    est = PES(cfg, compile=compiled)
    phi, state = est.init_phi(cfg.seed), est.init_state()
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        state = est.estimate(phi, state, step).state
        times.append(time.perf_counter() - t0)
    return {"mode": "compiled" if compiled else "eager", "threads": threads,
            "first_step_s": round(times[0], 3),
            "median_step_s": round(statistics.median(times[1:]), 3),
            "min_step_s": round(min(times[1:]), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["lagg", "lopt"], default="lagg")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--modes", default="eager,compiled")
    args = parser.parse_args()
    cfg = MetaTrainPESConfig(kind=args.kind)
    results = [bench(cfg, mode == "compiled", int(t), args.steps)
               for t in args.threads.split(",") for mode in args.modes.split(",")]
    print(json.dumps({"task": "fmnist8x8-mlp", "kind": args.kind, "workers": cfg.num_workers,
                      "local_steps": cfg.local_steps, "particles": 2 * cfg.pairs,
                      "unroll": cfg.unroll, "torch": torch.__version__, "results": results},
                     indent=2))


if __name__ == "__main__":
    main()
