"""The parameter server process: rank 0 sends θ, gathers the updates that arrive in time,
and runs the simulator's server round on them (see `metagg.runtime.ps`)."""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from metagg.checkpoint import atomic_write_text, json_text
from metagg.config import RunConfig
from metagg.runtime.protocol import (
    ANSWERS,
    GOODBYE_WAIT,
    HEARTBEAT_EVERY,
    POLL_MAX,
    POLL_MIN,
    RuntimeOptions,
    config_text,
    heartbeat_key,
)
from metagg.simulation import Simulation

__all__ = ["ServerSimulation", "TooFewWorkers"]

log = logging.getLogger("metagg.runtime")


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
        store.set("config", config_text(self.cfg))
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
        # θ and this round's local lr in one message (the aggregator may choose the lr)
        lr = torch.tensor([self.server.round_local_lr()], dtype=self.params.dtype)
        theta = torch.cat([self.params, lr]).to(self.device).contiguous()
        most = self.options.max_missed_rounds
        for r in sorted(self.live):
            if len(self.inflight[r]) >= most:  # alive (heartbeats) but not answering
                self._declare_dead(r, f"left its last {most} rounds unanswered")
                continue
            self.inflight[r].append((t, dist.isend(theta, dst=r, tag=t), theta))
            self.stats["bytes_sent"] += 4 * (d + 1)

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
            count = self.store.add(heartbeat_key(r), 0)  # reads without blocking
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
            atomic_write_text(out / "runtime.json", json_text(self.runtime_stats(), indent=2))

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


