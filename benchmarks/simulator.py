"""Simulator throughput vs. a bare `torch.func.vmap(grad)` loop doing the same work.

    python benchmarks/simulator.py [--rounds 200] [--threads 2] [--no-compile]

Setting (issue "Foundation"): 10 workers, MLP 784-20-10 sigmoid, batch 128,
gradient mode, mean + SGD. Uses Fashion-MNIST when installed, otherwise random
data of the same shape (speed does not depend on the values). Prints one JSON
object; the target is framework_ms_per_round / bare_ms_per_round <= 1.3 (issue 17:
<= 1.1). The simulator's workers run compiled (the default) unless `--no-compile`; the
bare loop is always eager.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from metagg.compiling import set_compile
from metagg.config import config_from_dict
from metagg.data import Dataset, load_dataset
from metagg.simulation import Simulation

WORKERS, BATCH, MODEL = 10, 128, "mlp:20:sigmoid"


def get_data() -> tuple[Dataset, str]:
    try:
        return load_dataset("fashion_mnist"), "fashion_mnist"
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(60000, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (60000,), generator=g)
        return Dataset("random", x, y, x[:1000], y[:1000], 10), "random 28x28"


def time_interleaved(fns: dict, rounds: int, repeats: int) -> dict[str, list[float]]:
    """ms per round of each function, repetitions interleaved so that load from other
    processes hits every contender alike."""
    for fn in fns.values():
        fn(5)  # warm-up: vmap tracing, allocator
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(rounds)
            out[name].append(1000 * (time.perf_counter() - start) / rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="the simulator's workers compiled (default) or eager")
    args = parser.parse_args()
    set_compile(args.compile)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds, data_name = get_data()
    cfg = config_from_dict({
        "model": MODEL, "rounds": 10**9, "trusted_samples": 0,
        "workers": {"num_workers": WORKERS, "batch_size": BATCH},
        "optimizer": {"name": "sgd", "lr": 0.5}, "aggregator": "mean",
    })
    sim = Simulation(cfg, dataset=ds)

    def framework(n: int) -> None:
        for _ in range(n):
            sim.step()

    # The bare loop: same model, same sampling, no layout / aggregator / safety checks.
    model = sim.task.model
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = ds.x_train, ds.y_train
    shard = len(y) // WORKERS
    g = torch.Generator().manual_seed(0)

    def loss_fn(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    grads_fn = vmap(grad(loss_fn), in_dims=(None, 0, 0))

    def bare(n: int) -> None:
        nonlocal params
        for _ in range(n):
            local = (torch.rand(WORKERS, BATCH, generator=g) * shard).long()
            idx = local + shard * torch.arange(WORKERS)[:, None]
            grads = grads_fn(params, x[idx], y[idx])
            params = {k: params[k] - 0.5 * grads[k].mean(0) for k in params}

    times = time_interleaved({"framework": framework, "bare": bare}, args.rounds, args.repeats)
    fw, br = times["framework"], times["bare"]
    fw_ms, br_ms = statistics.median(fw), statistics.median(br)
    print(json.dumps({
        "benchmark": "simulator",
        "settings": {"workers": WORKERS, "model": MODEL, "batch_size": BATCH, "mode": "gradient",
                     "aggregator": "mean+sgd", "data": data_name, "rounds": args.rounds,
                     "repeats": args.repeats, "threads": torch.get_num_threads(),
                     "worker_round": "compiled" if args.compile else "eager",
                     "torch": torch.__version__, "machine": platform.machine()},
        "framework_ms_per_round": round(fw_ms, 3),
        "bare_vmap_ms_per_round": round(br_ms, 3),
        "framework_rounds_per_s": round(1000 / fw_ms, 1),
        "bare_rounds_per_s": round(1000 / br_ms, 1),
        "overhead_ratio": round(fw_ms / br_ms, 3),
        "target_ratio": 1.3,
        "samples_ms": {"framework": [round(v, 3) for v in fw], "bare": [round(v, 3) for v in br]},
    }, indent=2))


if __name__ == "__main__":
    main()
