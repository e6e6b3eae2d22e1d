"""The multi-process parameter server: rank 0 aggregates, ranks 1..M are the workers.

    torchrun --nproc-per-node 5 -m metagg.runtime.ps CONFIG.yaml --out runs/ps   # M = 4
    metagg launch CONFIG.yaml --workers 4 --out runs/ps       # one machine, with restarts

Every process reads the same config (`workers.num_workers` must be WORLD_SIZE − 1)
and builds the same workers (`metagg.simulation.build_workers`); worker k (rank k + 1)
computes only its own row of the round with `Cluster.compute`, from the same minibatch
indices the simulator draws, and the server applies the rows with `metagg.server.Server`
— the code the simulator runs — so a fault-free distributed run has the simulator's
metrics.

A round t on the server:

1. write `round` = t to the store, then send θ and the round's local lr as one
   [d + 1] message (gloo/NCCL `isend`, tag t) to every live worker (the lr is the
   aggregator's `requested_local_lr`, else the configured one);
2. wait for answers: a worker posts its update (`isend`) and then pushes
   "RANK t ok LOSS" onto the store queue `answers`; the server polls that queue
   (non-blocking pops, a short sleep when it is empty) and receives an update only
   after its answer, so a dead or hung worker never blocks it;
3. at the deadline (`--round-timeout`) give up on the rest for this round (a round
   with too few updates for the aggregator is skipped, as in the simulator);
4. `Server.step`: the configured attack forges the Byzantine rows
   (attacks are omniscient, so the server plays them; Byzantine worker processes
   send honest updates), workers that sent nothing count in `missing_updates`,
   non-finite rows are dropped and counted in `dropped_updates`, then the
   aggregator's step and θ ← θ − step.

Byzantine workers: attacks that forge updates are played by the server on the rows
that arrived (as in the simulator, Byzantine processes compute honestly); label
flipping happens in the Byzantine worker processes themselves; under `crash` they
send, and the server counts them missing.

A late update (a worker that missed the deadline) is received later and discarded,
and a worker that finds its round already superseded skips it instead of computing
it, so a straggler catches up and rejoins. A worker is dead, and never waited for
or sent to again, when its heartbeat counter has not moved for `--heartbeat-timeout`
seconds, when its connection failed, or when it has left `--max-missed-rounds`
rounds in a row unanswered, not even late (a hung worker whose heartbeat thread
still runs; this also bounds the θ sends kept pending for a worker). When fewer
live workers remain than the aggregator needs (its `min_updates`), the server stops
with a one-line error and exit code 3 (EXIT_TOO_FEW_WORKERS).

Metrics, checkpoints and the summary are `Simulation.run`'s own files, plus
`runtime.json` (bytes moved, time per round).

Control goes through the key-value store that `init_process_group` uses (answers,
heartbeats, the current round), data by point-to-point messages: every restart
attempt gets its own key prefix, and the processes end with `os._exit` because
`destroy_process_group` can hang while a send to a hung worker is pending. Updates
are a deterministic function of (seed, round, rank, θ), so a run resumed from a
checkpoint ends with the metrics of an uninterrupted one.

Resuming: `--resume` continues from the checkpoint in --out, whatever run wrote it.
Under `metagg launch` only that flag counts (the launcher decides for each
attempt). Under torchrun a restarted group (TORCHELASTIC_RESTART_COUNT > 0) resumes
by itself, but only from a checkpoint of the same run: the server writes its run
id (METAGG_RUN_ID, else torchrun's TORCHELASTIC_RUN_ID, i.e. --rdzv-id, which
torchrun makes random on one node) into the checkpoint. With neither (torchrun's rdzv id "none")
any checkpoint in --out is resumed after a restart.

When CUDA gives each process on a machine its own GPU the backend is NCCL and θ and
the updates travel on GPU `LOCAL_RANK`; the fault handling above was tested with gloo.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from metagg.checkpoint import CheckpointError
from metagg.config import ConfigError, load_config
from metagg.runtime.protocol import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_TOO_FEW_WORKERS,
    DistEnv,
    Fault,
    RuntimeOptions,
    connect_store,
    parse_fault,
    resumable,
)
from metagg.runtime.server import ServerSimulation, TooFewWorkers
from metagg.runtime.worker import run_worker
from metagg.simulation import Workers, build_workers

__all__ = ["DistEnv", "Fault", "RuntimeOptions", "ServerSimulation", "TooFewWorkers",
           "add_runtime_arguments", "main", "parse_fault", "resumable", "runtime_options"]

log = logging.getLogger("metagg.runtime")


def choose_backend(options: RuntimeOptions, env: DistEnv) -> tuple[str, torch.device]:
    """The backend and the device updates live on: NCCL on GPU `LOCAL_RANK` when CUDA
    gives every process on this machine a GPU of its own (NCCL wants that), else gloo
    on CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = options.backend
    if backend == "auto":
        backend = "nccl" if gpus >= env.local_world_size else "gloo"
    if backend == "nccl":
        if gpus < env.local_world_size:
            raise ConfigError(f"backend nccl needs a GPU per process: {env.local_world_size} "
                              f"processes on this machine, {gpus} GPU(s); use --backend gloo")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        return backend, device
    return backend, torch.device("cpu")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `python -m metagg.runtime.ps` and `metagg launch`."""
    p.add_argument("--round-timeout", type=float, default=RuntimeOptions.round_timeout,
                   metavar="S", help="per-round deadline in seconds; later updates are "
                   f"discarded (default {RuntimeOptions.round_timeout:g})")
    p.add_argument("--heartbeat-timeout", type=float, default=RuntimeOptions.heartbeat_timeout,
                   metavar="S", help="a worker silent this long is dead for the rest of the run "
                   f"(default {RuntimeOptions.heartbeat_timeout:g})")
    p.add_argument("--max-missed-rounds", type=int, default=RuntimeOptions.max_missed_rounds,
                   metavar="N", help="a worker that leaves N rounds in a row unanswered (not "
                   "even late) is dead for the rest of the run, though its heartbeat goes on "
                   f"(default {RuntimeOptions.max_missed_rounds})")
    p.add_argument("--startup-timeout", type=float, default=RuntimeOptions.startup_timeout,
                   metavar="S", help="how long a process waits for the others to start and "
                   "join the group; also the store's and the point-to-point messages' "
                   f"timeout (default {RuntimeOptions.startup_timeout:g})")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="torch.distributed backend (default auto: nccl when every process "
                        "here has a GPU, else gloo)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1)")
    p.add_argument("--fault", dest="faults", action="append", default=[], metavar="SPEC",
                   help="inject a worker fault, for testing: nan:RANK (sends NaN), "
                        "delay:RANK:SECONDS (sleeps before each send) or fail:RANK (exits "
                        "with an error during start-up); RANK may be 'all'")


def runtime_options(args: argparse.Namespace) -> RuntimeOptions:
    return RuntimeOptions(round_timeout=args.round_timeout,
                          heartbeat_timeout=args.heartbeat_timeout,
                          startup_timeout=args.startup_timeout,
                          max_missed_rounds=args.max_missed_rounds, backend=args.backend,
                          threads=args.threads, faults=[parse_fault(f) for f in args.faults])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m metagg.runtime.ps",
        description="One process of the distributed parameter server (rank 0 = server, "
                    "1..M = workers); start M+1 of them with torchrun or `metagg launch`.")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="output directory (server)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (automatic after a torchrun "
                        "restart when the checkpoint is this run's)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    add_runtime_arguments(p)
    return p


def main(argv: Sequence[str] | None = None, *,
         on_joined: Callable[[], None] | None = None) -> int:
    """Run this process's part; returns the exit code (EXIT_FAILED, EXIT_BAD_INPUT or
    EXIT_TOO_FEW_WORKERS on failure). `on_joined` is called once this process has
    joined the process group: `metagg launch` learns from the server's call that
    start-up is over."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = None
    try:
        options = runtime_options(args)
        env = DistEnv.from_environ()
        cfg = load_config(args.config, args.overrides)
        m = cfg.workers.num_workers
        if env.world_size != m + 1:
            raise ConfigError(f"WORLD_SIZE={env.world_size} but workers.num_workers={m}: start "
                              f"{m + 1} processes (one server + one per worker)")
        torch.set_num_threads(options.threads)
        # The processes end with os._exit: inductor's pool of compile workers would leave
        # its semaphores behind (a resource_tracker warning at shutdown); compile in-process.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        backend, device = choose_backend(options, env)
        out = args.out
        resume = args.resume
        if env.rank == 0 and env.elastic and env.attempt > 0 and out is not None:
            resume = resume or resumable(out, env.run_id)  # a torchrun restart
        if resume and out is None:
            raise ConfigError("--resume needs --out DIR (the directory holding the checkpoint)")
        # Build everything (data, model) before joining the group: once the group
        # exists, every process is ready for round one.
        if env.rank == 0:
            sim: ServerSimulation | Workers = ServerSimulation(cfg, options, device, env.run_id)
        else:
            sim = build_workers(cfg)
            # The first call of a vmapped grad is slow (tracing): pay it now, not in
            # round one under the deadline.
            sim.cluster.compute(sim.task.init_params(cfg.seed).to(device), 0,
                                torch.tensor([env.rank - 1]))
            if any(f.kind == "fail" and f.applies_to(env.rank) for f in options.faults):
                raise RuntimeError(f"injected fault fail:{env.rank}: exiting during start-up")
        store = connect_store(env, options.startup_timeout)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=options.startup_timeout))
        log.info("rank %d joined the group (%s, attempt %d)", env.rank, backend, env.attempt)
        if on_joined is not None:
            on_joined()
        if isinstance(sim, ServerSimulation):
            sim.attach(store)
            summary = sim.run(out, resume=resume, progress=False)
            log.info("rank 0 ran to round %d; stopping the workers", sim.round)
            sim.finish(out)
            print(json.dumps(summary, indent=2), flush=True)
        else:
            run_worker(cfg, sim, env, store, options, device)
        return 0
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        who = f"rank {env.rank}" if env is not None else "metagg.runtime.ps"
        print(f"{who}: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except TooFewWorkers as exc:
        print(f"rank 0: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_TOO_FEW_WORKERS
    except RuntimeError as exc:  # a peer or the store went away (DistError is one too)
        who = f"rank {env.rank}" if env is not None else "metagg.runtime.ps"
        print(f"{who}: failed: {' '.join(str(exc).split())[:500]}", file=sys.stderr, flush=True)
        return EXIT_FAILED


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not destroy_process_group(): it can hang while a send to a hung worker is pending.
    os._exit(code)
