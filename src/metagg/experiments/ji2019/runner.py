"""`metagg reproduce ji2019`: figures 4-7 of Ji et al. (2019) with the data this machine has.

    metagg reproduce ji2019 --scale quick --out runs/ji2019        # minutes, 2 cores
    metagg reproduce ji2019 --scale full --out runs/ji2019-full    # 5 seeds, long runs
    reproduce_ji2019("runs/ji2019", scale="quick")                  # the same from Python

Writes to OUT: `figureN.png` + `figureN.csv` for N = 4, 5, 6, 7, `tuning.csv` (the
learning-rate grids of the averaging baselines) and `report.md` (tables, the
paper's claims beside our numbers, the stand-in datasets). Progress goes to stderr.

- Figure 4 (§5.2): learning curves of the shipped RNN-LSTM and ARNN-LSTM against
  averaging with a tuned server SGD and a tuned server Adam.
- Figure 5 (§5.3): the shipped digits RNN applied unchanged to other worker models
  (left) and to class subsets of another dataset (right), against tuned averaging.
- Figure 6 (§5.4): mean, median, Krum, Zeno, FLTrust, the RNN and the shipped ARNNs
  under IPM, ALIE, sign-flip and Gaussian attackers at 3/10 and 7/10 (the paper
  does not name its attack), as in the README's ARNN table (`metagg compare`).
- Figure 7 (§5.5): 4 worker models x 3 workers feeding one RNN that updates an
  MLP20-sigmoid (`metagg.cluster.HeteroCluster` documents how gradients are mapped).

The learned aggregators are the pretrained ones in `metagg/zoo`; nothing is
meta-trained unless `meta_train=True` (`--meta-train`), which also trains what the
zoo lacks (GRU variants, an RNN trained on Fashion-MNIST, the 12-input RNN of
figure 7) into OUT/aggregators/ and reuses them on the next run. Runs are seeded:
evaluation seeds 100, 101, ..., tuning seeds 200, 201, ..., checked to be disjoint
from every seed the learned aggregators were meta-trained or validated with.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from metagg.config import config_from_dict
from metagg.data import Dataset, load_dataset
from metagg.experiments.ji2019 import report
from metagg.experiments.ji2019.report import fmt, mean_or_inf
from metagg.experiments.ji2019.settings import (
    ARNN,
    BYZ_AGGREGATORS,
    BYZ_ATTACKS,
    EVAL_SEED0,
    FIG4_TASKS,
    FIG5_LEFT,
    FIG5_RIGHT,
    FIGURES,
    HETERO_RNN,
    RNN,
    SCALES,
    TUNE_SEED0,
    Scale,
    TaskSpec,
)
from metagg.learned.store import resolve_path
from metagg.seeding import derive_seed

__all__ = ["Ji2019", "check_seeds_disjoint", "reproduce_ji2019"]


def check_seeds_disjoint(seeds: Sequence[int], names: Sequence[str]) -> None:
    """Raise if an evaluation / tuning seed was a meta-training or validation seed.

    A learned aggregator's `trained_on` records its meta seed, iterations and
    validation seeds; meta-training drew model / minibatch seeds
    derive_seed(seed, stream, k) for its `seed_streams` (BPTT: 0 and 1), and
    used `seed` itself for the partition and trusted sample.
    """
    for name in names:
        kind, _, path = name.partition(":")
        if kind not in ("rnn", "arnn"):
            continue
        info = json.loads(resolve_path(path).with_suffix(".json").read_text())["trained_on"]
        if "seed" not in info:  # nothing recorded to check against
            continue
        count = max(info.get("iterations", 0), info.get("validation_seeds", 0))
        used = {derive_seed(info["seed"], stream, k) for stream in info.get("seed_streams", (0, 1))
                for k in range(count)}
        used.add(info["seed"])
        clash = sorted(set(seeds) & used)
        if clash:
            raise ValueError(f"evaluation seeds {clash} were used to meta-train {name}")


def _meta_iterations_done(path: Path) -> int | None:
    """Meta-iterations a (possibly interrupted) meta-training in `path` has done; None
    when it left no checkpoint (nothing there, or written before checkpoints)."""
    ckpt = path / "meta_state.json"
    try:
        return int(json.loads(ckpt.read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _exists(name: str) -> bool:
    """Whether a learned aggregator 'rnn:PATH' can be loaded (its JSON is there)."""
    _, _, path = name.partition(":")
    try:
        return resolve_path(path).with_suffix(".json").exists()
    except Exception:  # e.g. an unknown pretrained/ name
        return False


class Ji2019:
    """One reproduction run: holds the scale, the data, the records and the notes."""

    def __init__(self, out: Path, scale: Scale, *, meta_train: bool = False,
                 hetero_rnn: str | None = None, data_dir: str | None = None):
        self.out, self.scale = out, scale
        self.meta_train, self.hetero_rnn, self.data_dir = meta_train, hetero_rnn, data_dir
        self.eval_seeds = [EVAL_SEED0 + i for i in range(scale.seeds)]
        self.tune_seeds = [TUNE_SEED0 + i for i in range(scale.tune_seeds)]
        self.records: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.tuning: list[dict[str, Any]] = []
        self.notes: dict[str, list[str]] = defaultdict(list)
        self.used: set[str] = set()
        self.times: dict[str, float] = {}
        self._data: dict[tuple[str, tuple[int, ...] | None], Dataset] = {}
        self.start = time.perf_counter()

    # ------------------------------------------------------------------ plumbing
    def log(self, msg: str) -> None:
        print(f"[ji2019 {time.perf_counter() - self.start:6.0f} s] {msg}", file=sys.stderr,
              flush=True)

    def dataset(self, spec: TaskSpec) -> Dataset:
        key = (spec.dataset, spec.classes)
        if key not in self._data:
            self._data[key] = load_dataset(spec.dataset, data_dir=self.data_dir,
                                           classes=list(spec.classes) if spec.classes else None)
        return self._data[key]

    def note(self, figure: str, msg: str) -> None:
        """A line for the figure's section of report.md (once), echoed to stderr."""
        if msg not in self.notes[figure]:
            self.notes[figure].append(msg)
            self.log(f"note: {msg}")

    def eval_every(self, rounds: int) -> int:
        return max(1, rounds // self.scale.points)

    def learned(self, name: str) -> str:
        """`name` after checking its seeds against ours; remembered for the report."""
        check_seeds_disjoint(self.eval_seeds + self.tune_seeds, [name])
        self.used.add(name)
        return name

    def simulate(self, spec: TaskSpec, aggregator: str, *, optimizer: str = "sgd",
                 lr: float = 1.0, seed: int, rounds: int,
                 attack: tuple[str, int, dict[str, float]] = ("none", 0, {}),
                 curve: bool = True) -> list[dict[str, float]]:
        """One `Simulation`; rows {round, train_loss, test_accuracy} at round 0 and every
        eval_every rounds (`curve=False`: only the final row)."""
        from metagg.simulation import Simulation

        name, b, options = attack
        agg: dict[str, Any] = {"name": aggregator}
        if aggregator == "krum":  # f = b; outside Krum's guarantee n > 2f + 2 at 7/10
            agg.update(f=b, options={"allow_unsafe": True} if 2 * b + 3 > 10 else {})
        cfg = {"seed": seed, "rounds": rounds, "eval_every": self.eval_every(rounds),
               "model": spec.model,
               "data": {"name": spec.dataset, "partition": "iid",
                        "classes": list(spec.classes) if spec.classes else None},
               "workers": {"num_workers": 10, "batch_size": 32, "mode": "gradient"},
               "optimizer": {"name": optimizer, "lr": lr}, "aggregator": agg,
               "attack": {"name": name, "num_byzantine": b, "options": options},
               "trusted_samples": 100,
               "eval_train_samples": self.scale.eval_train_samples,
               "checkpoint_every": 0}
        sim = Simulation(config_from_dict(cfg), dataset=self.dataset(spec))
        every = self.eval_every(rounds) if curve else rounds
        rows = [{"round": 0, **sim.evaluate()}] if curve else []
        while sim.round < rounds:
            sim.step()
            if sim.round % every == 0 or sim.round == rounds:
                rows.append({"round": sim.round, **sim.evaluate()})
        return [{k: r[k] for k in ("round", "train_loss", "test_accuracy")} for r in rows]

    def add(self, figure: str, panel: str, task: str, setting: str, aggregator: str,
            lr: float | None, seed: int, rows: list[dict[str, float]]) -> None:
        for r in rows:
            self.records[figure].append({
                "figure": figure, "panel": panel, "task": task, "setting": setting,
                "aggregator": aggregator, "lr": "" if lr is None else f"{lr:g}", "seed": seed,
                "round": r["round"], "train_loss": r["train_loss"],
                "test_accuracy": r["test_accuracy"]})

    def tune(self, figure: str, spec: TaskSpec, optimizer: str, rounds: int,
             run: Callable[[float, int], float] | None = None) -> float:
        """The lr of the grid with the lowest mean final train loss on the tuning seeds.

        `run(lr, seed) -> final train loss` (default: a mean + `optimizer` Simulation).
        """
        lrs = self.scale.sgd_lrs if optimizer == "sgd" else self.scale.adam_lrs
        if run is None:
            def run(lr: float, seed: int) -> float:
                return self.simulate(spec, "mean", optimizer=optimizer, lr=lr, seed=seed,
                                     rounds=rounds, curve=False)[-1]["train_loss"]
        scores = {}
        for lr in lrs:
            finals = []
            for seed in self.tune_seeds:
                loss = run(lr, seed)
                finals.append(loss)
                self.tuning.append({"figure": figure, "task": spec.label, "optimizer": optimizer,
                                    "lr": lr, "seed": seed, "rounds": rounds,
                                    "final_train_loss": loss})
            scores[lr] = mean_or_inf(finals)
        best = min(lrs, key=lambda lr: scores[lr])
        if len(lrs) > 1 and best in (min(lrs), max(lrs)):
            self.note(figure, f"{spec.label}: the tuned mean+{optimizer} lr {best:g} is at the "
                              f"edge of the grid {list(lrs)}")
        self.log(f"  tuned mean+{optimizer} on {spec.label}: lr {best:g} "
                 f"(grid {', '.join(f'{lr:g}: {scores[lr]:.3g}' for lr in lrs)})")
        return best

    def meta_trained(self, name: str, **options: Any) -> str | None:
        """'rnn:OUT/aggregators/NAME' if it is there (an earlier --meta-train) or is
        meta-trained now (meta_train=True); None otherwise."""
        from metagg.learned.meta import meta_train_rnn

        kind = "arnn" if options.get("arnn") else "rnn"
        path = self.out / "aggregators" / name
        s = self.scale
        # an interrupted meta-training leaves its best-so-far aggregator.json behind:
        # reuse only a finished one, and finish (resume) an unfinished one
        done = _meta_iterations_done(path)
        if (path / "aggregator.json").exists() and (done is None or done >= s.meta_iterations):
            self.log(f"  reusing meta-trained {path}")
            return f"{kind}:{path}"
        if not self.meta_train:
            return None
        resume = done is not None
        self.log(f"  meta-training {name} ({s.meta_iterations} iterations, unroll "
                 f"{s.meta_unroll}{f', resuming after {done}' if resume else ''})")
        meta_train_rnn(out_dir=str(path), iterations=s.meta_iterations, unroll=s.meta_unroll,
                       truncation=min(20, s.meta_unroll), long_horizon=1,
                       validate_every=max(1, s.meta_iterations // 5), validation_seeds=2,
                       patience=0, progress=False, resume=resume, **options)
        return f"{kind}:{path}"

    # ------------------------------------------------------------------ figures 4 and 5
    def curves(self, figure: str, panel: str, spec: TaskSpec,
               learned: dict[str, str]) -> None:
        """Learned aggregators (server does θ ← θ − step) and tuned averaging on one task."""
        rounds = self.scale.rounds[spec.dataset]
        self.log(f"figure {figure}{' ' + panel if panel else ''}: {spec.label}, {rounds} rounds")
        runs: list[tuple[str, str, str, float | None]] = [
            (label, self.learned(name), "sgd", None) for label, name in learned.items()]
        for opt in ("sgd", "adam"):
            runs.append((f"mean+{opt}", "mean", opt, self.tune(figure, spec, opt, rounds)))
        for label, agg, opt, lr in runs:
            t0 = time.perf_counter()
            for seed in self.eval_seeds:
                rows = self.simulate(spec, agg, optimizer=opt, lr=lr or 1.0, seed=seed,
                                     rounds=rounds)
                self.add(figure, panel, spec.label, "none", label, lr, seed, rows)
            final = [r for r in self.records[figure] if r["task"] == spec.label
                     and r["aggregator"] == label and r["round"] == rounds]
            self.log(f"  {label:<24} train loss {fmt([r['train_loss'] for r in final], sci=True)}"
                     f", test acc {fmt([r['test_accuracy'] for r in final], 100, 1)} %"
                     f" ({time.perf_counter() - t0:.0f} s)")

    def _try(self, figure: str, spec: TaskSpec, fn: Any) -> None:
        try:
            self.dataset(spec)
        except FileNotFoundError as exc:
            self.note(figure, f"{spec.label}: skipped, dataset not found "
                              f"({' '.join(str(exc).split())})")
            return
        fn()

    def figure4(self) -> None:
        for spec in FIG4_TASKS:
            def run(spec: TaskSpec = spec) -> None:
                learned = {"rnn-lstm": RNN, "arnn-lstm": ARNN}
                extra = {"rnn-gru": ("digits-mlp20-gru", {"cell": "gru"}),
                         "arnn-gru": ("digits-mlp20-arnn-gru", {"cell": "gru", "arnn": True})}
                if spec.dataset == "fashion_mnist" and spec.model == "mlp:20:sigmoid":
                    extra["rnn-lstm (trained here)"] = (
                        "fmnist-mlp20-lstm", {"dataset": "fashion_mnist",
                                              "data": self.dataset(spec)})
                for label, (name, options) in extra.items():
                    found = self.meta_trained(name, **options)
                    if found:
                        learned[label] = found
                    else:
                        self.note("4", f"{label}: not in the zoo, not run (meta-train it with "
                                       f"--meta-train)")
                self.curves("4", "", spec, learned)
            self._try("4", spec, run)
        self.note("4", "the paper's CIFAR-10 panel (2 conv + FC) is not run: CIFAR-10 is not "
                       "on this machine, and a conv-net stand-in (`cnn:ji2019` on "
                       "Fashion-MNIST) takes hours on 2 CPU cores at this protocol (~0.4 s a "
                       "round, ~4 s an evaluation)")

    def figure5(self) -> None:
        for panel, specs in (("left", FIG5_LEFT), ("right", FIG5_RIGHT)):
            for spec in specs:
                self._try("5", spec, lambda spec=spec, panel=panel: self.curves(
                    "5", panel, spec, {"rnn-lstm (digits, mlp:20:sigmoid)": RNN}))

    # ------------------------------------------------------------------ figure 6
    def figure6(self) -> None:
        spec = TaskSpec("digits, mlp:20:sigmoid", "digits", "mlp:20:sigmoid")
        rounds = self.scale.byz_rounds
        aggs = {label: (self.learned(name) if ":" in name else name)
                for label, name in BYZ_AGGREGATORS.items()}
        for setting in self.scale.byz_settings:
            attack = BYZ_ATTACKS[setting]
            self.log(f"figure 6: {setting}, {rounds} rounds")
            for label, agg in aggs.items():
                t0 = time.perf_counter()
                finals = []
                for seed in self.eval_seeds:
                    rows = self.simulate(spec, agg, seed=seed, rounds=rounds, attack=attack)
                    self.add("6", "", spec.label, setting, label, 1.0, seed, rows)
                    finals.append(rows[-1]["test_accuracy"])
                self.log(f"  {label:<16} test acc {fmt(finals, 100, 1)} % "
                         f"({time.perf_counter() - t0:.0f} s)")

    # ------------------------------------------------------------------ figure 7
    def _hetero_rnn(self, data: Dataset) -> str | None:
        """The 12-input RNN: --hetero-rnn, the zoo, OUT/aggregators, or meta-trained now."""
        from metagg.config.meta import MetaTrainConfig
        from metagg.learned.meta import HeteroEnv, meta_train

        for name in ([self.hetero_rnn] if self.hetero_rnn else []) + [
                f"rnn:pretrained/{HETERO_RNN}", f"rnn:{self.out / 'aggregators' / HETERO_RNN}"]:
            if _exists(name):
                return name
        if self.hetero_rnn:
            raise ValueError(f"--hetero-rnn {self.hetero_rnn}: no aggregator.json there")
        if not self.meta_train:
            return None
        s, path = self.scale, self.out / "aggregators" / HETERO_RNN
        self.log(f"  meta-training {HETERO_RNN} ({s.meta_iterations} iterations)")
        cfg = MetaTrainConfig(iterations=s.meta_iterations, unroll=s.meta_unroll,
                              truncation=min(20, s.meta_unroll), long_horizon=1, patience=0,
                              validate_every=max(1, s.meta_iterations // 5),
                              validation_seeds=2)
        meta_train(cfg, [HeteroEnv(data)], out_dir=path, progress=False)
        return f"rnn:{path}"

    def figure7(self) -> None:
        from metagg.aggregators import optimizers as opt
        from metagg.aggregators.registry import build_aggregator
        from metagg.cluster import PAPER_GROUPS, WorkerGroup
        from metagg.learned import evaluate_aggregator, load_aggregator
        from metagg.learned.meta import HeteroEnv

        def coverage_mean(optimizer: opt.ServerOptimizer) -> Any:
            return build_aggregator("coverage_mean", optimizer=optimizer)

        spec = TaskSpec("digits, 4 models × 3 workers → mlp:20:sigmoid", "digits",
                        "mlp:20:sigmoid")
        data = self.dataset(spec)
        rounds = self.scale.rounds["digits"]
        every = self.eval_every(rounds)
        horizons = tuple(sorted({*range(every, rounds + 1, every), rounds}))
        # the paper's setting; the same 12 slots all filled by target-model workers (a
        # homogeneous reference); only the target's own 3 workers (what it has without
        # the other systems)
        envs = {"4 models × 3": HeteroEnv(data, PAPER_GROUPS),
                "12 mlp:20:sigmoid": HeteroEnv(data, [WorkerGroup("mlp:20:sigmoid", 12)]),
                "3 mlp:20:sigmoid only": HeteroEnv(data, PAPER_GROUPS, active_groups=(0,))}
        self.log(f"figure 7: {spec.label}, {rounds} rounds")

        runs: list[tuple[str, Any, HeteroEnv, float | None]] = []
        name = self._hetero_rnn(data)
        if name is None:
            self.note("7", f"RNN rows missing: no 12-input RNN (`rnn:pretrained/{HETERO_RNN}` "
                           f"is not in the zoo); give one with --hetero-rnn PATH or meta-train "
                           f"it with --meta-train (the shipped digits RNN has 10 input slots, "
                           f"this setting has 12 workers)")
        else:
            self.learned(name)
            agg = load_aggregator(name.partition(":")[2])
            runs += [(f"rnn ({k})", agg, env, None) for k, env in envs.items()]
        for key, env in envs.items():
            for o in ("sgd", "adam"):
                make = opt.sgd if o == "sgd" else opt.adam

                def final_loss(lr: float, seed: int, env: HeteroEnv = env, make=make) -> float:
                    res = evaluate_aggregator(coverage_mean(make(lr)), env, [seed], (rounds,))
                    return res[f"loss@{rounds}"][0]

                lr = self.tune("7", TaskSpec(f"{spec.label}: {key}", "digits", spec.model), o,
                               rounds, run=final_loss)
                runs.append((f"mean+{o} ({key})", coverage_mean(make(lr)), env, lr))
        for label, agg, env, lr in runs:
            t0 = time.perf_counter()
            res = evaluate_aggregator(agg, env, self.eval_seeds, horizons)
            for j, seed in enumerate(self.eval_seeds):
                theta0 = env.task.init_params(seed)
                train = env.task.evaluate(theta0, data.x_train, data.y_train)
                test = env.task.evaluate(theta0, data.x_test, data.y_test)
                rows = [{"round": 0, "train_loss": train["loss"],
                         "test_accuracy": test["accuracy"]}]
                rows += [{"round": h, "train_loss": res[f"loss@{h}"][j],
                          "test_accuracy": res[f"acc@{h}"][j]} for h in horizons]
                self.add("7", "", spec.label, "none", label, lr, seed, rows)
            self.log(f"  {label:<34} train loss {fmt(res[f'loss@{rounds}'], sci=True)}, "
                     f"test acc {fmt(res[f'acc@{rounds}'], 100, 1)} % "
                     f"({time.perf_counter() - t0:.0f} s)")


def reproduce_ji2019(
    out_dir: str | Path,
    scale: str | Scale = "quick",
    *,
    figures: Sequence[str] = FIGURES,
    meta_train: bool = False,
    hetero_rnn: str | None = None,
    data_dir: str | None = None,
    threads: int | None = 1,
    command: str = "reproduce_ji2019(...)",
) -> Path:
    """Run figures 4-7 of Ji et al. 2019 at `scale` and write them to `out_dir`.

    Args:
        out_dir: output directory (created).
        scale: "quick", "full", "tiny" (tests) or a `Scale`.
        figures: which of "4", "5", "6", "7" to run.
        meta_train: meta-train the aggregators the zoo lacks into out_dir/aggregators.
        hetero_rnn: a 12-input RNN for figure 7 ('rnn:PATH'); default: the zoo's
            `digits-hetero4x3-mlp20-lstm`, then out_dir/aggregators.
        data_dir: where Fashion-MNIST's IDX files are (default: metagg's search path).
        threads: torch threads during the run (restored after); None leaves them.

    Returns:
        The path of report.md.
    """
    sc = SCALES[scale] if isinstance(scale, str) else scale
    bad = sorted(set(figures) - set(FIGURES))
    if bad:
        raise ValueError(f"unknown figure(s) {bad}; choose from {', '.join(FIGURES)}")
    if hetero_rnn and not hetero_rnn.startswith("rnn:"):
        hetero_rnn = f"rnn:{hetero_rnn}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # d ~ 10³-10⁴: one thread is as fast, robust to load
    try:
        run = Ji2019(out, sc, meta_train=meta_train, hetero_rnn=hetero_rnn, data_dir=data_dir)
        order = [f for f in FIGURES if f in figures]
        for f in order:
            t0 = time.perf_counter()
            getattr(run, f"figure{f}")()
            run.times[f] = time.perf_counter() - t0
            report.write_csv(run, f)
            report.plot(run, f)
        report.write_tuning(run)
        path = report.write_report(run, order, command)
        run.log(f"done: {path}")
        return path
    finally:
        torch.set_num_threads(before)
