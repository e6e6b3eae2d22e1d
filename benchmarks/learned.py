"""Rounds per second of LOpt-A / LAgg-A against FedAvg through `Simulation.step()`.

    python benchmarks/learned.py                        # 784-128-128 FMNIST MLP, K=8, H=4; JSON
    python benchmarks/learned.py --rounds 20 --threads 2 --compile-server

The task of the LAgg-A spec: Fashion-MNIST 28×28, `mlp:128,128:relu`, K = 8 workers,
H = 4 local SGD steps (lr 0.5, B = 128), local-SGD mode. FedAvg (mean + SGD lr 1) is
the floor; LOpt-A and LAgg-A are untrained (reference initialisation), which costs
the same as trained ones. The workers run compiled unless `--no-compile`;
`--compile-server` also times `torch.compile` on the learned aggregators' MLP forward
(the features stay eager). Also reported: the server step alone (ms) and the reference
JAX code's rounds/s measured on this machine (`throughput.REFERENCE_JAX`; the numbers
printed here before 2026-12-06 included the reference's per-round evaluation and were
3-10x too low).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from throughput import REFERENCE_JAX

from metagg.compiling import set_compile
from metagg.config import config_from_dict
from metagg.data import load_dataset
from metagg.simulation import Simulation


def make_sim(agg: str, dataset) -> Simulation:
    name = "mean" if agg == "fedavg" else agg
    options = {} if agg == "fedavg" else {"init": True}
    cfg = config_from_dict({
        "seed": 0, "rounds": 1000, "model": "mlp:128,128:relu",
        "data": {"name": "fashion_mnist", "partition": "iid"},
        "workers": {"num_workers": 8, "mode": "local_sgd", "local_steps": 4,
                    "local_lr": 0.5, "batch_size": 128},
        "optimizer": {"name": "sgd", "lr": 1.0},
        "aggregator": {"name": name, "options": options},
    })
    return Simulation(cfg, dataset=dataset)


def bench(agg: str, dataset, rounds: int, warmup: int, compiled: bool) -> dict:
    sim = make_sim(agg, dataset)
    if compiled:
        sim.aggregator.net.forward = torch.compile(sim.aggregator.net.forward, dynamic=False)
    server_ms: list[float] = []
    inner = sim.aggregator.step

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        server_ms.append(1e3 * (time.perf_counter() - start))
        return out

    sim.aggregator.step = timed
    for _ in range(warmup):
        sim.step()
    server_ms.clear()
    start = time.perf_counter()
    for _ in range(rounds):
        sim.step()
    wall = time.perf_counter() - start
    return {"aggregator": agg, "server_compiled": compiled, "rounds": rounds,
            "rounds_per_s": round(rounds / wall, 2),
            "server_step_ms_median": round(statistics.median(server_ms), 1),
            "d": sim.task.layout.size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--aggregators", default="fedavg,lopt,lagg")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compiled workers (default) or eager (--no-compile)")
    parser.add_argument("--compile-server", action="store_true",
                        help="also time torch.compile on the learned aggregators' MLP")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_compile(args.compile)
    dataset = load_dataset("fashion_mnist")
    results = []
    for agg in args.aggregators.split(","):
        results.append(bench(agg, dataset, args.rounds, args.warmup, False))
        if args.compile_server and agg != "fedavg":
            results.append(bench(agg, dataset, args.rounds, args.warmup + 2, True))
    print(json.dumps({
        "benchmark": "learned_aggregation_rounds_per_s",
        "task": "fashion_mnist 28x28, mlp:128,128:relu, K=8, H=4, B=128, local lr 0.5",
        "threads": args.threads, "workers": "compiled" if args.compile else "eager",
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "results": results,
        "reference_jax_rounds_per_s": {a: r[str(args.threads)] for a, r in REFERENCE_JAX.items()
                                       if str(args.threads) in r},
    }, indent=2))


if __name__ == "__main__":
    main()
