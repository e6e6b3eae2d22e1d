"""Start the parameter server and its M workers on this machine, and keep them going.

    metagg launch CONFIG.yaml --workers 10 --out runs/ps [--resume] [--set key=value]

    from metagg.runtime.launch import launch
    launch(cfg, "runs/ps", workers=4)                       # returns the exit code

`launch` starts M + 1 processes running `metagg.runtime.ps` on 127.0.0.1 (rank 0
the server) with the variables torchrun would set and a free port, forked from a
forkserver that has imported torch once, and watches them:

- a worker dies once the group has formed: nothing to do — the server notices
  (heartbeat) and goes on with the others, counting the missing updates (and stops
  with exit code 3 when fewer are left than the aggregator needs);
- a worker exits during start-up, before the group has formed: the server could
  only wait for it until the start-up timeout, so every process is stopped at once
  and the worker's last log line reported; no restart;
- the server dies (the store lives in it, so the group is lost): every process is
  stopped and the whole group started again, at most `max_restarts` times. Each
  attempt gets a new port and its own store key prefix, and resumes from the last
  checkpoint if this launch wrote it (each launch has a random run id, which the
  server stores in its checkpoints) or `resume` was asked for; a checkpoint of an
  older run in `out_dir` is never picked up by itself. Updates are deterministic in
  (seed, round, rank, θ), so the restarted run ends with the same metrics as an
  uninterrupted one. A server that rejected its input (exit code 2) or ran out of
  workers (3) is not restarted.

The resolved config is written to OUT/launch/config.yaml; each process logs to
OUT/launch/attempt<N>.rank<R>.log, and OUT/launch/pids.json names the current
attempt's processes. On several machines use torchrun with `metagg.runtime.ps`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import multiprocessing.synchronize
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing import forkserver
from pathlib import Path

from metagg.checkpoint import atomic_write_text
from metagg.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    save_config,
)
from metagg.runtime.ps import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_TOO_FEW_WORKERS,
    RuntimeOptions,
    resumable,
)

__all__ = ["launch"]

POLL = 0.1  # seconds between looks at the processes
EXIT_GRACE = 20.0  # how long workers may take to exit after the server has finished
SERVER_GRACE = 1.0  # after a worker's exit during start-up: did the server die first?
NO_RESTART = (EXIT_BAD_INPUT, EXIT_TOO_FEW_WORKERS)  # server exit codes a restart won't fix
TIMED_OUT = 124  # launch's exit code when `time_limit` ran out
INTERRUPTED = 130  # launch's exit code when interrupted or stopped
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _say(message: str) -> None:
    print(f"metagg launch: {message}", file=sys.stderr, flush=True)


class GroupFailed(Exception):
    """The group cannot go on and a restart would not help; `code` is launch's exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _log_path(run_dir: Path, attempt: int, rank: int) -> Path:
    return run_dir / f"attempt{attempt}.rank{rank}.log"


def _last_error(log: Path) -> str | None:
    """The error line a process printed last (else its last line; None if it wrote none)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [line for line in lines if line]
    errors = [line for line in lines if ": error:" in line or ": failed:" in line]
    return (errors or lines or [None])[-1]


def _runtime_args(options: RuntimeOptions) -> list[str]:
    args = ["--round-timeout", str(options.round_timeout),
            "--heartbeat-timeout", str(options.heartbeat_timeout),
            "--startup-timeout", str(options.startup_timeout),
            "--max-missed-rounds", str(options.max_missed_rounds),
            "--backend", options.backend, "--threads", str(options.threads)]
    for f in options.faults:
        rank = "all" if f.rank is None else str(f.rank)
        args += ["--fault", f"{f.kind}:{rank}" + (f":{f.seconds}" if f.kind == "delay" else "")]
    return args


def _process_factory(cfg: RunConfig, threads: int) -> multiprocessing.context.BaseContext:
    """A forkserver that has already imported torch and metagg (and sklearn for digits).

    Every process of every attempt is forked from it: a fresh interpreter would
    spend seconds of CPU importing the same modules M + 1 times. The forkserver
    starts with single-threaded BLAS/OpenMP, so forking from it is safe.
    """
    ctx = multiprocessing.get_context("forkserver")
    preload = ["torch", "torch._dynamo", "metagg.runtime.ps", "metagg.data", "matplotlib.pyplot"]
    if cfg.data.name == "digits":
        preload.append("sklearn.datasets")
    ctx.set_forkserver_preload(preload)
    pinned = {k: str(threads) for k in THREAD_VARIABLES}
    saved = {k: os.environ.get(k) for k in pinned}
    os.environ.update(pinned)  # read once, when the forkserver starts
    try:
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


def _run_rank(argv: list[str], env: dict[str, str], log_path: str,
              joined: multiprocessing.synchronize.Event | None) -> None:
    """In a forked process: become rank RANK of the group, logging to `log_path`; set
    `joined` once in the group (given to the server: then every worker is in it too)."""
    for k in [k for k in os.environ if k.startswith("TORCHELASTIC_")]:
        del os.environ[k]  # this group is ours, not a torchrun agent's
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    with contextlib.suppress(Exception):  # die with the forkserver, i.e. with the launcher
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    from metagg.runtime.ps import main

    code = main(argv, on_joined=None if joined is None else joined.set)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as `python -m metagg.runtime.ps` does: no destroy_process_group


def _kill(procs: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        if p.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
    for p in procs:
        p.join(timeout=10)


def launch(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    workers: int | None = None,
    resume: bool = False,
    options: RuntimeOptions | None = None,
    max_restarts: int = 3,
    time_limit: float | None = None,
    stop: threading.Event | None = None,
    verbose: bool = False,
) -> int:
    """Run `cfg` with one server and M worker processes on this machine; return the exit code.

    Args:
        cfg: the run's configuration.
        out_dir: where metrics, checkpoints, summary and the process logs go.
        workers: M, the number of worker processes (overrides `cfg.workers.num_workers`).
        resume: continue from the checkpoint in `out_dir`.
        options: timeouts, backend, threads, injected faults (see `RuntimeOptions`).
        max_restarts: how many times the group is restarted after the server dies.
        time_limit: stop everything after this many seconds and return 124.
        stop: set this event (from another thread) to stop everything; returns 130.
        verbose: let the processes log at INFO level.

    The processes come from a multiprocessing forkserver, so a script that calls
    `launch` must do so under `if __name__ == "__main__":` (as with any
    multiprocessing code).
    """
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        data = config_to_dict(cfg)
        data["workers"]["num_workers"] = workers
        cfg = config_from_dict(data)  # validated again (e.g. attack.num_byzantine <= M)
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {max_restarts}")
    options = options or RuntimeOptions()
    out = Path(out_dir)
    if resume and not (out / "checkpoint.json").exists():
        raise ConfigError(f"nothing to resume in {out}: no checkpoint.json")
    run_dir = out / "launch"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    save_config(cfg, cfg_path)
    argv = [str(cfg_path), "--out", str(out), *_runtime_args(options)]
    if verbose:
        argv.append("-v")
    m = cfg.workers.num_workers
    run_id = secrets.token_hex(8)  # the server writes it into its checkpoints
    deadline = None if time_limit is None else time.monotonic() + time_limit
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        ctx = _process_factory(cfg, options.threads)
        for attempt in range(max_restarts + 1):
            # The launcher alone decides whether to resume: after a restart only from a
            # checkpoint this launch wrote (or the user asked to resume), never from an
            # older run's that happens to lie in `out`.
            again = resume or (attempt > 0 and resumable(out, run_id))
            procs, joined = _start_group(ctx, argv + (["--resume"] if again else []), run_dir,
                                         m, attempt, run_id)
            code = _watch(procs, joined, deadline, stop, run_dir, attempt)
            if code == 0:
                return 0
            _kill(procs)
            if code is None:
                if stop is not None and stop.is_set():
                    _say("stopped")
                    return INTERRUPTED
                _say(f"time limit of {time_limit:g} s reached; stopped every process")
                return TIMED_OUT
            if code in NO_RESTART:
                log = _log_path(run_dir, attempt, 0)
                raise GroupFailed(_last_error(log) or f"the server exited with code {code} "
                                  f"(see {log})", code)
            if attempt < max_restarts:
                _say(f"server exited with code {code}; restarting the group "
                     f"(restart {attempt + 1} of at most {max_restarts})")
        _say(f"server failed {max_restarts + 1} time(s); giving up (logs in {run_dir})")
        return EXIT_FAILED
    except GroupFailed as exc:
        _say(str(exc))
        return exc.code
    except KeyboardInterrupt:
        _say("interrupted")
        return INTERRUPTED
    finally:
        _kill(procs)


def _start_group(
    ctx: multiprocessing.context.BaseContext, argv: list[str], run_dir: Path, m: int,
    attempt: int, run_id: str,
) -> tuple[list[multiprocessing.process.BaseProcess], multiprocessing.synchronize.Event]:
    """Start the server and M workers; also returns the event the server sets once the
    group has formed."""
    port = free_port()
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(m + 1),
            "LOCAL_WORLD_SIZE": str(m + 1), "METAGG_ATTEMPT": str(attempt),
            "METAGG_RUN_ID": run_id}
    joined = ctx.Event()
    procs = []
    for rank in range(m + 1):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        log = str(_log_path(run_dir, attempt, rank))
        p = ctx.Process(target=_run_rank, args=(argv, env, log, joined if rank == 0 else None),
                        name=f"metagg-rank{rank}")
        p.start()
        procs.append(p)
    atomic_write_text(run_dir / "pids.json", json.dumps(
        {"attempt": attempt, "port": port, "run_id": run_id, "server": procs[0].pid,
         "workers": {str(r): p.pid for r, p in enumerate(procs) if r > 0}}))
    resuming = " (resuming)" if "--resume" in argv else ""
    _say(f"attempt {attempt}: server pid {procs[0].pid}, {m} worker(s) on 127.0.0.1:{port}"
         + resuming)
    return procs, joined


def _watch(procs: list[multiprocessing.process.BaseProcess],
           joined: multiprocessing.synchronize.Event, deadline: float | None,
           stop: threading.Event | None, run_dir: Path, attempt: int) -> int | None:
    """Wait for the server to exit and return its exit code (None: the deadline or `stop`
    came first); report failed workers on the way. Raises GroupFailed when a worker
    exits before the group has formed (`joined` not yet set)."""
    server, workers = procs[0], procs[1:]
    reported: set[int] = set()
    while server.exitcode is None:
        if deadline is not None and time.monotonic() > deadline:
            return None
        if stop is not None and stop.is_set():
            return None
        for rank, p in enumerate(workers, start=1):
            if rank in reported or p.exitcode is None:
                continue
            if not joined.is_set():  # the server would wait for it until startup_timeout
                server.join(SERVER_GRACE)
                if server.exitcode is not None:
                    break  # the server died first and took the worker along
                if not joined.is_set():
                    log = _log_path(run_dir, attempt, rank)
                    raise GroupFailed(
                        f"worker rank {rank} exited with code {p.exitcode} during start-up: "
                        f"{_last_error(log) or f'no output (see {log})'}; stopped every process",
                        EXIT_BAD_INPUT if p.exitcode == EXIT_BAD_INPUT else EXIT_FAILED)
            if p.exitcode != 0:
                reported.add(rank)
                _say(f"worker rank {rank} exited with code {p.exitcode}; "
                     "the server goes on without it")
        server.join(POLL)
    if server.exitcode == 0:
        deadline = time.monotonic() + EXIT_GRACE
        while any(p.exitcode is None for p in workers) and time.monotonic() < deadline:
            time.sleep(POLL)
    return server.exitcode
