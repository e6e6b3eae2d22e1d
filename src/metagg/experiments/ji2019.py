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
  does not name its attack), as `experiments/arnn_byzantine.py`.
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

import csv
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metagg.config import config_from_dict
from metagg.data import Dataset, load_dataset
from metagg.learned.store import resolve_path
from metagg.seeding import derive_seed

__all__ = [
    "CSV_COLUMNS",
    "SCALES",
    "Scale",
    "reproduce_ji2019",
]

CSV_COLUMNS = ("figure", "panel", "task", "setting", "aggregator", "lr", "seed", "round",
               "train_loss", "test_accuracy")
TUNING_COLUMNS = ("figure", "task", "optimizer", "lr", "seed", "rounds", "final_train_loss")

RNN = "rnn:pretrained/digits-mlp20-lstm"
ARNN = "arnn:pretrained/digits-mlp20-arnn-lstm"
HETERO_RNN = "digits-hetero4x3-mlp20-lstm"  # zoo name looked for by figure 7
EVAL_SEED0, TUNE_SEED0 = 100, 200


@dataclass(frozen=True)
class Scale:
    """How much of everything to run.

    Attributes:
        seeds: evaluation seeds per curve; tune_seeds: seeds per grid point.
        rounds: rounds per dataset ("digits", "fashion_mnist") in figures 4, 5, 7.
        points: evaluations per run (plus round 0).
        sgd_lrs, adam_lrs: the grids the averaging baselines are tuned on.
        byz_rounds, byz_settings: figure 6's run length and attack settings.
        eval_train_samples: cap on the train examples behind "train loss".
        meta_iterations, meta_unroll: meta-training budget with --meta-train.
    """

    name: str
    seeds: int
    tune_seeds: int
    rounds: dict[str, int]
    points: int
    sgd_lrs: tuple[float, ...]
    adam_lrs: tuple[float, ...]
    byz_rounds: int
    byz_settings: tuple[str, ...]
    eval_train_samples: int
    meta_iterations: int
    meta_unroll: int


ALL_BYZ = ("none", "ipm 3/10", "ipm 7/10", "alie 3/10", "alie 7/10", "sign_flip 3/10",
           "sign_flip 7/10", "gaussian 3/10", "gaussian 7/10")

SCALES: dict[str, Scale] = {
    # tiny: for the tests only (seconds); hidden from the command line's help.
    "tiny": Scale("tiny", seeds=1, tune_seeds=1, rounds={"digits": 4, "fashion_mnist": 4},
                  points=2, sgd_lrs=(1.0,), adam_lrs=(0.1,), byz_rounds=4,
                  byz_settings=("none", "ipm 7/10"), eval_train_samples=500,
                  meta_iterations=1, meta_unroll=4),
    "quick": Scale("quick", seeds=2, tune_seeds=1, rounds={"digits": 150, "fashion_mnist": 200},
                   points=10, sgd_lrs=(0.5, 1.0, 2.0, 4.0, 8.0),
                   adam_lrs=(0.003, 0.01, 0.03, 0.1, 0.3),
                   byz_rounds=100, byz_settings=ALL_BYZ, eval_train_samples=5000,
                   meta_iterations=40, meta_unroll=100),
    "full": Scale("full", seeds=5, tune_seeds=2, rounds={"digits": 400, "fashion_mnist": 1000},
                  points=20, sgd_lrs=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
                  adam_lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), byz_rounds=300, byz_settings=ALL_BYZ,
                  eval_train_samples=10000, meta_iterations=300, meta_unroll=100),
}


@dataclass(frozen=True)
class TaskSpec:
    """One training task: a dataset (optionally a class subset) and the workers' model."""

    label: str
    dataset: str
    model: str
    classes: tuple[int, ...] | None = None


FIG4_TASKS = (TaskSpec("digits, mlp:20:sigmoid", "digits", "mlp:20:sigmoid"),
              TaskSpec("fashion_mnist, mlp:20:sigmoid", "fashion_mnist", "mlp:20:sigmoid"))
FIG5_LEFT = tuple(TaskSpec(f"digits, {m}", "digits", m)
                  for m in ("mlp:40:sigmoid", "mlp:20,20:sigmoid", "mlp:20:relu"))
FIG5_RIGHT = (TaskSpec("fashion_mnist-2 (classes 0-1)", "fashion_mnist", "mlp:20:sigmoid",
                       (0, 1)),
              TaskSpec("fashion_mnist-5 (classes 0-4)", "fashion_mnist", "mlp:20:sigmoid",
                       (0, 1, 2, 3, 4)))

# Figure 6, as experiments/arnn_byzantine.py: label -> (attack, Byzantine count, options).
BYZ_ATTACKS: dict[str, tuple[str, int, dict[str, float]]] = {
    "none": ("none", 0, {}),
    "ipm 3/10": ("ipm", 3, {"eps": 0.1}), "ipm 7/10": ("ipm", 7, {"eps": 0.1}),
    "alie 3/10": ("alie", 3, {"z": 1.5}), "alie 7/10": ("alie", 7, {"z": 1.5}),
    "sign_flip 3/10": ("sign_flip", 3, {"scale": 4.0}),
    "sign_flip 7/10": ("sign_flip", 7, {"scale": 4.0}),
    "gaussian 3/10": ("gaussian", 3, {"sigma": 200.0}),
    "gaussian 7/10": ("gaussian", 7, {"sigma": 200.0}),
}
BYZ_AGGREGATORS = {"mean": "mean", "median": "median", "krum": "krum", "zeno": "zeno",
                   "fltrust": "fltrust", "rnn": RNN, "arnn": ARNN,
                   "arnn-ipm7": "arnn:pretrained/digits-mlp20-arnn-lstm-ipm7",
                   "arnn-signflip7": "arnn:pretrained/digits-mlp20-arnn-lstm-signflip7",
                   "arnn-alie7": "arnn:pretrained/digits-mlp20-arnn-lstm-alie7"}
# the ARNN meta-trained against each attack (figure 6's "ARNN vs Krum" comparison)
MATCHED_ARNN = {"ipm": "arnn-ipm7", "sign_flip": "arnn-signflip7", "alie": "arnn-alie7"}

PAPER_CLAIMS = {
    "4": "“Both the RNN aggregators and ARNN aggregators outperform the current "
         "state-of-the-art averaging aggregator, and ARNN aggregators are more efficient "
         "than the RNN aggregators”; LSTM and GRU perform alike (§5.2; MNIST MLP 1×20 "
         "sigmoid, CIFAR-10 CNN).",
    "5": "Left: “The RNN aggregator still outperforms the averaging aggregator in (1) "
         "[40 units] and (2) [2 hidden], and has competitive performance in (3) [ReLU]”. "
         "Right: it “works well on transferring among the disjoint subset of the data” "
         "(CIFAR-2, CIFAR-5) and “can compete with classic averaging” (§5.3).",
    "6": "“The averaging aggregator is unable to tolerate any Byzantine attack”; with 3/10 "
         "Byzantine “the RNN aggregator and ARNN aggregator have slightly better performance "
         "than the Krum aggregator”; at 7/10 “the Krum aggregator and RNN aggregator cannot "
         "resist the attackers” while “the ARNN aggregator still works well and outperforms "
         "the Krum by 43.14%” (§5.4; the attack is not named).",
    "7": "“The RNN aggregator can efficiently utilize gradients from different local models "
         "to improve the global learning model's performance” (§5.5; 4 systems, 3 workers "
         "each, one RNN updating an MLP20-sigmoid).",
}

STAND_IN_ROWS = [
    ("MNIST, MLP 784-20-10 sigmoid (figures 4, 5 left, 6, 7)",
     "digits (scikit-learn's 8×8 digits, MLP 64-20-10 sigmoid): the task the shipped "
     "aggregators were meta-trained on; figure 4 adds Fashion-MNIST (28×28, MLP 784-20-10)"),
    ("CIFAR-10, 2 conv + max-pool + FC (figure 4)",
     "not run (no CIFAR-10 here; a conv net on Fashion-MNIST is hours of CPU): figure 4 uses "
     "digits and Fashion-MNIST with the MLP"),
    ("CIFAR-2 / CIFAR-5 (figure 5 right)",
     "Fashion-MNIST classes 0-1 / 0-4, MLP 784-20-{2,5} sigmoid (a dataset the digits RNN "
     "never saw)"),
    ("10 workers, equal shards (all figures)",
     "10 workers, IID equal shards, batch 32, gradient mode (figure 7: 12 workers, 3 per model)"),
]


# --------------------------------------------------------------------------- helpers


def _fmt(values: Sequence[float], scale: float = 1.0, digits: int = 3, sci: bool = False) -> str:
    """'m ± s' over seeds (just m for one seed); 'diverged' if any is non-finite."""
    vals = [scale * v for v in values]
    if not vals:
        return "–"
    if not all(math.isfinite(v) for v in vals):
        return "diverged"
    spec = f"#.{digits}g" if sci else f".{digits}f"  # '#': keep trailing zeros (1.00)
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:{spec}}"
    return f"{mean:{spec}} ± {statistics.stdev(vals):{spec}}"


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) \
        else math.inf


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


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


def _describe(name: str) -> str:
    """One line on what a learned aggregator was trained on."""
    _, _, path = name.partition(":")
    info = json.loads(resolve_path(path).with_suffix(".json").read_text())
    cfg, t = info["config"], info.get("trained_on", {})
    attack = t.get("attack", "none")
    attack = "no attack" if attack == "none" else f"{attack} {t.get('num_byzantine')}/" \
                                                  f"{t.get('num_workers')}"
    where = t.get("dataset_name") or t.get("dataset")
    return (f"`{name}`: {info['kind'].upper()}-{cfg['cell'].upper()}, {cfg['output']} output, "
            f"{cfg['num_workers']} input slots; meta-trained on {where}, {t.get('model')}, "
            f"{attack}, {t.get('iterations')} meta-iterations")


# --------------------------------------------------------------------------- the runner


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
            scores[lr] = _mean(finals)
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
            self.log(f"  {label:<24} train loss {_fmt([r['train_loss'] for r in final], sci=True)}"
                     f", test acc {_fmt([r['test_accuracy'] for r in final], 100, 1)} %"
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
                self.log(f"  {label:<16} test acc {_fmt(finals, 100, 1)} % "
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
            self.log(f"  {label:<34} train loss {_fmt(res[f'loss@{rounds}'], sci=True)}, "
                     f"test acc {_fmt(res[f'acc@{rounds}'], 100, 1)} % "
                     f"({time.perf_counter() - t0:.0f} s)")

    # ------------------------------------------------------------------ output
    def finals(self, figure: str, task: str, aggregator: str,
               setting: str = "none") -> list[dict[str, Any]]:
        """Each seed's last row of one curve."""
        rows = [r for r in self.records[figure] if r["task"] == task
                and r["aggregator"] == aggregator and r["setting"] == setting]
        last = max((r["round"] for r in rows), default=None)
        return [r for r in rows if r["round"] == last]

    def write_csv(self, figure: str) -> Path:
        path = self.out / f"figure{figure}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows(self.records[figure])
        return path

    def plot(self, figure: str) -> Path | None:
        """Mean over seeds against rounds: figure 6 test accuracy per setting; the others
        train loss (log) and test accuracy per task."""
        recs = self.records[figure]
        if not recs:
            return None
        import logging

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # log-axis tick labels use mathtext, whose STIX fallbacks are missing on slim
        # installs: matplotlib then warns once per font although DejaVu renders them fine
        logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
        key = "setting" if figure == "6" else "task"
        groups = list(dict.fromkeys(r[key] for r in recs))
        metrics = ("test_accuracy",) if figure == "6" else ("train_loss", "test_accuracy")
        panels = [(g, m) for g in groups for m in metrics]
        ncols = 3 if figure == "6" else 2 * min(2, len(groups))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows),
                                 squeeze=False)
        for i, (ax, (g, metric)) in enumerate(zip(axes.flat, panels, strict=False)):
            curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
            for r in recs:
                if r[key] == g:
                    curves[r["aggregator"]][r["round"]].append(r[metric])
            for agg, by_round in curves.items():
                xs = sorted(by_round)
                scale = 100.0 if metric == "test_accuracy" else 1.0
                ax.plot(xs, [scale * statistics.fmean(by_round[x]) for x in xs], label=agg)
            if metric == "train_loss":
                ax.set_yscale("log")
            ax.set_title(g if len(g) < 48 else g[:45] + "…", fontsize=9)
            ax.set_xlabel("round")
            ax.set_ylabel("test accuracy (%)" if metric == "test_accuracy" else "train loss")
            ax.grid(alpha=0.3)
            if i == 0 or (figure != "6" and metric == "train_loss"):  # one legend per task
                ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"Ji et al. 2019 figure {figure} (metagg, scale {self.scale.name})")
        fig.tight_layout()
        path = self.out / f"figure{figure}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def write_tuning(self) -> None:
        with open(self.out / "tuning.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=TUNING_COLUMNS)
            w.writeheader()
            w.writerows(self.tuning)

    def _final_tables(self, figure: str, key: str) -> str:
        """Two tables (final train loss, final test accuracy): aggregators × tasks/settings."""
        recs = self.records[figure]
        cols = list(dict.fromkeys(r[key] for r in recs))
        aggs = list(dict.fromkeys(r["aggregator"] for r in recs))
        out = []
        for metric, title, scale, digits, sci in (
                ("test_accuracy", "final test accuracy (%)", 100.0, 1, False),
                ("train_loss", "final train loss", 1.0, 3, True)):  # 3 significant digits
            rows = []
            for agg in aggs:
                cells = []
                for c in cols:
                    task = c if key == "task" else recs[0]["task"]
                    setting = c if key == "setting" else "none"
                    finals = self.finals(figure, task, agg, setting)
                    cell = _fmt([r[metric] for r in finals], scale, digits, sci)
                    lrs = {r["lr"] for r in finals if r["lr"] and agg.startswith("mean+")}
                    if lrs and metric == "train_loss":
                        cell += f" (lr {', '.join(sorted(lrs))})"
                    cells.append(cell)
                rows.append([agg, *cells])
            out.append(f"{title}, mean ± std over seeds {self.eval_seeds}:\n\n"
                       + _table(["aggregator", *cols], rows))
        return "\n".join(out)

    def _final_mean(self, figure: str, task: str, agg: str, metric: str,
                    setting: str = "none") -> float | None:
        """Mean over seeds of one curve's final `metric` (None if it did not run)."""
        finals = self.finals(figure, task, agg, setting)
        return _mean([r[metric] for r in finals]) if finals else None

    def _vs(self, figure: str, task: str, a: str, b: str) -> str:
        la, lb = (self._final_mean(figure, task, x, "train_loss") for x in (a, b))
        if la is None or lb is None:
            return ""
        aa, ab = (100 * self._final_mean(figure, task, x, "test_accuracy") for x in (a, b))
        return (f"{a} vs {b}: train loss {la:#.3g} vs {lb:#.3g} "
                f"({'lower' if la < lb else 'higher'}), test acc {aa:.1f} vs {ab:.1f} %")

    def _ours(self, figure: str) -> list[str]:
        """Our numbers on the paper's claim: per task (per attack setting in figure 6)."""
        recs = self.records[figure]
        aggs = list(dict.fromkeys(r["aggregator"] for r in recs))
        lines = []
        if figure in ("4", "5"):
            tasks = list(dict.fromkeys(r["task"] for r in recs))
            for a in (a for a in aggs if not a.startswith("mean+")):
                for b in ("mean+sgd", "mean+adam"):
                    pairs = [(self._final_mean(figure, t, a, "train_loss"),
                              self._final_mean(figure, t, b, "train_loss")) for t in tasks]
                    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
                    wins = sum(x < y for x, y in pairs)
                    lines.append(f"- {a}: lower final train loss than tuned {b} on {wins} of "
                                 f"{len(pairs)} tasks")
            for t in tasks:
                loss = {a: self._final_mean(figure, t, a, "train_loss") for a in aggs}
                acc = {a: self._final_mean(figure, t, a, "test_accuracy") for a in aggs}
                loss = {a: v for a, v in loss.items() if v is not None}
                acc = {a: 100 * v for a, v in acc.items() if v is not None}
                lines.append(
                    f"- {t}: train loss " + ", ".join(f"{a} {v:#.3g}" for a, v in loss.items())
                    + f" (lowest: {min(loss, key=loss.get)}); test acc "
                    + ", ".join(f"{a} {v:.1f}" for a, v in acc.items())
                    + f" % (highest: {max(acc, key=acc.get)})")
        elif figure == "6":
            task = recs[0]["task"]
            for setting in dict.fromkeys(r["setting"] for r in recs):
                acc = {a: 100 * v for a in aggs if (v := self._final_mean(
                    "6", task, a, "test_accuracy", setting)) is not None}
                matched = MATCHED_ARNN.get(BYZ_ATTACKS[setting][0])
                shown = [a for a in ("mean", "krum", "rnn", "arnn", matched) if a in acc]
                line = f"- {setting}: test acc (%) " + ", ".join(f"{a} {acc[a]:.1f}" for a in shown)
                if "krum" in acc:
                    diffs = [f"{a} − krum = {acc[a] - acc['krum']:+.1f}"
                             for a in ("rnn", "arnn", matched) if a in acc]
                    line += " → " + ", ".join(diffs) + " points"
                lines.append(line)
        elif figure == "7":
            task = recs[0]["task"]
            het, homo, own = "4 models × 3", "12 mlp:20:sigmoid", "3 mlp:20:sigmoid only"
            for a, b in ((f"rnn ({het})", f"rnn ({own})"),
                         (f"rnn ({het})", f"mean+adam ({own})"),
                         (f"mean+adam ({het})", f"mean+adam ({own})"),
                         (f"mean+sgd ({het})", f"mean+sgd ({own})"),
                         (f"rnn ({het})", f"rnn ({homo})"),
                         (f"mean+adam ({het})", f"mean+adam ({homo})"),
                         (f"rnn ({het})", f"mean+adam ({het})"),
                         (f"rnn ({het})", f"mean+sgd ({het})")):
                text = self._vs("7", task, a, b)
                if text:
                    lines.append(f"- {text}")
        return lines

    def write_report(self, figures: Sequence[str], command: str) -> Path:
        s = self.scale
        total = time.perf_counter() - self.start
        parts = [
            "# Ji et al. 2019, “Learning to Learn Gradient Aggregation by Gradient Descent” — "
            "metagg reproduction", "",
            f"Command: `{command}`  ",
            f"Scale `{s.name}`: {s.seeds} evaluation seed(s) {self.eval_seeds}, "
            f"{s.tune_seeds} tuning seed(s) {self.tune_seeds}; rounds {s.rounds} "
            f"(figures 4, 5, 7), {s.byz_rounds} (figure 6); train loss on at most "
            f"{s.eval_train_samples} train examples; total wall time {total:.0f} s "
            f"(torch threads: {torch.get_num_threads()}).", "",
            "Every curve: 10 workers (figure 7: 12), IID equal shards, batch 32, gradient "
            "mode; the learned aggregators produce the step (θ ← θ − step), the baselines "
            "average the gradients and apply server SGD or Adam with the learning rate of "
            f"the grid SGD {list(s.sgd_lrs)} / Adam {list(s.adam_lrs)} that gave the lowest "
            "final train loss on the tuning seeds (`tuning.csv`). Figure 6's rules use "
            "server SGD lr 1.", "",
            "## Stand-in datasets", "", _table(["paper", "here"], STAND_IN_ROWS),
            "## Learned aggregators used", "",
            *[f"- {_describe(n)}" for n in sorted(self.used)], "",
        ]
        titles = {"4": "Figure 4 — learned aggregators vs tuned averaging",
                  "5": "Figure 5 — transfer without retraining (left: models, right: data)",
                  "6": "Figure 6 — Byzantine workers (digits, mlp:20:sigmoid)",
                  "7": "Figure 7 (§5.5) — heterogeneous worker models"}
        for f in figures:
            parts += [f"## {titles[f]}", "", f"Files: `figure{f}.png`, `figure{f}.csv`"
                      + (f" ({self.times[f]:.0f} s)" if f in self.times else ""), "",
                      f"**Paper:** {PAPER_CLAIMS[f]}", ""]
            if f == "7":
                parts += ["Mapping rule (`metagg.cluster.HeteroCluster`): a group's tensors "
                          "correspond to the "
                          "target's by name and leading block (hidden units 0-19 of the MLP40 "
                          "are the target's units; the 2×20 MLP's `hidden0`/`output` are the "
                          "target's, its `hidden1` is private); the groups' workers compute "
                          "their own model's gradient with the shared coordinates set to the "
                          "target's θ; private coordinates are trained by the group with mean "
                          "+ SGD (lr 1); target coordinates a model lacks are sent as 0 and "
                          "masked (averaging divides by the workers that cover them). "
                          "Rows: “4 models × 3” is the paper's setting; “12 mlp:20:sigmoid” "
                          "fills the same 12 slots with target-model workers (the homogeneous "
                          "reference); “3 mlp:20:sigmoid only” feeds the same aggregators only "
                          "the target group's 3 workers — what the target has without the "
                          "other systems (the 12-slot RNN then sees 9 empty slots, which it "
                          "never saw in meta-training, so mean+adam is the fairer "
                          "reference there).", ""]
            if self.records[f]:
                parts += ["**Ours:**", "", *self._ours(f), "",
                          self._final_tables(f, "setting" if f == "6" else "task")]
            for note in self.notes[f]:
                parts.append(f"- note: {note}")
            parts.append("")
        path = self.out / "report.md"
        path.write_text("\n".join(parts))
        return path


# --------------------------------------------------------------------------- entry points


FIGURES = ("4", "5", "6", "7")


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
            run.write_csv(f)
            run.plot(f)
        run.write_tuning()
        report = run.write_report(order, command)
        run.log(f"done: {report}")
        return report
    finally:
        torch.set_num_threads(before)
