"""What the runtime's processes agree on: options, where each sits, the key-value store.

The server (`metagg.runtime.server`) and the workers (`metagg.runtime.worker`) talk
through the store `init_process_group` uses (answers, heartbeats, the current round;
each restart attempt under a key prefix of its own) and point-to-point messages (θ and
the updates); `metagg.runtime.ps` starts either one. See `metagg.runtime.ps` for the
protocol and how faults are handled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from metagg.config import ConfigError, RunConfig, config_to_dict

__all__ = [
    "ANSWERS",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_TOO_FEW_WORKERS",
    "DistEnv",
    "Fault",
    "RuntimeOptions",
    "config_text",
    "connect_store",
    "parse_fault",
    "resumable",
]

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


def heartbeat_key(rank: int) -> str:
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


def client_store(env: DistEnv, timeout: float) -> dist.Store:
    """Another connection to the store, for a worker's heartbeat thread."""
    base = dist.TCPStore(env.master_addr, env.master_port, None, is_master=False,
                         timeout=timedelta(seconds=timeout))
    return dist.PrefixStore(f"metagg/attempt{env.attempt}/", base)


def config_text(cfg: RunConfig) -> str:
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


