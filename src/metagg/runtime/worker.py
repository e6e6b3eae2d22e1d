"""A worker process: receives θ and the round's local lr, computes its own row of the
round exactly as the simulator's `Cluster.compute` does, sends it back (see
`metagg.runtime.ps`)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from metagg.config import ConfigError, RunConfig
from metagg.runtime.protocol import (
    ANSWERS,
    HEARTBEAT_EVERY,
    NOT_POSTED,
    DistEnv,
    RuntimeOptions,
    client_store,
    config_text,
    heartbeat_key,
)
from metagg.simulation import Workers

__all__ = ["Heartbeat", "run_worker"]


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
            store = client_store(self.env, self.timeout)
            while not self.stop.is_set():
                store.add(heartbeat_key(self.env.rank), 1)
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
    if store.get("config").decode() != config_text(cfg):
        raise ConfigError(f"worker rank {rank}: its config differs from the server's; start every "
                          "process with the same config file and --set options")
    beat = Heartbeat(env, options.startup_timeout)
    beat.start()
    cluster, me = workers.cluster, torch.tensor([rank - 1])
    nan = any(f.kind == "nan" and f.applies_to(rank) for f in options.faults)
    delay = sum(f.seconds for f in options.faults if f.kind == "delay" and f.applies_to(rank))
    message = torch.empty(workers.task.dim + 1, device=device)  # θ, then the local lr
    t = int(store.get("start").decode())
    while t < cfg.rounds:
        dist.recv(message, src=0, tag=t)
        theta, lr = message[:-1], float(message[-1])
        if beat.server_round > t:
            # The server has moved on (this worker missed the deadline): don't compute it.
            store.queue_push(ANSWERS, f"{rank} {t} skip nan")
            t += 1
            continue
        out = cluster.compute(theta, t, me, lr=lr)  # the row the simulator computes for it
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


