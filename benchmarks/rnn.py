"""Speed of one RNN-aggregator step (Ji et al. 2019) over d coordinates, M workers.

    python benchmarks/rnn.py                       # LSTM and GRU at d = 1e5, 1e6; prints JSON
    python benchmarks/rnn.py --dims 1000000 --threads 2 --repeats 5 --chunk-size 32768
    python benchmarks/rnn.py --reference           # also a plain nn.LSTM / nn.GRU, for scale

Untrained (seeded) weights, normalized output rule, M = 10 workers, float32, no
autograd (the server's path). Target: < 1 s per step at d = 1e6 on 2 cores.
`--reference` times the same stacked RNN as one `nn.LSTM` / `nn.GRU` call over all
coordinates (sequence length 1, batch d), without the preprocessing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from metagg.aggregators.base import RoundContext
from metagg.layout import ParamLayout, TensorSpec
from metagg.learned.rnn import DEFAULT_CHUNK, RNNAggregator, RNNConfig


def bench(cell: str, d: int, m: int, repeats: int, chunk_size: int, output: str) -> dict:
    agg = RNNAggregator(RNNConfig(num_workers=m, cell=cell, output=output), seed=0,
                        chunk_size=chunk_size)
    layout = ParamLayout([TensorSpec("theta", (d,), 0)])
    gen = torch.Generator().manual_seed(0)
    updates = torch.randn(m, d, generator=gen) * 1e-2
    ctx = RoundContext(round=0, params=torch.zeros(d), layout=layout, num_workers=m,
                       worker_ids=torch.arange(m))
    state = agg.init(layout, m)
    _, state = agg.step(state, updates, ctx)  # warm-up (allocations, thread pool)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, state = agg.step(state, updates, ctx)
        times.append(time.perf_counter() - start)
    return {"cell": cell, "d": d, "num_workers": m, "output": output,
            "ms_median": round(1e3 * statistics.median(times), 1),
            "ms_min": round(1e3 * min(times), 1), "repeats": repeats}


def bench_reference(cell: str, d: int, m: int, repeats: int) -> dict:
    """torch.nn's stacked RNN over all d coordinates at once, for comparison."""
    rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(m + 1, 20, num_layers=2)
    head = torch.nn.Linear(20, 1)
    x = torch.randn(1, d, m + 1)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            start = time.perf_counter()
            out, _ = rnn(x)
            head(out[0])
            if i:  # the first call is a warm-up
                times.append(time.perf_counter() - start)
    return {"cell": f"nn.{cell.upper()}", "d": d, "num_workers": m,
            "ms_median": round(1e3 * statistics.median(times), 1),
            "ms_min": round(1e3 * min(times), 1), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="100000,1000000", help="comma-separated d values")
    parser.add_argument("--cells", default="lstm,gru")
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--output", default="normalized", choices=["normalized", "paper"])
    parser.add_argument("--reference", action="store_true", help="also time nn.LSTM / nn.GRU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [bench(cell, int(float(d)), args.workers, args.repeats, args.chunk_size,
                     args.output)
               for cell in args.cells.split(",") for d in args.dims.split(",")]
    if args.reference:
        results += [bench_reference(cell, int(float(d)), args.workers, args.repeats)
                    for cell in args.cells.split(",") for d in args.dims.split(",")]
    print(json.dumps({
        "benchmark": "rnn_aggregator_step",
        "settings": {"threads": args.threads, "chunk_size": args.chunk_size,
                     "torch": torch.__version__, "machine": platform.machine(),
                     "processor": platform.processor() or platform.machine(),
                     # other jobs on the machine distort timings (see the load average)
                     "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
