"""Any metagg aggregator as a Flower strategy (Flower 1.41, `flwr.server.strategy` API).

`AggregatorStrategy` is a `flwr.server.strategy.FedAvg` whose `aggregate_fit` hands
the clients' models to a metagg aggregator instead of averaging them:

    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from metagg.integrations.flower import AggregatorStrategy

    def server_fn(context):
        strategy = AggregatorStrategy(
            "krum", f=1,  # or "median", "nnm+trimmed_mean", "rnn:pretrained/digits-mlp20-lstm"
            initial_parameters=ndarrays_to_parameters(initial_arrays),  # list of numpy arrays
            min_fit_clients=5, min_available_clients=5,                 # any FedAvg argument
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=10))

    app = ServerApp(server_fn=server_fn)   # run with `flwr run`; a complete app: examples/flower

A round, as in the simulator: client k returns its locally trained θ_k; the update
is the pseudo-gradient u_k = θ − θ_k (FedOpt sign, `mode="local_sgd"`); updates
of the wrong shape or with non-finite entries are dropped and counted (they never
reach θ); the aggregator's step is applied as θ ← θ − step; the aggregator's state
(server momentum, RNN hidden states, ...) is kept across rounds.

Too few clients: the constructor checks its arguments as `metagg run` checks a config
(`metagg.integrations.checks`): a negative f, an unknown name or bad options raise
`ConfigError`, and so does `num_workers` below what the rule needs for f (krum: 2f + 3).
A round that *samples* fewer clients than that raises `ConfigError` in `configure_fit`,
before the clients train: it could never aggregate, and skipping it would skip every
round. A round that sampled enough but got too few usable updates back (failures,
malformed or non-finite updates: `TooFewUpdates`) keeps θ and is skipped, with a
warning and `skipped=1` in its metrics.

Weighting: metagg aggregators treat every client alike; they do *not* weight by
`FitRes.num_examples` (Flower's FedAvg does). So `"mean"` with the default
SGD(lr=1) equals FedAvg exactly when clients hold equally many examples, and is
the unweighted average otherwise. The example counts are passed to the aggregator
as `ctx.num_examples` (int64 [n]) for aggregators that want them.

Worker ids: Flower client ids (`ClientProxy.cid`) are mapped to 0, 1, 2, ... in
order of first appearance and passed as `ctx.worker_ids`, so per-worker state and
learned aggregators with one input slot per worker see the same client in the same
slot every round. `num_workers` (M, the aggregator's worker count) defaults to the
number of clients sampled in the first round; set it to the federation size when
clients are sampled (`fraction_fit < 1`) or when a learned aggregator was trained
for a fixed M.

Checkpoints: `strategy.save(path)` writes θ, the aggregator's state, the client → slot
map and the counters (safetensors + JSON, atomically); `strategy.load(path)` on a
strategy built with the same aggregator restores them, so a restarted Flower server
continues where it stopped (e.g. save from `evaluate_fn`, which runs after every round).

Each round's fit metrics (in Flower's history) hold `num_updates`, `dropped_malformed`,
`dropped_nonfinite`, `failures` and `skipped` (1 when θ was kept), next to whatever
`fit_metrics_aggregation_fn` returns for the clients whose updates were used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from flwr.common import (
        FitIns,
        FitRes,
        NDArrays,
        Parameters,
        Scalar,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg
except ImportError as exc:  # pragma: no cover - exercised by monkeypatching sys.modules
    raise ImportError(
        "metagg.integrations.flower needs Flower with its simulation extra: "
        "pip install 'metagg[flower]'"
    ) from exc

from metagg.aggregators.base import Aggregator, RoundContext, TooFewUpdates, chosen_local_lr
from metagg.aggregators.optimizers import ServerOptimizer
from metagg.checkpoint import (
    CheckpointError,
    flatten_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from metagg.config import OptimizerConfig
from metagg.integrations.checks import build_checked_aggregator, check_enough_clients
from metagg.layout import ParamLayout
from metagg.tasks import TrustedData

__all__ = ["AggregatorStrategy"]

log = logging.getLogger("metagg")
FORMAT = "metagg.flower_strategy"


class AggregatorStrategy(FedAvg):
    """A Flower strategy that aggregates client models with a metagg aggregator.

    Args:
        aggregator: an aggregator name as in configs and the CLI ("mean", "krum",
            "median", "nnm+krum", "rnn:pretrained/digits-mlp20-lstm", ...) or an
            `Aggregator` instance.
        f: number of Byzantine clients the rule assumes, an integer >= 0 (names only).
        optimizer: the server optimizer after the rule, a `ServerOptimizer`
            (`metagg.aggregators.optimizers.momentum(...)`) or an `OptimizerConfig`;
            default SGD with lr 1 (names only).
        options: the rule's own options, as `aggregator.options` in a config (names only).
        seed: seeds the rule's own randomness (names only).
        num_workers: M, the number of workers the aggregator is built for; default
            the number of clients sampled in the first round. More distinct clients
            than M is an error, and so is an M below what the rule needs for f.
        trusted: the server's small trusted sample, for aggregators that need one
            (zeno, fltrust, arnn). Its task's model must have the clients' tensors in
            the same order and shapes.
        local_lr, local_steps: the clients' local SGD settings, for aggregators that
            imitate a client on the trusted data (FLTrust). An aggregator that chooses
            the clients' lr (`requested_local_lr`) sends it in every fit config as
            "local_lr"; clients should train with `config.get("local_lr", their own)`.
        **fedavg_kwargs: any `flwr.server.strategy.FedAvg` argument (`initial_parameters`,
            `fraction_fit`, `min_fit_clients`, `evaluate_fn`, `accept_failures`, ...).
            Without `initial_parameters`, θ is taken from what the server sends in the
            first round (Flower then asks one client for its parameters).

    Raises:
        ConfigError: a bad name, f, options or num_workers (every problem at once).
    """

    def __init__(
        self,
        aggregator: str | Aggregator,
        *,
        f: int = 0,
        optimizer: ServerOptimizer | OptimizerConfig | None = None,
        options: Mapping[str, Any] | None = None,
        seed: int = 0,
        num_workers: int | None = None,
        trusted: TrustedData | None = None,
        local_lr: float = 1.0,
        local_steps: int = 1,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        # the checks `metagg run` applies to a config (metagg.integrations.checks)
        self.aggregator = build_checked_aggregator(aggregator, f=f, optimizer=optimizer,
                                                   options=options, seed=seed,
                                                   num_workers=num_workers)
        self.f = f if isinstance(aggregator, str) else None
        self.options = dict(options or {})
        if self.aggregator.uses_trusted_data and trusted is None:
            raise ValueError(f"{self.aggregator.name} needs the server's trusted data: pass "
                             "trusted=metagg.tasks.TrustedData(task, x, y)")
        self.num_workers = num_workers
        self.trusted = trusted
        self.local_lr = local_lr
        self.local_steps = local_steps
        self._round_lr = local_lr  # the lr the clients were told this round

        self.layout: ParamLayout | None = None
        self.dtypes: list[np.dtype] = []
        self.params: torch.Tensor | None = None  # θ, flat float32 [d]
        self.state: Any = None  # the aggregator's state, created at the first aggregation
        #: Flower client id -> worker id (0, 1, ... in order of first appearance).
        self.worker_ids: dict[str, int] = {}
        self.dropped_updates = 0
        self.skipped_rounds = 0
        self._sampled: int | None = None  # clients sampled by the last configure_fit
        # ctx.round = round_offset + server_round - 1: a restarted Flower server counts
        # from 1 again, `load` sets the offset so per-round seeds do not repeat
        self.round_offset = 0
        self.rounds_done = 0
        if self.initial_parameters is not None:
            self._set_params(parameters_to_ndarrays(self.initial_parameters))
            self.initial_parameters = None  # θ lives in self.params from now on

    def __repr__(self) -> str:
        return (f"AggregatorStrategy({self.aggregator.name!r}, "
                f"accept_failures={self.accept_failures})")

    # ------------------------------------------------------------------ θ <-> arrays
    def _set_params(self, arrays: NDArrays) -> None:
        """Take θ from the server's arrays; the first call fixes the layout."""
        shapes = [tuple(a.shape) for a in arrays]
        if self.layout is None:
            if not arrays:
                raise ValueError("the global model has no parameters (empty array list)")
            self.layout = self._make_layout(shapes)
            self.dtypes = [a.dtype for a in arrays]
        elif shapes != self._shapes():
            raise ValueError(f"the global parameters changed shape: expected {self._shapes()}, "
                             f"got {shapes}")
        self.params = torch.from_numpy(self._flatten(arrays))

    def _make_layout(self, shapes: list[tuple[int, ...]]) -> ParamLayout:
        if self.trusted is None:
            return ParamLayout.from_shapes({f"param{i}": s for i, s in enumerate(shapes)})
        layout = self.trusted.task.layout
        if [s.shape for s in layout] != shapes:
            raise ValueError(f"the trusted task's model has tensors {[s.shape for s in layout]}, "
                             f"the Flower parameters have {shapes}")
        return layout

    def _shapes(self) -> list[tuple[int, ...]]:
        assert self.layout is not None
        return [s.shape for s in self.layout]

    @staticmethod
    def _flatten(arrays: NDArrays) -> np.ndarray:
        return np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays])

    def current_arrays(self) -> NDArrays:
        """θ as a list of numpy arrays in the clients' shapes and dtypes."""
        if self.params is None or self.layout is None:
            raise ValueError("no global parameters yet: pass initial_parameters")
        flat = self.params.numpy()
        return [flat[s.slice].reshape(s.shape).astype(dt, copy=True)
                for s, dt in zip(self.layout, self.dtypes, strict=True)]

    def current_parameters(self) -> Parameters:
        """θ as Flower `Parameters`."""
        return ndarrays_to_parameters(self.current_arrays())

    # ------------------------------------------------------------------ Flower hooks
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """θ0 from `initial_parameters`; None lets the server ask a client."""
        return self.current_parameters() if self.params is not None else None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Remember θ as sent to the clients, then sample them as FedAvg does; fail
        before the clients train when the sample is too small for the rule."""
        self._set_params(parameters_to_ndarrays(parameters))
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self._sampled = len(instructions)
        if instructions:  # none: Flower cancels the round itself
            self._check_enough_clients(server_round, len(instructions))
            lr = self._requested_local_lr(server_round, len(instructions))
            if lr is not None:  # the aggregator chooses the clients' lr: tell them
                for _, fit_ins in instructions:
                    fit_ins.config = {**fit_ins.config, "local_lr": lr}
        return instructions

    def _requested_local_lr(self, server_round: int, sampled: int) -> float | None:
        """The aggregator's `requested_local_lr` for this round (sent in each client's
        fit config as "local_lr"; clients that read it train with it), or None."""
        if self.layout is None or self.params is None:
            return None
        if self.state is None:  # the first round: the aggregator's fresh state
            self.state = self.aggregator.init(self.layout, self._num_workers(sampled))
        ctx = RoundContext(round=self.round_offset + server_round - 1, params=self.params,
                           layout=self.layout, num_workers=self._num_workers(),
                           worker_ids=torch.zeros(0, dtype=torch.int64), trusted=self.trusted,
                           mode="local_sgd", local_lr=self.local_lr,
                           local_steps=self.local_steps)
        lr = chosen_local_lr(self.aggregator, self.state, ctx)
        self._round_lr = self.local_lr if lr is None else lr
        return lr

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate the clients' models with the metagg aggregator; None keeps θ."""
        metrics: dict[str, Scalar] = {
            "num_updates": 0, "dropped_malformed": 0, "dropped_nonfinite": 0,
            "failures": len(failures), "skipped": 1,
        }
        if results or failures:  # the clients sampled this round
            self._check_enough_clients(server_round, len(results) + len(failures))
        self.rounds_done = self.round_offset + server_round
        if failures:
            log.warning("round %d: %d client(s) failed", server_round, len(failures))
        if not results or (failures and not self.accept_failures):
            self.skipped_rounds += 1
            return None, metrics
        if self.params is None or self.layout is None:
            raise ValueError("no global parameters yet: pass initial_parameters")
        theta, layout = self.params, self.layout
        # Flower collects results from a set of futures: sort by client id so that
        # slots and row order do not depend on which client finished first.
        results = sorted(results, key=lambda item: str(item[0].cid))

        # Client -> worker id, stable across rounds (even for clients dropped below).
        ids = [self._worker_id(proxy.cid) for proxy, _ in results]

        rows, kept = [], []
        bad: list[str] = []
        for k, (proxy, res) in enumerate(results):
            row = self._client_row(res)
            if isinstance(row, str):
                bad.append(f"client {proxy.cid}: {row}")
            else:
                rows.append(row)
                kept.append(k)
        for msg in bad:
            log.warning("round %d: dropped %s", server_round, msg)
        if not rows:  # every client sent garbage: count it, keep θ, keep serving
            log.warning("round %d skipped: no client returned parameters of the global "
                        "model's shapes %s", server_round, self._shapes())
            self.dropped_updates += len(bad)
            self.skipped_rounds += 1
            metrics.update(dropped_malformed=len(bad))
            return None, metrics

        # Server safety: a non-finite update never reaches the aggregator.
        updates = theta.unsqueeze(0) - torch.from_numpy(np.stack(rows))  # u_k = θ − θ_k
        finite = torch.isfinite(updates).all(dim=1)
        n_nonfinite = int((~finite).sum())
        if n_nonfinite:
            log.warning("round %d: dropped %d non-finite update(s)", server_round, n_nonfinite)
            updates = updates[finite]
            kept = [k for k, ok in zip(kept, finite.tolist(), strict=True) if ok]
        self.dropped_updates += len(bad) + n_nonfinite
        metrics.update(num_updates=len(kept), dropped_malformed=len(bad),
                       dropped_nonfinite=n_nonfinite)

        if self.state is None:
            m = self._num_workers(len(results) + len(failures))
            self.state = self.aggregator.init(layout, m)
        ctx = RoundContext(
            round=self.round_offset + server_round - 1, params=theta, layout=layout,
            num_workers=self._num_workers(), trusted=self.trusted,
            worker_ids=torch.tensor([ids[k] for k in kept], dtype=torch.int64),
            mode="local_sgd", local_lr=self._round_lr, local_steps=self.local_steps,
            num_examples=torch.tensor([results[k][1].num_examples for k in kept],
                                      dtype=torch.int64),
        )
        try:
            step, new_state = self.aggregator.step(self.state, updates, ctx)
        except TooFewUpdates as exc:
            log.warning("round %d skipped, global model kept: %s", server_round, exc)
            self.skipped_rounds += 1
            return None, metrics
        if not bool(torch.isfinite(step).all()):
            log.warning("round %d skipped: %s produced a non-finite step", server_round,
                        self.aggregator.name)
            self.skipped_rounds += 1
            return None, metrics

        self.params = theta - step.to(theta.dtype)
        self.state = new_state
        metrics["skipped"] = 0
        if self.fit_metrics_aggregation_fn is not None:
            client_metrics = [(results[k][1].num_examples, results[k][1].metrics) for k in kept]
            metrics = {**self.fit_metrics_aggregation_fn(client_metrics), **metrics}
        return self.current_parameters(), metrics

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        """Write θ, the aggregator's state, the client → slot map and the counters to
        `path`.safetensors + `path`.json (atomically; see `metagg.checkpoint`)."""
        if self.params is None or self.layout is None:
            raise ValueError("nothing to save yet: no global parameters")
        tensors = {"params": self.params}
        if self.state is not None:
            tensors.update(flatten_state(self.state))
        meta = {"format": FORMAT, "aggregator": self.aggregator.name,
                "shapes": [list(s) for s in self._shapes()],
                "dtypes": [np.dtype(d).str for d in self.dtypes],
                "num_workers": self.num_workers, "worker_ids": self.worker_ids,
                "has_state": self.state is not None, "dropped_updates": self.dropped_updates,
                "skipped_rounds": self.skipped_rounds, "rounds_done": self.rounds_done}
        save_checkpoint(path, tensors, meta)

    def load(self, path: str | Path) -> None:
        """Restore what `save` wrote. The strategy must use the same aggregator (and
        trusted task, if any); θ from the checkpoint replaces `initial_parameters`."""
        tensors, meta = load_checkpoint(path)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a Flower strategy checkpoint")
        if meta["aggregator"] != self.aggregator.name:
            raise CheckpointError(f"{path} was written by aggregator {meta['aggregator']!r}, "
                                  f"this strategy runs {self.aggregator.name!r}")
        shapes = [tuple(s) for s in meta["shapes"]]
        layout = self._make_layout(shapes) if self.layout is None else self.layout
        if [sl.shape for sl in layout] != shapes:
            raise CheckpointError(f"{path} holds a model of shapes {shapes}, this strategy's "
                                  f"is {[sl.shape for sl in layout]}")
        params = tensors.get("params")
        if params is None or params.shape != (layout.size,):
            raise CheckpointError(f"{path}: params missing or of the wrong size")
        num_workers = meta["num_workers"]
        if num_workers is None:
            num_workers = self.num_workers
        elif self.num_workers is not None and self.num_workers != num_workers:
            raise CheckpointError(f"{path} was written with num_workers={num_workers}, this "
                                  f"strategy has num_workers={self.num_workers}")
        state = None
        saved_state = {k for k in tensors if k == "state" or k.startswith("state.")}
        if meta["has_state"]:
            template = self.aggregator.init(layout, int(num_workers))
            if set(flatten_state(template)) != saved_state:
                raise CheckpointError(f"{path}: the saved aggregator state does not fit "
                                      f"{self.aggregator.name} as configured here (another "
                                      "server optimizer or options?)")
            state = unflatten_state(template, tensors)
        self.layout, self.dtypes = layout, [np.dtype(d) for d in meta["dtypes"]]
        self.params, self.state = params, state
        self.num_workers = num_workers
        self.rounds_done = self.round_offset = int(meta.get("rounds_done", 0))
        self.worker_ids = {str(k): int(v) for k, v in meta["worker_ids"].items()}
        self.dropped_updates = int(meta["dropped_updates"])
        self.skipped_rounds = int(meta["skipped_rounds"])

    # ------------------------------------------------------------------ helpers
    def _client_row(self, res: FitRes) -> np.ndarray | str:
        """A client's model as a flat float32 row, or why it does not fit the global model."""
        try:
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception as exc:  # undecodable bytes from a client
            return f"unreadable parameters ({type(exc).__name__}: {exc})"
        shapes = [tuple(a.shape) for a in arrays]
        if shapes != self._shapes():
            return f"got shapes {shapes}, expected {self._shapes()}"
        if any(a.dtype.kind not in "fiub" for a in arrays):
            return f"got non-numeric arrays {[str(a.dtype) for a in arrays]}"
        return self._flatten(arrays)

    def _check_enough_clients(self, server_round: int, sampled: int) -> None:
        """A round that samples fewer clients than the rule needs can never aggregate:
        raise (a config error, as `metagg run` raises for too few workers) instead of
        skipping it, and every later round like it, in silence."""
        check_enough_clients(
            self.aggregator, sampled, f=self.f, options=self.options, where="AggregatorStrategy",
            got=f"but round {server_round} sampled {sampled} (min_fit_clients="
                f"{self.min_fit_clients}, min_available_clients={self.min_available_clients}, "
                f"fraction_fit={self.fraction_fit})")

    def _worker_id(self, cid: str) -> int:
        wid = self.worker_ids.get(cid)
        if wid is None:
            wid = self.worker_ids[cid] = len(self.worker_ids)
        return wid

    def _num_workers(self, default: int | None = None) -> int:
        """M: as given, else the clients sampled in the first aggregated round."""
        if self.num_workers is None:
            self.num_workers = self._sampled or default or len(self.worker_ids)
        m = self.num_workers
        if len(self.worker_ids) > m:
            raise ValueError(
                f"{len(self.worker_ids)} distinct Flower clients have sent updates, but the "
                f"aggregator was set up for num_workers={m}; pass num_workers=<number of "
                "clients in the federation> to AggregatorStrategy"
            )
        return m
