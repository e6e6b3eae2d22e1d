"""The single-machine simulator: one parameter server, M vectorised workers.

    from metagg.config import load_config
    from metagg.simulation import Simulation

    sim = Simulation(load_config("configs/digits.yaml"))
    summary = sim.run(out_dir="runs/digits")       # metrics.jsonl, summary.json, curves.png

Bring your own data or model through the same object:
`Simulation(cfg, dataset=my_dataset, model=my_module)`.

A round: workers compute honest updates (vmapped) → Byzantine rows replaced by
the attack → non-finite rows dropped and counted → the aggregator's step →
θ ← θ − step. Everything random in round t is seeded by (seed, t), and the
checkpoint holds θ, the aggregator state and the counters, so a killed run
resumed with `resume=True` reproduces the uninterrupted metrics exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metagg.aggregators.base import RoundContext
from metagg.aggregators.optimizers import build_optimizer
from metagg.aggregators.registry import build_aggregator
from metagg.attacks import Attack, make_attack
from metagg.checkpoint import (
    CheckpointError,
    atomic_write_text,
    json_text,
    load_checkpoint,
    save_checkpoint,
)
from metagg.cluster import Cluster
from metagg.compiling import compile_enabled
from metagg.config import ConfigError, RunConfig, config_from_dict, config_to_dict, save_config
from metagg.data import Dataset, load_dataset, partition
from metagg.models import build_model, parse_model_spec
from metagg.seeding import byzantine_generator, server_sample_generator
from metagg.server import Server
from metagg.tasks import Task, TrustedData
from metagg.threads import tick as threads_tick

__all__ = ["Simulation", "WeightsChangedError", "Workers", "build_workers", "byzantine_ids",
           "load_run_dataset"]

log = logging.getLogger("metagg")

ACCURACY_MILESTONES = (0.8, 0.9, 0.95)
EVAL_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
# `Server` attributes readable as the simulation's own (`sim.params`, `sim.round`, ...)
SERVER_STATE = frozenset({"params", "round", "agg_state", "attack", "byzantine", "honest",
                          "dropped_updates", "skipped_rounds", "missing_updates",
                          "last_worker_loss", "worker_momentum", "momentum_started"})


def byzantine_ids(num_workers: int, num_byzantine: int, selection: str, seed: int) -> torch.Tensor:
    """Which workers are Byzantine: the first b (default) or a seeded random subset."""
    if selection == "first":
        return torch.arange(num_byzantine)
    chosen = torch.randperm(num_workers, generator=byzantine_generator(seed))[:num_byzantine]
    return chosen.sort().values


def load_run_dataset(cfg: RunConfig) -> Dataset:
    """The dataset a config's `data` section names, loaded once for many runs."""
    d = cfg.data
    return load_dataset(d.name, data_dir=d.data_dir, path=d.path, classes=d.classes,
                        image_size=d.image_size, seq_len=d.seq_len, num_classes=d.num_classes)


class WeightsChangedError(CheckpointError):
    """A checkpoint of a learned aggregator's run whose weights file has changed since."""


def _weights_sha256(aggregator: str) -> str | None:
    if ":" not in aggregator:  # not KIND:PATH: no weights file (and no import below)
        return None
    # imported here: metagg.learned's meta-training imports this module (and an import
    # in the middle of a torch.distributed run stalled its server for seconds)
    from metagg.learned.store import weights_sha256

    return weights_sha256(aggregator)


@dataclass
class Workers:
    """The workers' side of a run: what a worker process needs, and the simulator too."""

    dataset: Dataset
    task: Task
    attack: Attack
    byzantine: torch.Tensor  # int64 [b], sorted
    cluster: Cluster


def build_workers(cfg: RunConfig, *, dataset: Dataset | None = None,
                  model: nn.Module | None = None) -> Workers:
    """Data, model, attack, which workers are Byzantine, and the workers' `Cluster`."""
    d, w, a = cfg.data, cfg.workers, cfg.attack
    ds = dataset or load_run_dataset(cfg)
    if model is None:
        language_model = parse_model_spec(cfg.model)[0] == "transformer"
        if ds.tokens != language_model:
            raise ConfigError(
                f"model {cfg.model!r} does not fit data {ds.name!r}: token data (name: text) "
                "needs a language model (e.g. model: transformer:2:32:4), and a transformer "
                "needs token data")
        model = build_model(cfg.model, ds.input_shape, ds.num_classes)
    task = Task(model, num_classes=ds.num_classes)
    shards = partition(ds.y_train, w.num_workers, d.partition, seed=cfg.seed, alpha=d.alpha,
                       shards_per_worker=d.shards_per_worker)
    attack = make_attack(a.name, **a.options)
    byzantine = byzantine_ids(w.num_workers, a.num_byzantine, a.selection, cfg.seed)
    flip = torch.zeros(w.num_workers, dtype=torch.bool)
    if attack.flips_labels:
        flip[byzantine] = True
    cluster = Cluster(task, ds.x_train, ds.y_train, shards, batch_size=w.batch_size,
                      mode=w.mode, local_steps=w.local_steps, local_lr=w.local_lr,
                      seed=cfg.seed, flip_labels=flip,
                      compile=compile_enabled(cfg.rounds * w.local_steps))
    return Workers(ds, task, attack, byzantine, cluster)


class Simulation:
    """One simulated training run described by a RunConfig.

    The workers are a `Cluster`; the server half of each round is `self.server`
    (`metagg.server.Server`), whose state (θ, aggregator state, round, counters) is
    also readable here (`sim.params`, `sim.round`, ...).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        dataset: Dataset | None = None,
        model: nn.Module | None = None,
    ):
        self.cfg = cfg
        workers = build_workers(cfg, dataset=dataset, model=model)
        self.dataset, self.task, self.cluster = workers.dataset, workers.task, workers.cluster
        ds, w, a = self.dataset, cfg.workers, cfg.attack
        f = cfg.aggregator.f if cfg.aggregator.f is not None else a.num_byzantine
        self.aggregator = build_aggregator(
            cfg.aggregator.name, f=f, options=cfg.aggregator.options, seed=cfg.seed,
            optimizer=build_optimizer(**dataclasses.asdict(cfg.optimizer)))
        # the weights it was built from, when it is a saved learned aggregator: a resume
        # must not continue a run of other weights saved under the same name since
        self.aggregator_weights = _weights_sha256(cfg.aggregator.name)
        self._check_enough_workers(f)
        gen = server_sample_generator(cfg.seed)
        self.trusted = None
        if cfg.trusted_samples > 0:
            idx = torch.randperm(len(ds.y_train), generator=gen)[: cfg.trusted_samples]
            self.trusted = TrustedData(self.task, ds.x_train[idx], ds.y_train[idx])
        n_eval = len(ds.y_train)
        if cfg.eval_train_samples is not None and cfg.eval_train_samples < n_eval:
            idx = torch.randperm(n_eval, generator=gen)[: cfg.eval_train_samples]
            self.eval_x, self.eval_y = ds.x_train[idx], ds.y_train[idx]
        else:
            self.eval_x, self.eval_y = ds.x_train, ds.y_train
        self.server = Server(
            self.aggregator, attack=workers.attack, byzantine=workers.byzantine,
            num_workers=w.num_workers, layout=self.task.layout, seed=cfg.seed,
            trusted=self.trusted, mode=w.mode, local_lr=w.local_lr, local_steps=w.local_steps,
            momentum=w.momentum)
        self.reset()

    def _check_enough_workers(self, f: int) -> None:
        agg, m = self.aggregator, self.cfg.workers.num_workers
        if m >= agg.min_updates:
            return
        msg = f"{agg.name} with f={f} needs at least {agg.min_updates} workers"
        if agg.requirement:
            msg += f" ({agg.requirement}), got {m}"
            if agg.can_run_unsafe and not self.cfg.aggregator.options.get("allow_unsafe"):
                msg += "; set aggregator.options.allow_unsafe=true to run it outside its guarantee"
        else:
            msg += f", got {m}"
        raise ValueError(msg)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Fresh θ (seeded init), aggregator state and counters."""
        self.server.reset(self.task.init_params(self.cfg.seed))
        self.wall_offset = 0.0

    def __getattr__(self, name: str) -> Any:
        # the server's state (θ, round, counters...), read through the simulation
        if name in SERVER_STATE and "server" in self.__dict__:
            return getattr(self.server, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def context(self, worker_ids: torch.Tensor) -> RoundContext:
        return self.server.context(worker_ids)

    # ------------------------------------------------------------------ one round
    def step(self) -> None:
        """Run one communication round and advance θ."""
        threads_tick()  # `--threads auto`: follow the cores other processes leave free
        out = self.cluster.compute(self.params, self.round, lr=self.server.round_local_lr())
        present = self.cluster.present(self.round, self.cfg.workers.failure_prob)
        self.server.step(out.updates, present, out.losses)

    def evaluate(self) -> dict[str, float]:
        train = self.task.evaluate(self.params, self.eval_x, self.eval_y)
        test = self.task.evaluate(self.params, self.dataset.x_test, self.dataset.y_test)
        return {
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
        }

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_meta(self, wall_s: float) -> dict[str, Any]:
        return {
            **self.server.counters(),
            "wall_s": wall_s,
            "config": config_to_dict(self.cfg),
            "layout": self.task.layout.to_json(),
            "aggregator": self.aggregator.name,
            "aggregator_weights": self.aggregator_weights,
        }

    def save(self, path: str | Path, wall_s: float = 0.0) -> None:
        save_checkpoint(path, self.server.tensors(), self._checkpoint_meta(wall_s))

    def load(self, path: str | Path) -> None:
        """Restore θ, aggregator state and counters from a checkpoint of this run."""
        tensors, meta = load_checkpoint(path)
        try:  # through the parser: keys added since the checkpoint take their defaults
            saved = json.loads(json.dumps(config_to_dict(config_from_dict(meta["config"]))))
        except (KeyError, TypeError, ConfigError) as exc:
            raise CheckpointError(f"checkpoint {path}: its config does not parse ({exc})") \
                from None
        mine = json.loads(json.dumps(config_to_dict(self.cfg)))  # as it was saved
        saved.pop("rounds", None)
        mine.pop("rounds", None)  # a resumed run may be extended
        if saved != mine:
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            raise CheckpointError(f"checkpoint {path} is from a different config (differs in: "
                                  f"{', '.join(diff)})")
        saved_weights = meta.get("aggregator_weights")  # absent in older checkpoints
        weights = self.aggregator_weights
        if saved_weights and weights and saved_weights != weights:
            raise WeightsChangedError(
                f"checkpoint {path} was written with other weights for aggregator "
                f"{self.cfg.aggregator.name!r} (sha256 {saved_weights[:12]}…, now "
                f"{weights[:12]}…): start the run afresh or give it another out dir")
        if int(meta["round"]) > self.cfg.rounds:
            raise CheckpointError(f"checkpoint {path} is at round {meta['round']}, beyond "
                                  f"rounds={self.cfg.rounds}: a resumed run can be extended, "
                                  "not shortened")
        self.server.restore(tensors, meta, str(path))
        self.wall_offset = float(meta["wall_s"])

    # ------------------------------------------------------------------ a whole run
    def run(
        self,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        progress: bool | None = None,
        stop_after: int | None = None,
    ) -> dict[str, Any]:
        """Train for `cfg.rounds` rounds; with `out_dir`, write metrics, checkpoints and plots.

        `stop_after` stops early after that many rounds in this call (used to test
        kill-and-resume); the summary then describes the partial run.
        """
        cfg = self.cfg
        out = Path(out_dir) if out_dir is not None else None
        rows: list[dict[str, Any]] = []
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            ckpt = out / "checkpoint"
            if resume:
                if not ckpt.with_suffix(".json").exists():
                    raise CheckpointError(f"nothing to resume in {out}: no checkpoint.json")
                self.load(ckpt)
                rows = [r for r in read_metrics(out / "metrics.jsonl") if r["round"] <= self.round]
            save_config(cfg, out / "config.yaml")
            atomic_write_text(out / "metrics.jsonl", "".join(json_text(r) + "\n" for r in rows))
        metrics_fh = open(out / "metrics.jsonl", "a") if out is not None else None
        start = time.perf_counter()

        def wall() -> float:
            return self.wall_offset + time.perf_counter() - start

        def record() -> None:
            worker_loss = self.last_worker_loss if math.isfinite(self.last_worker_loss) else None
            row = {"round": self.round, **self.evaluate(), "worker_loss": worker_loss,
                   "dropped_updates": self.dropped_updates,
                   "skipped_rounds": self.skipped_rounds,
                   "missing_updates": self.missing_updates, "wall_s": round(wall(), 4)}
            if cfg.workers.mode == "local_sgd":  # the next round's (an aggregator may set it)
                row["local_lr"] = self.server.round_local_lr()
            rows.append(row)
            if metrics_fh is not None:
                metrics_fh.write(json_text(row) + "\n")
                metrics_fh.flush()

        if progress is None:
            progress = sys.stderr.isatty()
        bar = _progress_bar(cfg.rounds, self.round, progress, cfg.aggregator.name)
        try:
            if not rows:
                record()
            ran = 0
            while self.round < cfg.rounds and (stop_after is None or ran < stop_after):
                self.step()
                ran += 1
                if bar is not None:
                    bar.update(1)
                if self.round % cfg.eval_every == 0 or self.round == cfg.rounds:
                    record()
                    if bar is not None:
                        bar.set_postfix(loss=f"{rows[-1]['train_loss']:.4f}",
                                        acc=f"{rows[-1]['test_accuracy']:.3f}")
                every = cfg.checkpoint_every
                if out is not None and every and self.round % every == 0:
                    self.save(out / "checkpoint", wall())
        finally:
            if bar is not None:
                bar.close()
            if metrics_fh is not None:
                metrics_fh.close()
        summary = summarize(rows, cfg, self.aggregator.name)
        if out is not None:
            self.save(out / "checkpoint", wall())
            atomic_write_text(out / "summary.json", json_text(summary, indent=2))
            from metagg.plots import plot_curves

            plot_curves(rows, out / "curves.png", title=f"{cfg.aggregator.name} on {cfg.data.name}")
        return summary


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="round", leave=False)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        # a NaN metric (diverged) is written as null: read it back as NaN
        rows.append({k: math.nan if v is None and k in EVAL_KEYS else v for k, v in row.items()})
    return rows


def summarize(rows: list[dict[str, Any]], cfg: RunConfig, aggregator: str) -> dict[str, Any]:
    last = rows[-1]
    reached = {}
    for level in ACCURACY_MILESTONES:
        hit = next((r["round"] for r in rows if r["test_accuracy"] >= level), None)
        reached[f"rounds_to_test_accuracy_{level:g}"] = hit
    return {
        "aggregator": aggregator,
        "seed": cfg.seed,
        "rounds": last["round"],
        "final_test_accuracy": last["test_accuracy"],
        "final_test_loss": last["test_loss"],
        "final_train_loss": last["train_loss"],
        "final_train_accuracy": last["train_accuracy"],
        "best_test_accuracy": max(r["test_accuracy"] for r in rows),
        "diverged": not math.isfinite(last["train_loss"]),
        "dropped_updates": last["dropped_updates"],
        "skipped_rounds": last["skipped_rounds"],
        "missing_updates": last.get("missing_updates", 0),
        "wall_s": last["wall_s"],
        **reached,
    }
