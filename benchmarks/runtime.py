"""The multi-process parameter server vs the simulator: time per round and bytes moved.

    python benchmarks/runtime.py [--rounds 100] [--workers 10] [--data digits]

Setting (issue 7): 10 workers, MLP 784-128-128-10 (relu), gradient mode, mean + SGD,
on Fashion-MNIST (`--data digits` for the built-in digits, e.g. where Fashion-MNIST
is not installed). The simulator runs the same config in this process; the
distributed run is `metagg launch` on 127.0.0.1 (gloo), timed by its server over
the rounds only (start-up and evaluation excluded), each process on one thread. The
simulator is timed with one thread and with torch's default (the faster counts).
Prints one JSON object; the target is distributed / simulator time per round <= 3,
and the bytes the server moves per round (θ out, updates in) are compared with the
d·M·4 bytes of the updates alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metagg.config import config_from_dict, config_to_dict
from metagg.data import load_dataset
from metagg.runtime.launch import launch
from metagg.runtime.ps import RuntimeOptions
from metagg.simulation import Simulation


def simulator_ms_per_round(sim: Simulation, rounds: int, repeats: int,
                           threads: int) -> list[float]:
    torch.set_num_threads(threads)
    for _ in range(5):  # warm-up: vmap tracing, allocator
        sim.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(rounds):
            sim.step()
        times.append(1000 * (time.perf_counter() - start) / rounds)
    return times


def distributed_stats(cfg, rounds: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="metagg-bench-") as tmp:
        data = config_to_dict(cfg)
        data.update(rounds=rounds, eval_every=rounds, checkpoint_every=0)
        code = launch(config_from_dict(data), tmp, options=RuntimeOptions(threads=threads),
                      max_restarts=0, time_limit=1200)
        if code != 0:
            log = Path(tmp, "launch/attempt0.rank0.log").read_text()[-2000:]
            raise SystemExit(f"distributed run failed with code {code}:\n{log}")
        return json.loads(Path(tmp, "runtime.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="simulator repetitions")
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "digits"],
                        help="dataset (default fashion_mnist; digits needs no files)")
    args = parser.parse_args()
    cfg = config_from_dict({
        "model": "mlp:128,128:relu", "data": {"name": args.data}, "trusted_samples": 0,
        "workers": {"num_workers": args.workers, "batch_size": args.batch_size,
                    "mode": "gradient"},
        "optimizer": {"name": "sgd", "lr": 0.1}, "aggregator": "mean", "rounds": args.rounds,
    })
    sim = Simulation(cfg, dataset=load_dataset(cfg.data.name))
    # The simulator with one thread (as each distributed process has) and with all of
    # torch's; measured before and after the distributed run, against drifting load.
    all_threads = torch.get_num_threads()
    sim_times: dict[int, list[float]] = {1: [], all_threads: []}

    def measure_simulator() -> None:
        for threads in sim_times:
            sim_times[threads] += simulator_ms_per_round(sim, args.rounds, args.repeats, threads)

    measure_simulator()
    start = time.perf_counter()
    stats = distributed_stats(cfg, args.rounds, threads=1)
    wall = time.perf_counter() - start
    measure_simulator()
    sim_ms = {t: statistics.median(v) for t, v in sim_times.items()}
    best = min(sim_ms.values())
    print(json.dumps({
        "setting": f"{args.data}, mlp:128,128:relu, {args.workers} workers, gradient mode, "
                   f"batch {args.batch_size}, mean + SGD, gloo on 127.0.0.1",
        "dimension": stats["dimension"],
        "rounds": args.rounds,
        "simulator_ms_per_round": {f"{t}_threads": round(v, 3) for t, v in sim_ms.items()},
        "distributed_ms_per_round": stats["ms_per_round"],
        "distributed_gather_ms_per_round": stats["gather_ms_per_round"],
        "simulator_rounds_per_s": round(1000 / best, 2),
        "distributed_rounds_per_s": round(1000 / stats["ms_per_round"], 2),
        "slowdown_vs_best_simulator": round(stats["ms_per_round"] / best, 3),
        "target_slowdown": 3.0,
        "bytes_per_round": stats["bytes_per_round"],
        "min_bytes_per_round": stats["min_bytes_per_round"],
        "bytes_ratio": round(stats["bytes_per_round"] / stats["min_bytes_per_round"], 3),
        "distributed_wall_s_with_startup": round(wall, 1),
        "processes": args.workers + 1,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "machine": platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
