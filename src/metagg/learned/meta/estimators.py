"""Meta-gradient estimators: from φ to an estimate of ∇_φ E[meta-loss], one truncation
at a time, behind one interface (as learned_optimization's gradient estimators).

    est = BPTT(cfg, envs)                    # RNN / ARNN, backpropagation through time
    est = PES(pes_cfg, env)                  # LAgg-A / LOpt-A (metagg.learned.meta.pes)
    phi, state = est.init_phi(seed), est.init_state()
    out = est.estimate(phi, state, step)     # Estimate(grad [n], state, metrics)

The outer loop (`metagg.learned.meta.loop`) owns φ, the optimizer, validation and
checkpoints; an estimator owns its inner problems. φ is always one flat float32 vector.
A non-finite `grad` means "no update from this step" (the loop skips it).

`BPTT` (Ji et al. 2019 §4, L2L's recipe): meta-iteration k samples a fresh model
initialisation and minibatch stream (seed `derive_seed(seed, env's train stream, k)`),
meets env k mod len(envs) (the attacks of a mixture in turn), and unrolls T rounds,
truncated every K: one estimate per truncation, so meta-iteration k is steps
[k·n, (k + 1)·n) with n = ⌈T/K⌉. Within a truncation the workers' updates are computed
at θ_t detached (Ji Fig. 2's dashed edges), the aggregator's step is differentiable in
φ and θ_{t+1} = θ_t − step stays in the graph; the meta-loss is Σ_t of the honest
workers' mean minibatch loss at θ_{t+1}. An unroll whose loss or gradient is not finite
is dropped: its remaining truncations estimate nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch

from metagg.aggregators import optimizers as opt
from metagg.aggregators.base import Aggregator
from metagg.aggregators.registry import build_aggregator
from metagg.config.meta import MetaTrainConfig
from metagg.layout import ParamLayout
from metagg.learned.meta.envs import TaskEnvs
from metagg.learned.meta.evaluate import SCORE_DEFINITION, validate
from metagg.learned.rnn import CoordinateRNN, RNNAggregator, RNNConfig, RNNState, save_rnn
from metagg.seeding import derive_seed

__all__ = ["BPTT", "Estimate", "Estimator", "validation_seeds"]


class Estimate(NamedTuple):
    """One step's meta-gradient estimate."""

    grad: torch.Tensor  # [n]; non-finite: no update from this step
    state: Any  # the estimator's state after the step
    metrics: dict[str, Any]  # for the history (meta_loss, ...)


class Estimator(Protocol):
    """What the outer loop needs from a meta-gradient estimator (see the module docstring)."""

    name: str  # "truncated_bptt" | "truncated_pes" (recorded as meta_gradient)
    kind: str  # the registry name of what it trains: rnn, arnn, lagg, lopt
    dim: int  # the length of φ

    def init_phi(self, seed: int) -> torch.Tensor: ...

    def phi_of(self, agg: Aggregator) -> torch.Tensor: ...  # a saved aggregator's φ

    def init_state(self) -> Any: ...

    def estimate(self, phi: torch.Tensor, state: Any, step: int) -> Estimate: ...

    def resumable(self, step: int) -> bool: ...  # a checkpoint after `step` steps resumes

    def checkpoint_state(self, state: Any) -> Any: ...  # pytree of tensors, at resumable steps

    def restore_state(self, tensors: Any) -> Any: ...

    def progress(self, step: int) -> dict[str, Any]: ...  # extra history fields

    def validate(self, phi: torch.Tensor) -> tuple[float, dict[str, Any]]: ...

    def baselines(self) -> dict[str, Any]: ...

    def aggregator(self, phi: torch.Tensor) -> Aggregator: ...  # frozen, holding φ

    def save(self, out: Any, phi: torch.Tensor, trained_on: dict[str, Any],
             validation: dict[str, Any]) -> Any: ...


def validation_seeds(seed: int, stream: int, count: int) -> list[int]:
    """Held-out model seeds of validation (never a training seed: another stream)."""
    return [derive_seed(seed, stream, j) for j in range(count)]


class _Unroll(NamedTuple):
    """The inner problem of the current meta-iteration (python objects: never saved,
    since checkpoints fall between meta-iterations)."""

    env: Any
    run: Any
    theta: torch.Tensor
    agg_state: RNNState | None
    dropped: bool


class BPTT:
    """Truncated backpropagation through time for the RNN / ARNN aggregator.

    Args:
        cfg: the meta-training config (recipe and architecture).
        envs: the gradient-mode envs (`GradientEnv` per attack of a mixture, a
            `HeteroEnv`, or `TaskEnvs`); every env has the same number of workers.
        validation_envs: where validation scores φ (default: `envs`; a multi-task run
            validates on tasks it does not train on).
    """

    name = "truncated_bptt"

    def __init__(self, cfg: MetaTrainConfig, envs: Sequence[Any],
                 validation_envs: Sequence[Any] | None = None):
        # a TaskEnvs builds each env when first met (and gives each its config's M)
        self.envs = envs if isinstance(envs, TaskEnvs) else list(envs)
        self.validation_envs = self.envs if validation_envs is None else validation_envs
        if not len(self.envs):
            raise ValueError("BPTT needs at least one env")
        listed = [self.envs[0]] if isinstance(self.envs, TaskEnvs) else self.envs
        if len({e.num_workers for e in [*listed, *self.validation_envs]}) != 1:
            raise ValueError("BPTT needs envs with one and the same number of workers")
        self.cfg = cfg
        self.rnn = RNNConfig(num_workers=envs[0].num_workers, cell=cfg.cell, hidden=cfg.hidden,
                             layers=cfg.layers, output=cfg.output, arnn=cfg.arnn, p=cfg.p,
                             scale=cfg.scale, clamp_sign=cfg.clamp_sign, probe_lr=cfg.probe_lr,
                             prodigy_coef=cfg.prodigy_coef)
        self.kind = self.rnn.kind
        # validation scores log(loss + floor·ln C) as meta_loss "log" trains on it
        self.floor = 1e-3 if cfg.meta_loss == "log" else 0.0
        self.score_definition = SCORE_DEFINITION if not self.floor else (
            f"mean over tasks, seeds and horizons of log(train loss + {self.floor:g}·ln C)")
        self.net = CoordinateRNN(self.rnn, seed=cfg.seed)  # holds φ while a step runs
        self.layout = ParamLayout.from_module(self.net)
        self.dim = self.layout.size
        self.agg = RNNAggregator(self.rnn, self.net, differentiable=True)
        self.frozen = RNNAggregator(self.rnn, self.net)  # the server's path, for validation
        self.truncations = math.ceil(cfg.unroll / cfg.truncation)
        self.horizons = ((cfg.unroll, cfg.long_horizon * cfg.unroll) if cfg.long_horizon > 1
                         else (cfg.unroll,))
        self.seeds = validation_seeds(cfg.seed, self.validation_envs[0].seed_streams[1],
                                      cfg.validation_seeds)

    # ------------------------------------------------------------------ φ
    def init_phi(self, seed: int) -> torch.Tensor:
        return self.layout.from_module_params(CoordinateRNN(self.rnn, seed=seed))

    def phi_of(self, agg: Aggregator) -> torch.Tensor:
        if not isinstance(agg, RNNAggregator) or agg.config != self.rnn:
            raise ValueError(f"{agg!r} is not an RNN aggregator with {self.rnn}")
        return self.layout.from_module_params(agg.net)

    def _load(self, phi: torch.Tensor) -> None:
        with torch.no_grad():
            for p, v in zip(self.net.parameters(), self.layout.unflatten(phi).values(),
                            strict=True):
                p.copy_(v)

    # ------------------------------------------------------------------ steps
    def init_state(self) -> _Unroll | None:
        return None  # the first step starts meta-iteration 0

    def resumable(self, step: int) -> bool:
        return step % self.truncations == 0

    def checkpoint_state(self, state: Any) -> tuple:
        return ()  # between meta-iterations there is nothing to keep

    def restore_state(self, tensors: Any) -> None:
        return None

    def progress(self, step: int) -> dict[str, Any]:
        return {"iteration": step // self.truncations}

    def estimate(self, phi: torch.Tensor, state: _Unroll | None, step: int) -> Estimate:
        k, j = divmod(step, self.truncations)
        if j == 0:
            state = self._start(k)
        assert state is not None
        info = {"iteration": k + 1}
        nothing = torch.full((self.dim,), math.nan)
        if state.dropped:
            return Estimate(nothing, state, {**info, "meta_loss": None, "rounds": 0})
        cfg = self.cfg
        span = range(j * cfg.truncation, min((j + 1) * cfg.truncation, cfg.unroll))
        self._load(phi)
        self.net.zero_grad(set_to_none=True)
        loss, theta, agg_state = self._truncation(state, span)
        if not torch.isfinite(loss):  # diverged: drop the rest of this unroll
            return Estimate(nothing, state._replace(dropped=True),
                            {**info, "meta_loss": None, "rounds": len(span)})
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in self.net.parameters()])
        dropped = not bool(torch.isfinite(grad).all())  # would poison φ: drop the unroll
        state = state._replace(theta=theta.detach(), agg_state=agg_state.detach(),
                               dropped=dropped)
        return Estimate(grad, state, {**info, "meta_loss": float(loss.detach()) / len(span),
                                      "rounds": len(span)})

    def _start(self, k: int) -> _Unroll:
        """Meta-iteration k's inner problem: a fresh model init and minibatch stream."""
        env = self.envs[k % len(self.envs)]
        seed = derive_seed(self.cfg.seed, env.seed_streams[0], k)
        return _Unroll(env, env.inner(seed, self.agg), env.task.init_params(seed),
                       self.agg.init(env.task.layout, env.num_workers), False)

    def _truncation(self, state: _Unroll, rounds: range
                    ) -> tuple[torch.Tensor, torch.Tensor, RNNState]:
        """Σ_{t in rounds} L(θ_{t+1}) (or log L: `meta_loss`) with
        θ_{t+1} = θ_t − A_φ(updates at θ_t detached); returns (meta-loss, θ, aggregator
        state), all still in the graph."""
        env, run, theta, agg_state = state.env, state.run, state.theta, state.agg_state
        meta_loss = theta.new_zeros(())
        floor = self.floor * math.log(env.task.num_classes)  # keeps log finite at 0 loss
        for t in rounds:
            rows, ctx = env.round_inputs(run, theta, t, agg_state)
            step, agg_state = self.agg.step(agg_state, rows, ctx)
            theta = theta - step
            loss = env.batch_loss(run, theta, t + 1)
            meta_loss = meta_loss + (torch.log(loss + floor) if self.cfg.meta_loss == "log"
                                     else loss)
        return meta_loss, theta, agg_state

    # ------------------------------------------------------------------ validation, files
    def validate(self, phi: torch.Tensor) -> tuple[float, dict[str, Any]]:
        self._load(phi)
        return validate(self.frozen, self.validation_envs, self.seeds, self.horizons,
                        self.floor)

    def baselines(self) -> dict[str, Any]:
        """On a multi-task run's validation tasks, mean aggregation + server SGD (lr 1)
        and + server Adam (lr 0.01), untuned, scored like φ: what the validation score
        means. None for a one-task run (Ji's comparisons are in `reproduce ji2019`)."""
        if not isinstance(self.validation_envs, TaskEnvs):
            return {}
        out = {}
        for name, optimizer in (("mean+sgd", opt.sgd(1.0)), ("mean+adam", opt.adam(0.01))):
            agg = build_aggregator("mean", optimizer=optimizer)
            score, means = validate(agg, self.validation_envs, self.seeds, self.horizons,
                                    self.floor)
            out[name] = {"score": score, **means}
        return out

    def aggregator(self, phi: torch.Tensor) -> RNNAggregator:
        """A frozen aggregator holding φ (its own copy)."""
        net = CoordinateRNN(self.rnn)
        net.load_state_dict({k: v.clone() for k, v in self.layout.unflatten(phi).items()})
        return RNNAggregator(self.rnn, net.requires_grad_(False))

    def save(self, out: Any, phi: torch.Tensor, trained_on: dict[str, Any],
             validation: dict[str, Any]) -> Any:
        return save_rnn(out, self.aggregator(phi), trained_on=trained_on, validation=validation)
