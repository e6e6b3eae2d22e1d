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

1. write `round` = t to the store, then send θ (gloo/NCCL `isend`, tag t) to every
   live worker;
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
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from metagg.checkpoint import CheckpointError, atomic_write_text
from metagg.config import ConfigError, RunConfig, config_to_dict, load_config
from metagg.simulation import Simulation, Workers, build_workers

__all__ = ["DistEnv", "Fault", "RuntimeOptions", "ServerSimulation", "TooFewWorkers", "main",
           "parse_fault", "resumable"]

log = logging.getLogger("metagg.runtime")

HEARTBEAT_EVERY = 0.25  # seconds between a worker's heartbeats
POLL_MIN, POLL_MAX = 0.0005, 0.004  # the server's sleep between looks at an empty queue
GOODBYE_WAIT = 10.0  # how long the server waits for workers to say goodbye at the end
NOT_POSTED = "?"  # what compare_set returns for a key that does not exist
ANSWERS = "answers"  # the store queue of "RANK ROUND ok LOSS" / "RANK ROUND skip nan"
EXIT_FAILED = 1  # a peer or the store went away (a restart may help)
EXIT_BAD_INPUT = 2  # the config, options or checkpoint were rejected
EXIT_TOO_FEW_WORKERS = 3  # fewer live workers than the aggregator needs


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Fault:
    """Injected misbehaviour of worker processes, for tests and demonstrations.

    kind "nan": the worker sends NaN in its update; kind "delay": it sleeps
    `seconds` before sending each update; kind "fail": it exits with an error during
    start-up, before joining the group. `rank` None means every worker.
    """

    kind: str
    rank: int | None
    seconds: float = 0.0

    def applies_to(self, rank: int) -> bool:
        return self.rank is None or self.rank == rank


def parse_fault(text: str) -> Fault:
    """Parse `nan:RANK`, `fail:RANK` or `delay:RANK:SECONDS` (RANK a worker rank >= 1,
    or `all`)."""
    parts = text.split(":")
    kind = parts[0]
    want = {"nan": 2, "fail": 2, "delay": 3}
    if kind not in want or len(parts) != want[kind]:
        raise ValueError(f"--fault {text!r}: expected nan:RANK, fail:RANK or delay:RANK:SECONDS "
                         "(RANK a worker rank >= 1 or 'all')")
    rank: int | None = None
    if parts[1] != "all":
        if not parts[1].isdigit() or int(parts[1]) < 1:
            raise ValueError(f"--fault {text!r}: RANK must be a worker rank >= 1 or 'all'")
        rank = int(parts[1])
    seconds = 0.0
    if kind == "delay":
        try:
            seconds = float(parts[2])
        except ValueError:
            seconds = -1.0
        if not seconds >= 0:
            raise ValueError(f"--fault {text!r}: SECONDS must be a number >= 0")
    return Fault(kind, rank, seconds)


@dataclass
class RuntimeOptions:
    """Timeouts and knobs of the distributed run (the config holds everything else)."""

    round_timeout: float = 30.0  # per-round deadline; later updates are discarded
    heartbeat_timeout: float = 10.0  # a worker silent this long is dead for the rest of the run
    startup_timeout: float = 300.0  # rendezvous, store and point-to-point timeouts
    max_missed_rounds: int = 5  # a worker leaving this many rounds in a row unanswered is dead
    backend: str = "auto"  # auto: nccl when every local process has a GPU, else gloo
    threads: int = 1  # torch threads per process
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("round_timeout", "heartbeat_timeout", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.max_missed_rounds < 1:
            raise ValueError(f"max-missed-rounds must be >= 1, got {self.max_missed_rounds}")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the group, from torchrun's / `metagg launch`'s variables."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int
    local_world_size: int  # processes on this machine
    attempt: int  # restart count: each attempt uses its own store key prefix
    agent_store: bool  # torchrun's agent hosts the store (all ranks are clients)
    elastic: bool = False  # started by torchrun: a restart resumes by itself
    run_id: str | None = None  # written into checkpoints; None: unknown

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ConfigError(f"environment lacks {', '.join(missing)}: start this under torchrun "
                              "or with `metagg launch`")
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            port = int(env["MASTER_PORT"])
            local_rank = int(env.get("LOCAL_RANK", "0"))
            local_world = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
            attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", env.get("METAGG_ATTEMPT", "0")))
        except ValueError as exc:
            raise ConfigError(f"bad distributed environment variable ({exc})") from None
        if world < 2 or not 0 <= rank < world:
            raise ConfigError(f"need WORLD_SIZE >= 2 and 0 <= RANK < WORLD_SIZE, got RANK={rank} "
                              f"WORLD_SIZE={world}")
        run_id = env.get("METAGG_RUN_ID") or env.get("TORCHELASTIC_RUN_ID")
        return cls(rank, world, env["MASTER_ADDR"], port, local_rank, local_world, attempt,
                   env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
                   elastic="TORCHELASTIC_RESTART_COUNT" in env,
                   run_id=None if run_id in (None, "", "none") else run_id)


# --------------------------------------------------------------------------- store keys


def _heartbeat_key(rank: int) -> str:
    return f"hb/{rank}"


def connect_store(env: DistEnv, timeout: float) -> dist.Store:
    """The run's key-value store, under a key prefix of its own for this attempt.

    Rank 0 hosts it, unless torchrun's agent already does. The prefix keeps a
    restarted group from reading the dead group's keys (and gloo addresses).
    """
    base = dist.TCPStore(
        env.master_addr, env.master_port, None if env.agent_store else env.world_size,
        is_master=env.rank == 0 and not env.agent_store, timeout=timedelta(seconds=timeout),
        wait_for_workers=False,
    )
    if not hasattr(base, "queue_push"):
        raise ConfigError(f"torch {torch.__version__}: its TCPStore has no queues, which the "
                          "runtime needs; install a newer torch")
    return dist.PrefixStore(f"metagg/attempt{env.attempt}/", base)


def _client_store(env: DistEnv, timeout: float) -> dist.Store:
    """Another connection to the store, for a worker's heartbeat thread."""
    base = dist.TCPStore(env.master_addr, env.master_port, None, is_master=False,
                         timeout=timedelta(seconds=timeout))
    return dist.PrefixStore(f"metagg/attempt{env.attempt}/", base)


def _config_text(cfg: RunConfig) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def resumable(out: Path, run_id: str | None) -> bool:
    """Whether `out` holds a checkpoint written by run `run_id` (None: by any run), as
    its checkpoint.json says."""
    path = out / "checkpoint.json"
    if not path.exists():
        return False
    if run_id is None:
        return True
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("run_id") == run_id


# --------------------------------------------------------------------------- the server


class TooFewWorkers(RuntimeError):
    """Fewer live workers remain than the aggregator needs: the run cannot go on."""


class ServerSimulation(Simulation):
    """A `Simulation` whose rounds are computed by worker processes.

    Only `step` differs: it sends θ out, gathers the updates that arrive in time
    and hands them to `Server.step`. Metrics, checkpoints, resume and
    the summary are `Simulation.run`'s; checkpoints also hold `run_id`.
    """

    def __init__(self, cfg: RunConfig, options: RuntimeOptions, device: torch.device,
                 run_id: str | None = None):
        super().__init__(cfg)
        self.options = options
        self.device = device
        self.run_id = run_id
        self.store: dist.Store | None = None
        m = cfg.workers.num_workers
        self.live = set(range(1, m + 1))  # worker ranks not known to be dead
        # θ sends that have no answer yet, per rank, oldest first: (round, Work, θ). The
        # tensor is kept with its Work: a send to a straggler may outlive this round's θ.
        self.inflight: dict[int, deque[tuple[int, Any, torch.Tensor]]] = {
            r: deque() for r in self.live}
        self.abandoned: list[Any] = []  # sends to dead workers, kept alive until exit
        self.beats = {r: (-1, time.monotonic()) for r in self.live}  # (count, when it moved)
        self.last_beat_check = 0.0
        self.started = False
        self.stats = {"rounds": 0, "bytes_sent": 0, "bytes_received": 0, "late_discarded": 0,
                      "round_s": 0.0, "gather_s": 0.0}

    def attach(self, store: dist.Store) -> None:
        """Use the store of an initialised process group; publish the config."""
        self.store = store
        store.set("config", _config_text(self.cfg))
        now = time.monotonic()
        self.beats = {r: (-1, now) for r in self.live}

    def _checkpoint_meta(self, wall_s: float) -> dict[str, Any]:
        meta = super()._checkpoint_meta(wall_s)
        if self.run_id is not None:  # a restart resumes only a checkpoint of its own run
            meta["run_id"] = self.run_id
        return meta

    # ---------------------------------------------------------------- one round
    def step(self) -> None:
        """One round over the worker processes, then the simulator's server half."""
        start = time.perf_counter()
        updates, losses, received = self.gather()
        gathered = time.perf_counter()
        present = self.cluster.present(self.round, self.cfg.workers.failure_prob)
        self.server.step(updates, present, losses, received)
        self.stats["rounds"] += 1
        self.stats["gather_s"] += gathered - start
        self.stats["round_s"] += time.perf_counter() - start

    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Send θ, collect this round's updates: ([M, d], losses [M], received bool [M])."""
        assert self.store is not None, "attach() the store first"
        t, store = self.round, self.store
        m, d = self.cfg.workers.num_workers, self.task.dim
        if not self.started:  # workers wait for this before their first round
            store.set("start", str(t))
            self.started = True
        store.set("round", str(t))
        theta = self.params.to(self.device).contiguous()
        most = self.options.max_missed_rounds
        for r in sorted(self.live):
            if len(self.inflight[r]) >= most:  # alive (heartbeats) but not answering
                self._declare_dead(r, f"left its last {most} rounds unanswered")
                continue
            self.inflight[r].append((t, dist.isend(theta, dst=r, tag=t), theta))
            self.stats["bytes_sent"] += 4 * d

        updates = torch.zeros(m, d)
        losses = torch.full((m,), float("nan"))
        received = torch.zeros(m, dtype=torch.bool)
        deadline = time.monotonic() + self.options.round_timeout
        pause = POLL_MIN
        while any(self._owes(r, t) for r in self.live):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = [r for r in sorted(self.live) if self._owes(r, t)]
                log.warning("round %d: no update from rank(s) %s by the %.3g s deadline", t,
                            ",".join(map(str, late)), self.options.round_timeout)
                break
            answer = self._next_answer()
            if answer is None:  # nothing yet: is someone dead? Then look again shortly.
                self._check_heartbeats(time.monotonic())
                time.sleep(min(pause, remaining))
                pause = min(2 * pause, POLL_MAX)
                continue
            pause = POLL_MIN
            rank, loss = answer
            if self._receive(rank, t, updates[rank - 1]):
                losses[rank - 1] = loss
                received[rank - 1] = True
        self._check_live_workers()
        return updates, losses, received

    def _check_live_workers(self) -> None:
        """Raise TooFewWorkers when the live workers can no longer make a round."""
        need = self.aggregator.min_updates
        if len(self.live) < need:
            raise TooFewWorkers(
                f"round {self.round}: {len(self.live)} live worker(s) left, fewer than the "
                f"{need} that {self.aggregator.name} needs; stopping (continue from the last "
                "checkpoint with --resume)")

    def _owes(self, rank: int, t: int) -> bool:
        """Whether `rank` still owes its answer for round t."""
        return any(entry[0] == t for entry in self.inflight.get(rank, ()))

    def _next_answer(self) -> tuple[int, float] | None:
        """The next answer to the current round that has arrived, without waiting.

        Answers come through one store queue, so one request looks at every worker.
        A "skip" or a late update is dealt with here (the late one received and
        thrown away). Returns (rank, loss) of this round's update waiting to be
        received, or None when the queue is empty. Non-blocking pops: a blocking
        pop that times out makes c10d log two warnings each time.
        """
        assert self.store is not None
        while True:
            try:
                raw = self.store.queue_pop(ANSWERS, block=False)
            except dist.DistStoreError:  # empty
                return None
            rank_s, round_s, status, loss_s = raw.decode().split()
            rank, rt = int(rank_s), int(round_s)
            queue = self.inflight.get(rank)
            if rank not in self.live or not queue:
                continue  # from a worker already given up for dead
            sent_round, work, _ = queue.popleft()
            if sent_round != rt:  # cannot happen with our workers; don't guess
                self._declare_dead(rank, f"answered round {rt}, expected {sent_round}")
                continue
            work.wait()  # the worker has θ_rt, so this send is complete
            if status == "skip":
                continue
            if rt == self.round:
                return rank, float(loss_s)
            if self._receive(rank, rt, torch.empty(self.task.dim)):
                self.stats["late_discarded"] += 1

    def _receive(self, rank: int, t: int, row: torch.Tensor) -> bool:
        """Receive `rank`'s update for round t into `row`; False if the worker is gone."""
        buf = row if row.device == self.device else torch.empty_like(row, device=self.device)
        try:
            dist.recv(buf, src=rank, tag=t)
        except RuntimeError as exc:  # the worker died after posting its answer
            self._declare_dead(rank, f"receive failed ({' '.join(str(exc).split())[:200]})")
            return False
        if buf is not row:
            row.copy_(buf)
        self.stats["bytes_received"] += 4 * row.numel()
        return True

    def _check_heartbeats(self, now: float) -> None:
        """Declare dead every live worker whose heartbeat counter has stopped moving."""
        assert self.store is not None
        if now - self.last_beat_check < HEARTBEAT_EVERY:
            return
        self.last_beat_check = now
        for r in sorted(self.live):
            count = self.store.add(_heartbeat_key(r), 0)  # reads without blocking
            last, since = self.beats[r]
            if count != last:
                self.beats[r] = (count, now)
            elif now - since > self.options.heartbeat_timeout:
                self._declare_dead(r, f"no heartbeat for {now - since:.1f} s")

    def _declare_dead(self, rank: int, why: str) -> None:
        self.live.discard(rank)
        self.abandoned.extend(self.inflight.pop(rank, ()))
        log.warning("worker rank %d presumed dead (%s); continuing with %d worker(s)",
                    rank, why, len(self.live))

    # ---------------------------------------------------------------- the end
    def finish(self, out: Path | None) -> None:
        """Tell the workers to stop, drain what they still send, wait for their goodbyes."""
        assert self.store is not None
        store = self.store
        if not self.started:
            store.set("start", str(self.round))
        store.set("finished", "1")
        deadline = time.monotonic() + GOODBYE_WAIT
        # Poll (for a few seconds at most): a blocking wait that times out makes c10d
        # log a warning each time.
        while time.monotonic() < deadline:
            self._next_answer()  # late answers: a straggler must not block on its send
            if not self.live or store.check([f"bye/{r}" for r in sorted(self.live)]):
                break
            time.sleep(0.02)
        if out is not None:
            atomic_write_text(out / "runtime.json", json.dumps(self.runtime_stats(), indent=2))

    def runtime_stats(self) -> dict[str, Any]:
        """Communication counters of this process's rounds (this attempt only)."""
        s = dict(self.stats)
        n = max(s["rounds"], 1)
        d, m = self.task.dim, self.cfg.workers.num_workers
        s.update(
            dimension=d, num_workers=m, live_workers=len(self.live),
            ms_per_round=round(1000 * s["round_s"] / n, 4),
            gather_ms_per_round=round(1000 * s["gather_s"] / n, 4),  # send θ, wait, receive
            bytes_per_round=(s["bytes_sent"] + s["bytes_received"]) / n,
            min_bytes_per_round=4 * d * m,  # the M updates themselves
        )
        return s


# --------------------------------------------------------------------------- a worker


class Heartbeat(threading.Thread):
    """Bumps this worker's heartbeat counter a few times a second, on its own connection,
    and notes the server's current round (so the worker can skip a round it has already
    missed without asking the store each time)."""

    def __init__(self, env: DistEnv, timeout: float):
        super().__init__(daemon=True, name="metagg-heartbeat")
        self.env, self.timeout = env, timeout
        self.server_round = -1
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            store = _client_store(self.env, self.timeout)
            while not self.stop.is_set():
                store.add(_heartbeat_key(self.env.rank), 1)
                current = store.compare_set("round", NOT_POSTED, NOT_POSTED).decode()
                if current != NOT_POSTED:
                    self.server_round = int(current)
                self.stop.wait(HEARTBEAT_EVERY)
        except Exception:  # the server is gone; the main thread finds out by itself
            return


def run_worker(cfg: RunConfig, workers: Workers, env: DistEnv, store: dist.Store,
               options: RuntimeOptions, device: torch.device) -> None:
    """Serve rounds until the last one, then wait for the server's `finished`."""
    rank = env.rank
    if store.get("config").decode() != _config_text(cfg):
        raise ConfigError(f"worker rank {rank}: its config differs from the server's; start every "
                          "process with the same config file and --set options")
    beat = Heartbeat(env, options.startup_timeout)
    beat.start()
    cluster, me = workers.cluster, torch.tensor([rank - 1])
    nan = any(f.kind == "nan" and f.applies_to(rank) for f in options.faults)
    delay = sum(f.seconds for f in options.faults if f.kind == "delay" and f.applies_to(rank))
    theta = torch.empty(workers.task.dim, device=device)
    t = int(store.get("start").decode())
    while t < cfg.rounds:
        dist.recv(theta, src=0, tag=t)
        if beat.server_round > t:
            # The server has moved on (this worker missed the deadline): don't compute it.
            store.queue_push(ANSWERS, f"{rank} {t} skip nan")
            t += 1
            continue
        out = cluster.compute(theta, t, me)  # the row the simulator computes for this worker
        update, loss = out.updates[0], out.losses[0]
        if nan:
            update = update.clone()
            update[0] = float("nan")
        if delay:
            time.sleep(delay)
        # Post the send before the answer: the server receives only after reading it.
        work = dist.isend(update.contiguous(), dst=0, tag=t)
        store.queue_push(ANSWERS, f"{rank} {t} ok {float(loss)!r}")
        work.wait()
        t += 1
    # Stay connected until the server has everything (an early exit could reset a
    # connection the server is still reading from).
    store.wait(["finished"], timedelta(seconds=options.startup_timeout))
    beat.stop.set()
    store.set(f"bye/{rank}", "1")


# --------------------------------------------------------------------------- main


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
