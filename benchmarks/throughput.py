"""Rounds per second at 1, 2 and `auto` torch threads, on a quiet machine and next to a
CPU-burning neighbour process this script starts and stops itself.

    python benchmarks/throughput.py                 # every task, ~5 min on 2 cores; JSON
    python benchmarks/throughput.py --quick         # fedavg, lagg, median; ~1 min
    python benchmarks/throughput.py --tasks fedavg,lagg --threads 1,auto --repeats 3
    python benchmarks/throughput.py --compile on,off --no-busy    # compiled vs eager workers

Tasks. Local-SGD mode on Fashion-MNIST 28×28, `mlp:128,128:relu`, K = 8 workers, H = 4
local SGD steps (lr 0.5, B = 128) — the LAgg-A spec's task — for fedavg (mean + SGD
lr 1), slowmo, fedadam (server Adam), lopt and lagg (untrained: same cost as trained).
Gradient mode on the same data and model, 10 workers, B = 32, for the robust rules
median, krum, trimmed_mean (f = 2, no attack; server SGD lr 0.1). Without Fashion-MNIST
on disk the built-in digits (8×8) stand in, and "dataset" says so.

Each task runs in a process of its own (a robust rule's block threads would slow the
tasks after it: see metagg.threads). Each measurement builds the simulation, runs
`--warmup` rounds, then rounds until `--seconds` have passed (at least 3, at most
`--rounds`); each busy measurement follows its quiet twin at once. The neighbour is one
`python -c "while True: pass"` started before a busy measurement and killed after it
(also on errors), in a session of its own as another user's or terminal's job would
be: Linux's autogroup scheduling then shares the CPU between the sessions first, our
two threads get one core between them, and every parallel op waits for the one that
is not running (FedAvg at 2 threads: ~1 round/s). A neighbour in our own session
(`--same-session`) is shared per thread and costs 2 threads "only" 3-4×. `auto` is
chosen after the neighbour started, as a run started on a busy machine would;
"rounds_at_threads" counts the rounds run at each thread count. "median_rounds_per_s"
gives quiet, busy and busy/quiet per task and setting. The load average at the start
is reported: numbers taken with other jobs running (load > 0.5) are not "quiet".
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter

import torch

from metagg.compiling import set_compile
from metagg.config import config_from_dict
from metagg.data import load_dataset
from metagg.simulation import Simulation
from metagg.threads import apply_threads, parse_threads

LOCAL_SGD = ("fedavg", "slowmo", "fedadam", "lopt", "lagg")
ROBUST = ("median", "krum", "trimmed_mean")
QUICK = ("fedavg", "lagg", "median")
#: The reference implementation of Joseph et al. 2025 (JAX 0.4.13, jitted), its training
#: round only, on this 2-core AMD EPYC VM, 2026-12-06 (medians of 3, quiet machine, the
#: local-SGD task above): ../shared/specs/learned-aggregation-lagg-a.md. Not re-run here.
REFERENCE_JAX = {"fedavg": {"1": 34.3, "2": 40.9}, "lopt": {"1": 19.8, "2": 26.2},
                 "lagg": {"1": 8.0, "2": 10.7}}


def task_config(task: str, dataset: str) -> dict:
    """The run config of one benchmark task (see the module docstring)."""
    cfg: dict = {"seed": 0, "rounds": 100_000, "model": "mlp:128,128:relu",
                 "data": {"name": dataset, "partition": "iid"}, "eval_every": 100_000}
    if task in ROBUST:
        return {**cfg, "workers": {"num_workers": 10, "mode": "gradient", "batch_size": 32},
                "optimizer": {"name": "sgd", "lr": 0.1},
                "aggregator": {"name": task, "f": 2}}
    optimizer = {"fedavg": {"name": "sgd", "lr": 1.0}, "slowmo": {"name": "slowmo"},
                 "fedadam": {"name": "adam", "lr": 1e-3}}.get(task, {"name": "sgd", "lr": 1.0})
    aggregator = {"name": task, "options": {"init": True}} if task in ("lopt", "lagg") \
        else {"name": "mean"}
    return {**cfg, "workers": {"num_workers": 8, "mode": "local_sgd", "local_steps": 4,
                               "local_lr": 0.5, "batch_size": 128},
            "optimizer": optimizer, "aggregator": aggregator}


def measure(task: str, data, dataset: str, threads, *, warmup: int, seconds: float,
            max_rounds: int, compiled: bool = True) -> dict:
    """Rounds/s of one task at one thread setting (applied here, restored by the caller)."""
    set_compile(compiled)
    sim = Simulation(config_from_dict(task_config(task, dataset)), dataset=data)
    apply_threads(threads)  # auto: a 0.1 s sample now, then re-checked by Simulation.step
    for _ in range(warmup):
        sim.step()
    rounds = 0
    start = time.perf_counter()
    cpu0 = time.process_time()
    at: Counter[int] = Counter()  # rounds run at each thread count (auto may change it)
    while rounds < max_rounds and (rounds < 3 or time.perf_counter() - start < seconds):
        at[torch.get_num_threads()] += 1
        sim.step()
        rounds += 1
    wall = time.perf_counter() - start
    return {"task": task, "workers": "compiled" if compiled else "eager",
            "threads": threads, "threads_used": torch.get_num_threads(),
            "rounds_at_threads": {str(k): v for k, v in sorted(at.items())},
            "rounds": rounds, "rounds_per_s": round(rounds / wall, 2),
            "cpu_per_wall": round((time.process_time() - cpu0) / wall, 2)}


class Neighbour:
    """A CPU-burning process (one core), started on enter and killed on exit; in a
    session of its own unless `same_session` (see the module docstring)."""

    def __init__(self, *, same_session: bool = False) -> None:
        self.same_session = same_session

    def __enter__(self) -> Neighbour:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                     start_new_session=not self.same_session)
        time.sleep(0.5)  # running, and visible in /proc/stat
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


def load_data():
    """(dataset, name, note): Fashion-MNIST, else the built-in digits with a note."""
    try:
        return load_dataset("fashion_mnist"), "fashion_mnist", None
    except (OSError, ValueError) as exc:
        return (load_dataset("digits"), "digits",
                f"Fashion-MNIST not found ({exc}); digits 8x8 stand in")


def run_task(task: str, settings: list, args: argparse.Namespace) -> None:
    """In a process of its own: every (repeat, threads, quiet/busy) of one task, one JSON
    line each on stdout. Quiet and busy run back to back, so slow drifts of the machine
    touch both sides of a ratio alike."""
    data, dataset, _ = load_data()
    before = torch.get_num_threads()
    for repeat in range(args.repeats):
        for compiled in compile_modes(args.compile):
            for threads in settings:
                for busy in (False, True) if args.busy else (False,):
                    with Neighbour(same_session=args.same_session) if busy \
                            else contextlib.nullcontext():
                        row = measure(task, data, dataset, threads, warmup=args.warmup,
                                      seconds=args.seconds, max_rounds=args.rounds,
                                      compiled=compiled)
                    apply_threads(before)  # ends auto's re-evaluation
                    print(json.dumps({**row, "neighbour": busy, "repeat": repeat}), flush=True)


def compile_modes(text: str) -> list[bool]:
    """`--compile on,off` -> [True, False]."""
    modes = {"on": True, "off": False}
    try:
        return [modes[m.strip()] for m in text.split(",") if m.strip()]
    except KeyError:
        raise SystemExit(f"--compile: expected on, off or on,off; got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(LOCAL_SGD + ROBUST),
                        help="comma-separated subset of " + ",".join(LOCAL_SGD + ROBUST))
    parser.add_argument("--threads", default="1,2,auto", help="settings to time (default 1,2,auto)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="timed seconds per measurement (default 4)")
    parser.add_argument("--rounds", type=int, default=200,
                        help="at most this many timed rounds per measurement (default 200)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every pair this many times; medians reported (default 1)")
    parser.add_argument("--compile", default="on",
                        help="compiled (on) or eager (off) workers, or both: on,off (default on)")
    parser.add_argument("--quick", action="store_true", help=f"only {','.join(QUICK)}, 2 s each")
    parser.add_argument("--no-busy", dest="busy", action="store_false",
                        help="quiet measurements only")
    parser.add_argument("--same-session", action="store_true",
                        help="start the neighbour in this session (the milder case)")
    parser.add_argument("--task-process", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.seconds = ",".join(QUICK), 2.0
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(LOCAL_SGD + ROBUST))
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; allowed: {', '.join(LOCAL_SGD + ROBUST)}")
    settings = [parse_threads(t) for t in args.threads.split(",")]
    modes = compile_modes(args.compile)
    if args.task_process:
        run_task(args.task_process, settings, args)
        return
    load = os.getloadavg()
    _, dataset, note = load_data()
    results = []
    for task in tasks:
        # a process per task: a robust rule's block threads each keep an OpenMP team,
        # which slows every later parallel op of the process (see metagg.threads)
        argv = [sys.executable, __file__, "--task-process", task, "--threads", args.threads,
                "--seconds", str(args.seconds), "--rounds", str(args.rounds),
                "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                "--compile", args.compile]
        argv += ([] if args.busy else ["--no-busy"]) + (["--same-session"] if args.same_session
                                                         else [])
        out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
        for line in out.splitlines():
            results.append(json.loads(line))
            print(line, file=sys.stderr, flush=True)
    summary: dict = {}
    for task, compiled, threads in itertools.product(tasks, modes, settings):
        rates = {busy: statistics.median(
            r["rounds_per_s"] for r in results
            if r["task"] == task and r["threads"] == threads and r["neighbour"] == busy
            and r["workers"] == ("compiled" if compiled else "eager"))
            for busy in ((False, True) if args.busy else (False,))}
        row = {"quiet": rates[False]}
        if args.busy:
            row.update(busy=rates[True], busy_over_quiet=round(rates[True] / rates[False], 3))
        reference = REFERENCE_JAX.get(task, {}).get(str(threads))
        if reference is not None:
            row.update(reference_jax=reference,
                       quiet_over_reference=round(rates[False] / reference, 2))
        workers = "compiled" if compiled else "eager"
        summary.setdefault(task, {}).setdefault(workers, {})[str(threads)] = row
    print(json.dumps({
        "benchmark": "throughput_rounds_per_s",
        "local_sgd_task": f"{dataset}, mlp:128,128:relu, K=8, H=4, B=128, local lr 0.5",
        "robust_task": f"{dataset}, mlp:128,128:relu, gradient mode, 10 workers, B=32, f=2",
        "dataset": dataset, "note": note, "neighbour": "python -c 'while True: pass'" + (
            ", same session" if args.same_session else ", own session"),
        "auto": "cores not used by other processes (metagg.threads)",
        "seconds": args.seconds, "repeats": args.repeats,
        "loadavg_at_start": [round(x, 2) for x in load], "torch": torch.__version__,
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "reference_jax": "rounds/s of the reference JAX code on this machine, 2026-12-06, "
                         "not re-run (REFERENCE_JAX in this file)",
        "median_rounds_per_s": summary, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
