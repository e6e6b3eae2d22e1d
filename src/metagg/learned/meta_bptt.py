"""Meta-training the RNN / ARNN aggregator by truncated backpropagation through time.

    from metagg.learned import meta_train_rnn
    result = meta_train_rnn(iterations=300, out_dir="runs/rnn-digits")   # digits, MLP 20 sigmoid
    result.aggregator                 # the best φ on validation, frozen
    result.history                    # one row per meta-iteration / validation

Ji et al. 2019 §4.1-4.2 with L2L's recipe (Andrychowicz et al. 2016) where Ji is silent:

- each meta-iteration samples a fresh model initialisation (and minibatch stream)
  and unrolls T rounds (default 100), truncated every K rounds (default 20);
- at round t the workers' updates are computed at θ_t *detached* (Ji Fig. 2's
  dashed edges: no meta-gradient through the workers' gradient computation), the
  aggregator's step is differentiable in φ, and θ_{t+1} = θ_t − step stays in the
  graph within a truncation;
- meta-loss of a truncation = Σ_t mean over honest workers of the minibatch loss
  at θ_{t+1} (each worker's next-round minibatch, evaluated differentiably);
- Adam on φ (lr 1e-3) after every truncation, gradient-norm clipping at 1.0;
- every `validate_every` meta-iterations the frozen aggregator runs T rounds (and
  `long_horizon`·T) on held-out model seeds; the score is the mean over seeds and
  horizons of log(final train loss); the best φ is kept (early stopping with
  `patience`) and written with `metagg.learned.rnn.io`.

Resume: at every validation the run writes `meta_checkpoint.*` in `out_dir` (φ,
Adam's state, the best φ so far, history). Everything random in meta-iteration k
is seeded by (seed, k), so `meta_train(cfg, resume=True)` continues where a killed
run stopped and ends with the same φ as an uninterrupted run (tested).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import vmap

from metagg.aggregators.base import Aggregator, RoundContext
from metagg.attacks import make_attack
from metagg.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from metagg.cluster import Cluster
from metagg.data import Dataset, load_dataset, partition
from metagg.learned.rnn import CoordinateRNN, RNNAggregator, RNNConfig, RNNState, save_rnn
from metagg.models import build_model
from metagg.seeding import (
    MetaStream,
    RoundStream,
    derive_seed,
    round_generator,
    server_sample_generator,
)
from metagg.tasks import Task, TrustedData

__all__ = [
    "MetaEnv",
    "MetaTrainConfig",
    "MetaTrainResult",
    "evaluate_aggregator",
    "meta_train",
    "meta_train_rnn",
    "unroll_meta_loss",
]

log = logging.getLogger("metagg")



@dataclass
class MetaTrainConfig:
    """Everything a meta-training run depends on (saved as `trained_on`)."""

    dataset: str = "digits"  # built in, no download
    data_dir: str | None = None
    model: str = "mlp:20:sigmoid"  # Ji §5.2's MNIST model
    num_workers: int = 10  # M (Ji: 10)
    batch_size: int = 32  # per worker
    partition: str = "iid"  # Ji: equal shards of the training set
    unroll: int = 100  # T rounds per meta-iteration (L2L: 100)
    truncation: int = 20  # K: BPTT truncation and Adam step every K rounds (L2L: 20)
    iterations: int = 300  # meta-iterations (state budgets in these, not minutes)
    lr: float = 1e-3  # Adam on φ
    clip: float = 1.0  # gradient-norm clipping of the meta-gradient
    seed: int = 0  # φ init, data partition, model-init streams
    cell: str = "lstm"  # lstm | gru
    hidden: int = 20  # Ji: 2 layers of 20
    layers: int = 2
    output: str = "normalized"  # normalized (default, stronger) | paper (×A_i)
    arnn: bool = False  # feed trusted-sample loss features (Ji §4.3)
    p: float = 10.0  # clamp / log-norm floor e^{-p} (L2L: 10)
    scale: float = 0.1  # output scale (L2L: 0.1)
    clamp_sign: bool = True  # keep the sign of clamped entries (Ji writes +e^{-p})
    probe_lr: float = 1.0  # ARNN probe step θ − probe_lr·g_m
    trusted_samples: int = 100  # server's trusted sample (as RunConfig's default)
    # Byzantine training: an attack from metagg.attacks.ATTACKS, or a mixture
    # "ipm,sign_flip,none" (meta-iteration k meets the (k mod n)-th; validation scores
    # the mean over all); with a mixture attack_options maps name -> options
    attack: str = "none"
    num_byzantine: int = 0  # workers 0..b-1 are Byzantine
    attack_options: dict[str, Any] = field(default_factory=dict)
    validate_every: int = 20  # meta-iterations between validations
    validation_seeds: int = 3  # held-out model inits per validation
    long_horizon: int = 4  # also validate at long_horizon·T rounds (<= 1: off)
    patience: int = 10  # validations without improvement before stopping (0: never stop)
    out_dir: str | None = None  # where the best aggregator is written

    def __post_init__(self) -> None:
        errors = []
        for key in ("num_workers", "batch_size", "unroll", "truncation", "iterations",
                    "validate_every", "validation_seeds"):
            if getattr(self, key) < 1:
                errors.append(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "clip"):
            if not getattr(self, key) > 0:
                errors.append(f"{key} must be > 0, got {getattr(self, key)}")
        if not 0 <= self.num_byzantine < self.num_workers:
            errors.append(f"num_byzantine must be in [0, num_workers={self.num_workers}), "
                          f"got {self.num_byzantine}")
        if self.attack != "none" and self.num_byzantine == 0:
            errors.append(f"attack {self.attack!r} needs num_byzantine >= 1")
        names = self.attack_names()
        if len(names) > 1 and set(self.attack_options) - set(names):
            errors.append(f"with an attack mixture, attack_options maps attack name -> "
                          f"options; {sorted(set(self.attack_options) - set(names))} not in "
                          f"{names}")
        if self.arnn and self.trusted_samples < 1:
            errors.append("arnn needs trusted_samples >= 1")
        if errors:
            raise ValueError("; ".join(errors))
        self.rnn_config()  # cell, output, p, scale... checked by RNNConfig, early

    def attack_names(self) -> list[str]:
        return [a.strip() for a in self.attack.split(",") if a.strip()] or ["none"]

    def environments(self) -> list[MetaTrainConfig]:
        """One config per attack of the mixture (just `self` without a mixture)."""
        names = self.attack_names()
        if len(names) == 1:
            return [self]
        return [dataclasses.replace(self, attack=n, attack_options=self.attack_options.get(n, {}),
                                    num_byzantine=0 if n == "none" else self.num_byzantine)
                for n in names]

    def rnn_config(self) -> RNNConfig:
        return RNNConfig(num_workers=self.num_workers, cell=self.cell, hidden=self.hidden,
                         layers=self.layers, output=self.output, arnn=self.arnn, p=self.p,
                         scale=self.scale, clamp_sign=self.clamp_sign, probe_lr=self.probe_lr)


class MetaEnv:
    """The distributed task an aggregator is meta-trained and evaluated on.

    Holds the model, the fixed data partition, the attack and the trusted sample;
    `cluster(seed)` gives the workers with seed-dependent minibatch streams.
    """

    def __init__(self, cfg: MetaTrainConfig, data: Dataset | None = None):
        self.cfg = cfg
        self.data = data if data is not None else load_dataset(cfg.dataset, data_dir=cfg.data_dir)
        ds = self.data
        self.task = Task(build_model(cfg.model, ds.input_shape, ds.num_classes),
                         num_classes=ds.num_classes)
        m = cfg.num_workers
        self.shards = partition(ds.y_train, m, cfg.partition, seed=cfg.seed)
        self.attack = make_attack(cfg.attack, **cfg.attack_options)
        self.byzantine = torch.arange(cfg.num_byzantine)
        self.honest = torch.ones(m, dtype=torch.bool)
        self.honest[self.byzantine] = False
        self.flip = torch.zeros(m, dtype=torch.bool)
        if self.attack.flips_labels:
            self.flip[self.byzantine] = True
        self.trusted = None
        if cfg.trusted_samples > 0:
            gen = server_sample_generator(cfg.seed)
            idx = torch.randperm(len(ds.y_train), generator=gen)[: cfg.trusted_samples]
            self.trusted = TrustedData(self.task, ds.x_train[idx], ds.y_train[idx])
        self._batch_losses = vmap(self.task.loss, in_dims=(None, 0, 0))

    @property
    def dim(self) -> int:
        return self.task.dim

    def cluster(self, seed: int) -> Cluster:
        return Cluster(self.task, self.data.x_train, self.data.y_train, self.shards,
                       batch_size=self.cfg.batch_size, seed=seed, flip_labels=self.flip)

    def worker_round(
        self, cluster: Cluster, theta: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(updates [n, d], worker_ids [n]) the server receives in round t: computed at
        θ detached (no meta-gradient through the workers), Byzantine rows forged."""
        with torch.no_grad():
            updates = cluster.compute(theta.detach(), t).updates
            ids = torch.arange(cluster.num_workers)
            if len(self.byzantine) and self.attack.drops_workers:
                return updates[self.honest], ids[self.honest]
            if len(self.byzantine) and not self.attack.flips_labels:
                ctx = self.context(theta.detach(), ids, t)
                forged = self.attack.forge(updates, self.byzantine, ctx,
                                           round_generator(cluster.seed, t, RoundStream.ATTACK))
                updates = updates.index_put((self.byzantine,), forged.to(updates.dtype))
        return updates, ids

    def context(self, theta: torch.Tensor, worker_ids: torch.Tensor, t: int) -> RoundContext:
        return RoundContext(round=t, params=theta, layout=self.task.layout,
                            num_workers=self.cfg.num_workers, worker_ids=worker_ids,
                            trusted=self.trusted)

    def batch_loss(self, cluster: Cluster, theta: torch.Tensor, t: int) -> torch.Tensor:
        """Mean honest-worker loss at θ on round t's minibatches; differentiable in θ."""
        xb, yb = cluster.batches(t)
        return self._batch_losses(theta, xb[self.honest, 0], yb[self.honest, 0]).mean()

    def train_loss(self, theta: torch.Tensor) -> float:
        return self.task.evaluate(theta, self.data.x_train, self.data.y_train)["loss"]

    def test_accuracy(self, theta: torch.Tensor) -> float:
        return self.task.evaluate(theta, self.data.x_test, self.data.y_test)["accuracy"]


def unroll_meta_loss(
    agg: Aggregator,
    env: MetaEnv,
    cluster: Cluster,
    theta: torch.Tensor,
    state: Any,
    rounds: range,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One truncation: Σ_{t in rounds} L(θ_{t+1}) with θ_{t+1} = θ_t − A_φ(g(θ_t.detach())).

    Returns (meta-loss, θ at the end, aggregator state), all still in the graph.
    """
    meta_loss = theta.new_zeros(())
    for t in rounds:
        updates, ids = env.worker_round(cluster, theta, t)
        step, state = agg.step(state, updates, env.context(theta, ids, t))
        theta = theta - step
        meta_loss = meta_loss + env.batch_loss(cluster, theta, t + 1)
    return meta_loss, theta, state


@torch.no_grad()
def evaluate_aggregator(
    agg: Aggregator, env: MetaEnv, seeds: list[int], horizons: tuple[int, ...]
) -> dict[str, Any]:
    """Run `agg` (any aggregator, frozen) from each model seed for max(horizons) rounds.

    Returns per-seed lists and means: `loss@T` (train loss on the full train split),
    `acc@T` (test accuracy) for T in horizons. A non-finite step ends the run
    (diverged): its later losses are inf.
    """
    out: dict[str, Any] = {f"{k}@{h}": [] for h in horizons for k in ("loss", "acc")}
    for seed in seeds:
        theta = env.task.init_params(seed)
        cluster = env.cluster(seed)
        state = agg.init(env.task.layout, env.cfg.num_workers)
        diverged = False
        for t in range(max(horizons)):
            if not diverged:
                updates, ids = env.worker_round(cluster, theta, t)
                step, state = agg.step(state, updates, env.context(theta, ids, t))
                diverged = not bool(torch.isfinite(step).all())
                theta = theta - step
            if t + 1 in horizons:
                finite = not diverged and bool(torch.isfinite(theta).all())
                out[f"loss@{t + 1}"].append(env.train_loss(theta) if finite else math.inf)
                out[f"acc@{t + 1}"].append(env.test_accuracy(theta) if finite else 0.0)
    for key in list(out):
        out[f"mean_{key}"] = float(np.mean(out[key]))
    return out


def evaluate_mixture(agg: Aggregator, envs: list[MetaEnv], seeds: list[int],
                     horizons: tuple[int, ...]) -> tuple[float, dict[str, Any]]:
    """(score, means) over every environment of an attack mixture; the score is the mean
    of each environment's score, and means are keyed `ATTACK/mean_loss@T` when mixed."""
    scores, means = [], {}
    for env in envs:
        res = evaluate_aggregator(agg, env, seeds, horizons)
        scores.append(_score(res, horizons))
        prefix = f"{env.cfg.attack}/" if len(envs) > 1 else ""
        means.update({prefix + k: v for k, v in res.items() if k.startswith("mean_")})
    return float(np.mean(scores)), means


def _score(result: dict[str, Any], horizons: tuple[int, ...]) -> float:
    """Mean over seeds and horizons of log(final train loss): lower is better."""
    logs = [math.log(max(v, 1e-30)) for h in horizons for v in result[f"loss@{h}"]]
    return float(np.mean(logs)) if all(math.isfinite(v) for v in logs) else math.inf


@dataclass
class MetaTrainResult:
    aggregator: RNNAggregator  # the best φ on validation (frozen)
    best_score: float  # mean log train loss over validation seeds and horizons
    best_iteration: int  # meta-iterations done when it was found (0 = the initial φ)
    history: list[dict[str, Any]]
    path: Path | None  # where it was written (out_dir), if any


def meta_train(
    cfg: MetaTrainConfig,
    *,
    data: Dataset | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    resume: bool = False,
) -> MetaTrainResult:
    """Meta-train an RNN / ARNN aggregator by truncated BPTT (see the module docstring).

    `threads` sets torch's intra-op threads for the run (restored afterwards). For
    small models (d ~ 10³-10⁴) use 1: it is as fast, and on a busy shared machine two
    OpenMP threads can be 10-50× slower (every op waits for a descheduled thread).
    `resume` continues from `cfg.out_dir`'s meta_checkpoint (same config; `iterations`
    may be raised).
    """
    if resume and not cfg.out_dir:
        raise ValueError("resume needs out_dir (the directory holding meta_checkpoint.*)")
    if threads is None:
        return _meta_train(cfg, data, progress, resume)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _meta_train(cfg, data, progress, resume)
    finally:
        torch.set_num_threads(before)


CHECKPOINT = "meta_checkpoint"


def _save_progress(out: Path, cfg: MetaTrainConfig, iteration: int, net: CoordinateRNN,
                   opt: torch.optim.Optimizer, best: dict[str, Any], stale: int,
                   history: list[dict[str, Any]]) -> None:
    """Everything needed to continue after `iteration` meta-iterations, atomically."""
    tensors = {f"phi.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in (best["phi"] or {}).items()})
    opt_state = opt.state_dict()
    for idx, slots in opt_state["state"].items():
        tensors.update({f"adam.{idx}.{k}": torch.as_tensor(v) for k, v in slots.items()})
    meta = {"iteration": iteration, "stale": stale, "history": history,
            "best": {k: best[k] for k in ("score", "iteration", "validation")},
            "param_groups": opt_state["param_groups"], "config": dataclasses.asdict(cfg)}
    save_checkpoint(out / CHECKPOINT, tensors, json.loads(json.dumps(meta, default=float)))


def _load_progress(out: Path, cfg: MetaTrainConfig, net: CoordinateRNN,
                   opt: torch.optim.Optimizer) -> tuple[int, dict[str, Any], int, list]:
    path = out / CHECKPOINT
    if not path.with_suffix(".json").exists():
        raise CheckpointError(f"nothing to resume in {out}: no {CHECKPOINT}.json")
    tensors, meta = load_checkpoint(path)
    saved, mine = dict(meta.get("config", {})), json.loads(json.dumps(dataclasses.asdict(cfg)))
    for c in (saved, mine):  # a resumed run may be longer or written elsewhere
        c.pop("iterations", None)
        c.pop("out_dir", None)
    if saved != mine:
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        raise CheckpointError(f"{path} is from a different meta-training config "
                              f"(differs in: {', '.join(diff)})")
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("phi.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, idx, slot = key.split(".", 2)
                state.setdefault(int(idx), {})[slot] = value
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: does not match this aggregator ({exc})") from None
    best_phi = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    best = {**meta["best"], "phi": best_phi or None}
    return int(meta["iteration"]), best, int(meta["stale"]), list(meta["history"])


def _meta_train(cfg: MetaTrainConfig, data: Dataset | None,
                progress: bool | None, resume: bool = False) -> MetaTrainResult:
    envs = [MetaEnv(c, data) for c in cfg.environments()]
    env = envs[0]
    rnn_cfg = cfg.rnn_config()
    net = CoordinateRNN(rnn_cfg, seed=cfg.seed)
    agg = RNNAggregator(rnn_cfg, net, differentiable=True)
    frozen = RNNAggregator(rnn_cfg, net)  # same φ, server path, for validation
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    horizons = (cfg.unroll, cfg.long_horizon * cfg.unroll) if cfg.long_horizon > 1 else (
        cfg.unroll,)
    val_seeds = [derive_seed(cfg.seed, MetaStream.VALID_INIT, j)
                 for j in range(cfg.validation_seeds)]
    out = Path(cfg.out_dir) if cfg.out_dir else None
    history: list[dict[str, Any]] = []
    best = {"score": math.inf, "iteration": 0, "phi": None, "validation": {}}
    stale, done = 0, 0
    if resume:
        assert out is not None
        done, best, stale, history = _load_progress(out, cfg, net, opt)
    start = time.perf_counter()

    def validate(iteration: int) -> bool:
        """Validate the current φ; keep it if best; return False to stop early."""
        nonlocal stale
        score, means = evaluate_mixture(frozen, envs, val_seeds, horizons)
        row = {"iteration": iteration, "validation_score": score, **means,
               "wall_s": round(time.perf_counter() - start, 2)}
        history.append(row)
        if score < best["score"]:
            best.update(score=score, iteration=iteration, validation=row,
                        phi={k: v.detach().clone() for k, v in net.state_dict().items()})
            stale = 0
            if out is not None:
                _write(out, frozen, cfg, env, best, history)
        else:
            stale += 1
        log.info("meta-iteration %d: validation score %.4f (best %.4f at %d)", iteration,
                 score, best["score"], best["iteration"])
        if out is not None:
            _save_progress(out, cfg, iteration, net, opt, best, stale, history)
        return not (cfg.patience and stale >= cfg.patience)

    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iterations, initial=done,
                   desc=f"meta-train {rnn_cfg.kind}-{cfg.cell}", unit="it", leave=False)
    try:
        if not resume:
            validate(0)
        elif cfg.patience and stale >= cfg.patience:
            log.warning("the run in %s had stopped early (patience %d): nothing to resume",
                        out, cfg.patience)
            done = cfg.iterations
        for k in range(done, cfg.iterations):
            env = envs[k % len(envs)]
            model_seed = derive_seed(cfg.seed, MetaStream.TRAIN_INIT, k)
            theta = env.task.init_params(model_seed)
            cluster = env.cluster(model_seed)
            state: RNNState = agg.init(env.task.layout, cfg.num_workers)
            total, rounds, skipped, grad_norm = 0.0, 0, False, math.nan
            for s in range(0, cfg.unroll, cfg.truncation):
                span = range(s, min(s + cfg.truncation, cfg.unroll))
                loss, theta, state = unroll_meta_loss(agg, env, cluster, theta, state, span)
                if not torch.isfinite(loss):
                    skipped = True  # diverged: drop this unroll, no update from it
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)
                if not torch.isfinite(grad_norm):
                    skipped = True  # a non-finite meta-gradient would poison φ and Adam
                    break
                opt.step()
                theta, state = theta.detach(), state.detach()
                total, rounds = total + float(loss.detach()), rounds + len(span)
            # meta_loss: mean per-round worker loss over the unroll (Σ_t L / T)
            row = {"iteration": k + 1, "meta_loss": total / max(rounds, 1),
                   "grad_norm": float(grad_norm) if rounds else math.nan, "skipped": skipped}
            history.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(meta_loss=f"{row['meta_loss']:.4f}",
                                best=f"{best['score']:.3f}")
            last = k + 1 == cfg.iterations
            if ((k + 1) % cfg.validate_every == 0 or last) and not validate(k + 1):
                log.info("early stop after %d meta-iterations", k + 1)
                break
    finally:
        if bar is not None:
            bar.close()
    if best["phi"] is None:  # every validation diverged: keep the last φ, say so
        log.warning("meta-training: no validation finished with a finite loss; "
                    "returning the last φ")
        best["phi"] = net.state_dict()
    net.load_state_dict(best["phi"])
    result_agg = RNNAggregator(rnn_cfg, _frozen_copy(net))
    path = _write(out, result_agg, cfg, env, best, history) if out is not None else None
    return MetaTrainResult(result_agg, best["score"], best["iteration"], history, path)


def _frozen_copy(net: CoordinateRNN) -> CoordinateRNN:
    copy = CoordinateRNN(net.config)
    copy.load_state_dict(net.state_dict())
    return copy.requires_grad_(False)


def _write(out: Path, agg: RNNAggregator, cfg: MetaTrainConfig, env: MetaEnv,
           best: dict[str, Any], history: list[dict[str, Any]]) -> Path:
    """The aggregator (store format) and the history as JSON lines, atomically."""
    trained_on = {**dataclasses.asdict(cfg), "dim": env.dim, "dataset_name": env.data.name,
                  "meta_gradient": "truncated_bptt"}
    validation = {"best_iteration": best["iteration"], "score": best["score"],
                  "score_definition": "mean over seeds and horizons of log(train loss)",
                  **best["validation"]}
    stem = save_rnn(out, agg, trained_on=trained_on, validation=validation)
    atomic_write_text(out / "meta_train.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    return stem


def meta_train_rnn(
    *,
    data: Dataset | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    resume: bool = False,
    **options: Any,
) -> MetaTrainResult:
    """Meta-train an RNN / ARNN aggregator; keyword options are `MetaTrainConfig` fields.

    Example (Ji §5.2 on the built-in digits; ARNN under 7 of 10 IPM attackers)::

        meta_train_rnn(iterations=300, out_dir="runs/rnn-digits")
        meta_train_rnn(arnn=True, attack="ipm", num_byzantine=7, out_dir="runs/arnn-ipm7")

    Args:
        data: a `Dataset` to use instead of loading `dataset` by name.
        progress: tqdm bar (default: when stderr is a terminal).
        threads: torch threads during the run (see `meta_train`; 1 for small models).
        resume: continue an interrupted run in `out_dir` (see `meta_train`).
        **options: dataset, model, num_workers, batch_size, unroll, truncation,
            iterations, lr, seed, out_dir, cell, output, arnn, attack, num_byzantine, ...

    Raises:
        ValueError: an unknown option (listing the allowed ones) or a bad value.
    """
    allowed = [f.name for f in dataclasses.fields(MetaTrainConfig)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown meta-training option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed)}")
    return meta_train(MetaTrainConfig(**options), data=data, progress=progress, threads=threads,
                      resume=resume)
