"""The parameter server's round: from the workers' updates to θ ← θ − step.

One implementation, used by the simulator (`metagg.simulation`), the distributed
runtime's server (`metagg.runtime.ps`) and meta-training's environments:

    server = Server(aggregator, attack=make_attack("alie"), byzantine=torch.arange(3),
                    num_workers=10, seed=0, layout=task.layout)
    server.reset(theta0)
    server.step(updates, present, losses)      # honest updates [M, d]; θ advanced a round

A round, in this order:

1. worker momentum (β > 0): each honest worker sends m ← β·m + (1 − β)·u (kept by the
   server on the workers' behalf, so the buffers are checkpointed with θ);
2. the attack: Byzantine rows are forged from what the honest workers send (attacks
   are omniscient; white-box ones also see the aggregator), or the Byzantine workers
   send nothing (crash); label flipping already happened in the workers;
3. workers that sent nothing are counted missing, non-finite rows are dropped and
   counted (a non-finite update never reaches the aggregator);
4. the aggregator's step on the remaining rows; a round with fewer rows than it needs
   is skipped, and so is a round whose step is not finite;
5. θ ← θ − step.

`receive` is steps 1-3 alone: meta-training takes the aggregator's step itself, in the
graph of the meta-gradient.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from metagg.aggregators.base import Aggregator, RoundContext, TooFewUpdates, chosen_local_lr
from metagg.attacks import Attack, Defence, make_attack
from metagg.checkpoint import CheckpointError, flatten_state, unflatten_state
from metagg.layout import ParamLayout
from metagg.seeding import RoundStream, round_generator
from metagg.tasks import TrustedData

__all__ = ["COUNTERS", "Server"]

log = logging.getLogger("metagg")

#: The server's counters, as checkpoints and metrics name them.
COUNTERS = ("round", "dropped_updates", "skipped_rounds", "missing_updates", "last_worker_loss")


class Server:
    """The server of one training run: its aggregator, the attack it faces, and its state.

    Args:
        aggregator: turns the round's rows into the step.
        attack: what the Byzantine workers do (default: nothing).
        byzantine: int64 [b], which workers are Byzantine (sorted).
        num_workers: M.
        layout: the model's tensors (for the round context).
        seed: run seed (the attack's per-round randomness).
        trusted: the server's trusted sample, if any.
        mode, local_lr, local_steps: the workers' settings, for the round context
            (an aggregator may choose the local lr per round: `round_local_lr`).
        momentum: β of the workers' momentum (0 = off).

    State (read it, `reset` it, checkpoint it with `tensors` / `counters`): `params` θ,
    `agg_state`, `round`, and the counters `dropped_updates`, `skipped_rounds`,
    `missing_updates`, `last_worker_loss` (the honest workers' mean loss last round).
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        num_workers: int,
        layout: ParamLayout,
        attack: Attack | None = None,
        byzantine: torch.Tensor | None = None,
        seed: int = 0,
        trusted: TrustedData | None = None,
        mode: str = "gradient",
        local_lr: float = 1.0,
        local_steps: int = 1,
        momentum: float = 0.0,
    ):
        self.aggregator = aggregator
        self.attack = attack if attack is not None else make_attack("none")
        self.byzantine = (byzantine if byzantine is not None
                          else torch.zeros(0, dtype=torch.int64))
        self.num_workers, self.layout, self.seed = num_workers, layout, seed
        self.trusted = trusted
        self.mode, self.local_lr, self.local_steps = mode, local_lr, local_steps
        self.momentum = momentum
        self.honest = torch.ones(num_workers, dtype=torch.bool)
        self.honest[self.byzantine] = False
        self.params = torch.zeros(layout.size)
        self.reset(self.params)

    # ------------------------------------------------------------------ state
    def reset(self, params: torch.Tensor) -> None:
        """Start a run at θ = `params`: fresh aggregator state, momenta and counters."""
        self.params = params
        self.agg_state = self.aggregator.init(self.layout, self.num_workers)
        self.round = 0
        self._round_lr: float | None = None  # round_local_lr's answer for this round
        self.dropped_updates = 0
        self.skipped_rounds = 0
        self.missing_updates = 0
        self.last_worker_loss = float("nan")
        m = self.num_workers
        self.worker_momentum = (torch.zeros(m, self.layout.size) if self.momentum > 0
                                else None)
        self.momentum_started = torch.zeros(m, dtype=torch.bool)

    def context(self, worker_ids: torch.Tensor, *, round: int | None = None,
                params: torch.Tensor | None = None) -> RoundContext:
        """The round context of rows from `worker_ids` (this round and θ by default)."""
        return self._context(worker_ids, round, params, self.round_local_lr())

    def _context(self, worker_ids: torch.Tensor, round: int | None,
                 params: torch.Tensor | None, local_lr: float) -> RoundContext:
        return RoundContext(
            round=self.round if round is None else round,
            params=self.params if params is None else params, layout=self.layout,
            num_workers=self.num_workers, worker_ids=worker_ids, trusted=self.trusted,
            mode=self.mode, local_lr=local_lr, local_steps=self.local_steps,
            worker_momentum=self.momentum,
        )

    def round_local_lr(self) -> float:
        """The workers' local lr in the coming round: the aggregator's
        `requested_local_lr` (local-SGD mode), else the configured one. Asked once a round
        (contexts are built several times a round; the answer may need a device sync)."""
        if self.mode != "local_sgd":
            return self.local_lr
        if self._round_lr is not None:
            return self._round_lr
        ctx = self._context(torch.zeros(0, dtype=torch.int64), None, None, self.local_lr)
        lr = chosen_local_lr(self.aggregator, self.agg_state, ctx)
        self._round_lr = self.local_lr if lr is None else lr
        return self._round_lr

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors for a checkpoint (θ, aggregator state, worker momenta)."""
        out = {"params": self.params, **flatten_state(self.agg_state)}
        if self.worker_momentum is not None:
            out["worker_momentum"] = self.worker_momentum
            out["worker_momentum_started"] = self.momentum_started.to(torch.uint8)
        return out

    def counters(self) -> dict[str, Any]:
        """The round and the counters, JSON-ready (a checkpoint's metadata)."""
        return {name: getattr(self, name) for name in COUNTERS}

    def restore(self, tensors: dict[str, torch.Tensor], counters: dict[str, Any],
                where: str) -> None:
        """Continue from `tensors` / `counters` of a checkpoint (`where` names it in errors)."""
        params = tensors.get("params")
        if params is None or params.shape != self.params.shape:
            raise CheckpointError(f"checkpoint {where}: params missing or of the wrong size")
        template = self.aggregator.init(self.layout, self.num_workers)
        agg_state = unflatten_state(template, tensors)
        if self.worker_momentum is not None:
            m, started = tensors.get("worker_momentum"), tensors.get("worker_momentum_started")
            if (m is None or started is None or m.shape != self.worker_momentum.shape
                    or started.shape != self.momentum_started.shape):
                raise CheckpointError(f"checkpoint {where}: worker momentum missing or of the "
                                      "wrong size")
            self.worker_momentum = m.clone()
            self.momentum_started = started.bool()
        self.params, self.agg_state = params, agg_state
        self.round = int(counters["round"])
        self._round_lr = None
        self.dropped_updates = int(counters["dropped_updates"])
        self.skipped_rounds = int(counters["skipped_rounds"])
        self.missing_updates = int(counters.get("missing_updates", 0))
        self.last_worker_loss = float(counters["last_worker_loss"])

    # ------------------------------------------------------------------ a round
    def step(self, updates: torch.Tensor, present: torch.Tensor, losses: torch.Tensor,
             received: torch.Tensor | None = None) -> None:
        """One whole round (see the module docstring); advances θ and `round`.

        `updates` [M, d] and `losses` [M] are the workers' honest outputs; `present`
        (bool [M]) says who delivers this round. The multi-process server passes
        `received` (bool [M]), the rows that actually arrived: the attack then sees
        only those, and the others count as missing. The simulator passes None (all).
        """
        t = self.round
        rows, worker_ids = self.receive(updates, present, losses, received)
        try:
            step, new_state = self.aggregator.step(self.agg_state, rows,
                                                   self.context(worker_ids))
        except TooFewUpdates as exc:
            log.warning("round %d skipped: %s", t, exc)
            self.skipped_rounds += 1
            self.round += 1
            self._round_lr = None
            return
        if not bool(torch.isfinite(step.sum())):
            log.warning("round %d skipped: %s produced a non-finite step", t, self.aggregator.name)
            self.skipped_rounds += 1
            self.round += 1
            self._round_lr = None
            return
        self.params = self.params - step
        self.agg_state = new_state
        self.round += 1
        self._round_lr = None

    def receive(self, updates: torch.Tensor, present: torch.Tensor, losses: torch.Tensor,
                received: torch.Tensor | None = None, *, round: int | None = None,
                params: torch.Tensor | None = None,
                agg_state: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-3 of a round: (rows [n, d] for the aggregator, their worker ids [n]).

        Counts missing and dropped rows and notes the honest workers' loss. `round`,
        `params` and `agg_state` default to the server's own (meta-training passes its
        inner run's, the aggregator's state included, for white-box attacks).
        """
        t = self.round if round is None else round
        theta = self.params if params is None else params
        if received is not None and bool(received.all()):
            received = None
        present = present.clone() if received is None else present & received
        byzantine = self.byzantine if received is None else self.byzantine[
            received[self.byzantine]]
        if self.worker_momentum is not None:
            updates = self._worker_momentum(updates, present)
        if len(byzantine) and self.attack.drops_workers:
            present[byzantine] = False
        elif len(byzantine) and not self.attack.flips_labels:
            rows = (torch.arange(self.num_workers) if received is None
                    else received.nonzero().squeeze(1))
            ctx = self.context(rows, round=t, params=theta)
            seen = updates if received is None else updates[rows]
            where = byzantine if received is None else torch.searchsorted(rows, byzantine)
            state = self.agg_state if agg_state is None else agg_state
            forged = self.attack.forge(seen, where, ctx,
                                       round_generator(self.seed, t, RoundStream.ATTACK),
                                       defence=Defence(self.aggregator, state))
            updates = updates.index_put((byzantine,), forged.to(updates.dtype))
        reporting = self.honest if received is None else self.honest & received
        if reporting.any():
            self.last_worker_loss = float(losses[reporting].mean())
        self.missing_updates += int((~present).sum())

        # One sum is a cheap test that every entry is finite; rows are checked only if not.
        keep = present
        if not bool(torch.isfinite(updates.sum())):
            finite = torch.isfinite(updates).all(dim=1)
            self.dropped_updates += int((present & ~finite).sum())
            keep = present & finite
        worker_ids = keep.nonzero().squeeze(1)
        return (updates if bool(keep.all()) else updates[keep]), worker_ids

    def _worker_momentum(self, updates: torch.Tensor, arrived: torch.Tensor) -> torch.Tensor:
        """Honest workers' momentum m_k ← β·m_k + (1 − β)·u_k; returns the rows they send.

        The buffer of worker k advances with each update of k that arrives (as a
        worker-side buffer would if a worker that misses a round also skips its
        computation). Before the attack, so Byzantine workers forge from honest momenta,
        as in Karimireddy et al. 2021; a worker that does not deliver this round still
        shows the attacker the momentum it would have sent. A missing or non-finite row
        leaves its buffer alone (and is dropped downstream); a buffer starts at its
        first update.
        """
        beta, m = self.momentum, self.worker_momentum
        assert m is not None
        u = updates.to(m.dtype)
        ok = arrived
        if not bool(torch.isfinite(u.sum())):
            ok = arrived & torch.isfinite(u).all(dim=1)
        if bool(ok.all()) and bool(self.momentum_started.all()):
            m.lerp_(u, 1 - beta)  # the usual round: in place
            return m.clone()
        # lerp, as in the fast path, so a row's value does not depend on the path taken;
        # weight 1 (a buffer's first update) gives u exactly
        weight = torch.where(self.momentum_started, 1 - beta, 1.0).to(m.dtype)
        sent = torch.lerp(m, u, weight[:, None])
        m.copy_(torch.where(ok[:, None], sent, m))
        self.momentum_started |= ok
        return sent
