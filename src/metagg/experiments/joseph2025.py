"""`metagg reproduce joseph2025`: LAgg-A / LOpt-A against tuned baselines (Joseph et al. 2025).

    metagg reproduce joseph2025 --scale quick --out runs/joseph2025

1. Tune every baseline (FedAvg, SlowMo, server Adam, one-step SGD and Adam) on the
   meta-training task — 8×8 Fashion-MNIST, MLP 64-32-10 ReLU, K = 8 workers, H = 4
   local steps, batch 128 — with `metagg.tune` at the evaluation horizon R, on a
   tuning seed that is not an evaluation seed.
2. Run the learned optimizers and the tuned baselines on held-out seeds; plot training
   loss against communication rounds (mean ± std bands).
3. Rounds to reach the target loss, where the target is the best tuned baseline's
   mean training loss at round R; speed-up = R / rounds (the paper reports 2–6×).
4. Generalisation without retraining: 784-128-128 Fashion-MNIST and, when CIFAR-10
   is on disk, conv-c10 (the baselines tuned again on each); LOpt-A with other worker
   counts K; other local-step counts H (baselines keep their tuned settings).

Writes, in --out: `curves.csv`, `loss_vs_rounds.png`, `rounds_to_target.csv`,
`generalization.csv`, `generalization.png`, `tuning/<baseline>/` and `report.md`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metagg.aggregators.registry import build_aggregator
from metagg.checkpoint import atomic_write_text, json_text
from metagg.compare import format_table
from metagg.config import RunConfig, config_from_dict, config_to_dict
from metagg.data import load_dataset
from metagg.experiments.runs import (
    ACCOUNT,
    best_baseline,
    changed_config,
    count_tuning_time,
    dataset_for,
    mean_curve,
    merge,
    plot_panels,
    provenance,
    rounds_to_reach,
    run_curves,
    search_started,
    slug,
    with_seed,
    write_csv,
)
from metagg.plots import plot_overlay
from metagg.tune import LOCAL_LRS, tune

__all__ = ["SCALES", "Scale", "reproduce_joseph2025"]

# the pretrained weights shipped in the package (see `metagg zoo list`)
LAGG_PRETRAINED = "lagg:pretrained/fmnist8x8-mlp32-lagg-k8h4"
LOPT_PRETRAINED = "lopt:pretrained/fmnist8x8-mlp32-lopt-k8h4"

TASK = {  # the paper's small meta-training task, as in configs/fmnist8x8-local-sgd.yaml
    "model": "mlp:32:relu",
    "data": {"name": "fashion_mnist", "image_size": 8, "partition": "iid"},
    "workers": {"num_workers": 8, "mode": "local_sgd", "local_steps": 4, "local_lr": 0.5,
                "batch_size": 128},
    "optimizer": {"name": "sgd", "lr": 1.0},
    "aggregator": {"name": "mean"},
    "trusted_samples": 0,
    "checkpoint_every": 0,
}
TUNING_SEED = 10_000  # never an evaluation seed


@dataclass(frozen=True)
class Scale:
    """How much of the reproduction to run."""

    rounds: int  # R, the horizon the baselines are tuned for
    seeds: int  # held-out evaluation seeds
    evals: int  # evaluation points along the curve
    grids: Mapping[str, Mapping[str, Sequence[Any]]]  # per baseline; {} = the paper's
    big_rounds: int  # 784-128-128 generalisation horizon (0 = skip)
    other_workers: tuple[int, ...] = (4, 16)
    other_local_steps: tuple[int, ...] = (8,)
    task: Mapping[str, Any] = field(default_factory=dict)  # overrides of TASK
    # the baselines are tuned again on the 784-128-128 task (None: reuse `grids`)
    big_grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None
    # conv-c10 on CIFAR-10 when it is on disk (0 = skip): ~100 GFLOP per round at
    # K = 8, H = 4, B = 128, i.e. seconds per round on a CPU; the baselines use big_grids
    cifar_rounds: int = 0


_H4 = {"workers.local_steps": [4]}  # the learned optimizers were trained for H = 4
SCALES: dict[str, Scale] = {
    "full": Scale(
        rounds=1000, seeds=10, evals=50, big_rounds=1000, cifar_rounds=1000,
        grids={b: _H4 for b in ("fedavg", "slowmo", "fedadam")},
    ),
    "quick": Scale(
        rounds=300, seeds=3, evals=30, big_rounds=200, cifar_rounds=100,
        grids={
            "fedavg": {**_H4, "workers.local_lr": [1.0, 0.5]},
            "slowmo": {**_H4, "workers.local_lr": [1.0, 0.5], "optimizer.lr": [1.0, 0.5, 0.3],
                       "optimizer.beta": [0.9, 0.8]},
            "fedadam": {**_H4, "workers.local_lr": [1.0, 0.5],
                        "optimizer.lr": [0.03, 0.01, 3e-3]},
            "sgd": {"optimizer.lr": [1.0, 0.3, 0.1]},
            "adam": {"optimizer.lr": [0.03, 0.01, 3e-3]},
        },
        other_workers=(16,), other_local_steps=(),
        big_grids={
            "fedavg": {**_H4, "workers.local_lr": [0.5, 0.3]},
            "slowmo": {**_H4, "workers.local_lr": [0.5, 0.3], "optimizer.lr": [1.0, 0.5],
                       "optimizer.beta": [0.9]},
            "fedadam": {**_H4, "workers.local_lr": [0.5, 0.3], "optimizer.lr": [0.01, 3e-3]},
            "sgd": {"optimizer.lr": [1.0, 0.3]},
            "adam": {"optimizer.lr": [0.01, 3e-3]},
        },
    ),
    # for tests: digits, a few rounds
    "tiny": Scale(
        rounds=8, seeds=2, evals=4, big_rounds=4, cifar_rounds=4, other_workers=(4,),
        other_local_steps=(),
        grids={"fedavg": {**_H4, "workers.local_lr": [0.5]},
               "slowmo": {**_H4, "workers.local_lr": [0.5], "optimizer.lr": [1.0, 0.5],
                          "optimizer.beta": [0.9]},
               "fedadam": {**_H4, "workers.local_lr": [0.5], "optimizer.lr": [0.01]},
               "sgd": {"optimizer.lr": [0.3]}, "adam": {"optimizer.lr": [0.01]}},
        task={"model": "mlp:16:relu", "data": {"name": "digits", "image_size": None},
              "workers": {"num_workers": 4, "batch_size": 16}, "eval_train_samples": 500},
    ),
}
BASELINES = ("fedavg", "slowmo", "fedadam", "sgd", "adam")
ONE_STEP = ("sgd", "adam")  # one server step per round on K·H·B examples


def _task_config(scale: Scale, **over: Any) -> RunConfig:
    return config_from_dict(merge(merge(TASK, scale.task), over))


def _learned_config(base: RunConfig, spec: str) -> RunConfig:
    """`spec` is an aggregator name ("lagg:PATH") or "lagg:init" for untrained weights."""
    data = config_to_dict(base)
    kind, _, arg = spec.partition(":")
    data["aggregator"] = ({"name": kind, "options": {"init": True}} if arg == "init"
                          else {"name": spec})
    return config_from_dict(data)


def reproduce_joseph2025(
    out_dir: str | Path,
    *,
    scale: str = "quick",
    lagg: str = LAGG_PRETRAINED,
    lopt: str = LOPT_PRETRAINED,
    log: Callable[[str], None] | None = None,
    generalization: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the reproduction at `scale` ("quick", "full"; "tiny" for tests) into `out_dir`.

    `lagg` / `lopt` name the learned optimizers (default: the shipped pretrained ones;
    "lagg:init" / "lopt:init" run untrained ones). `generalization=False` runs only the
    meta-training task (the full scale's transfer settings take many CPU hours).
    `resume=True` keeps what an interrupted run in `out_dir` finished: tuning trials and
    every method's evaluation runs (`runs/*.json`, reused only for the same config, seeds
    and learned weights). Returns the numbers in report.md.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
    sc = SCALES[scale]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    ACCOUNT.update(read_back=0, compute_s=0.0)

    base = _task_config(sc, rounds=sc.rounds)
    for spec in (lagg, lopt):  # a missing pretrained file fails now, not after tuning
        a = _learned_config(base, spec).aggregator
        build_aggregator(a.name, options=a.options)
    dataset = dataset_for(base)

    # 1. tune the baselines at horizon R on a seed no evaluation uses
    tuned: dict[str, RunConfig] = {}
    tuning_rows = []
    for name in BASELINES:
        say(f"[joseph2025] tuning {name} ({sc.rounds} rounds per trial)")
        cfg = _task_config(sc, rounds=sc.rounds, seed=TUNING_SEED)
        folder = out / "tuning" / name
        result = tune(cfg, name, budget=sc.rounds, out_dir=folder, grid=sc.grids.get(name, {}),
                      progress=False, resume=search_started(folder, resume))
        count_tuning_time(folder)
        tuned[name] = config_from_dict({**result["config"], "eval_every": base.eval_every})
        tuning_rows.append([name, str(result["trials"]),
                            ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float)
                                      else f"{k.split('.')[-1]}={v}"
                                      for k, v in result["best"].items()),
                            f"{result['score']:.4f}"])

    # 2. learned vs tuned on held-out seeds
    methods: dict[str, RunConfig] = {"LAgg-A": _learned_config(base, lagg),
                                     "LOpt-A": _learned_config(base, lopt), **tuned}
    seeds = list(range(sc.seeds))
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for label, cfg in methods.items():
        say(f"[joseph2025] {label}: {len(seeds)} seeds x {sc.rounds} rounds")
        curves[label] = run_curves(cfg, dataset, sc.evals, seeds, out / "runs" / f"{label}.json",
                                resume)
    _write_curves(out / "curves.csv", curves)
    # log loss axis: the methods differ by ~10 % late in training
    plot_overlay(curves, out / "loss_vs_rounds.png", metrics=("train_loss", "test_accuracy"),
                 log_loss=True,
                 title=f"{_task_name(base)}: training loss vs communication rounds "
                       f"({len(seeds)} seeds)")

    # 3. rounds to reach the best tuned baseline's loss at round R
    finals = {label: mean_curve(runs)[-1][1] for label, runs in curves.items()}
    winner = best_baseline(finals, BASELINES)
    target = finals[winner]
    speed_rows = []
    speedups = {}
    for label, runs in curves.items():
        hit = rounds_to_reach(runs, target)
        speedups[label] = sc.rounds / hit if hit else None
        speed_rows.append({"method": label, "final_train_loss": finals[label],
                           "rounds_to_target": hit,
                           "speedup": round(speedups[label], 2) if hit else None})
    write_csv(out / "rounds_to_target.csv", speed_rows)

    # 4. generalisation without retraining
    gen_rows, gen_curves = ([], {}) if not generalization else \
        _generalization(sc, base, lagg, lopt, tuned, seeds, say, out, resume)
    if gen_rows:
        write_csv(out / "generalization.csv", gen_rows)
        plot_panels(gen_curves, out / "generalization.png")
    else:  # not beside a report that says it was not run (an earlier run in the same --out)
        for name in ("generalization.csv", "generalization.png"):
            (out / name).unlink(missing_ok=True)

    summary = {"scale": scale, "task": _task_name(base), "rounds": sc.rounds,
               "seeds": seeds, "target": target, "best_baseline": winner,
               "final_train_loss": finals, "speedup": speedups,
               "generalization": gen_rows, "generalization_run": generalization,
               "lagg": lagg, "lopt": lopt, "read_back": ACCOUNT["read_back"],
               "compute_s": round(ACCOUNT["compute_s"], 1),
               "wall_s": round(time.perf_counter() - start, 1)}
    atomic_write_text(out / "summary.json", json_text(summary, indent=2))
    _write_report(out / "report.md", summary, tuning_rows, speed_rows, sc, base)
    say(f"[joseph2025] done in {summary['wall_s']:.0f} s: {out / 'report.md'}")
    return summary


def _task_name(cfg: RunConfig) -> str:
    size = f"{cfg.data.image_size}x{cfg.data.image_size} " if cfg.data.image_size else ""
    w = cfg.workers
    return f"{size}{cfg.data.name}, {cfg.model}, K={w.num_workers}, H={w.local_steps}"


def _generalization(sc: Scale, base: RunConfig, lagg: str, lopt: str,
                    tuned: Mapping[str, RunConfig], seeds: Sequence[int],
                    say: Callable[[str], None], out: Path, resume: bool = False):
    """Each setting: the learned optimizers (not retrained) vs every baseline — tuned
    again on the new task for 784-128-128, with the same change applied otherwise."""
    # (name, change to the task, learned optimizers run, tuning folder or None: the
    # baselines keep the meta-training task's settings)
    settings: list[tuple[str, dict[str, Any], tuple[str, ...], str | None]] = []
    if sc.big_rounds:
        big = {"model": "mlp:128,128:relu", "data": {"image_size": None},
               "rounds": sc.big_rounds}
        label = ("784-128-128 Fashion-MNIST" if base.data.name == "fashion_mnist"
                 else f"MLP 128-128 on {base.data.name}")
        settings.append((label, big, ("LAgg-A", "LOpt-A"), "tuning-big"))
    if sc.cifar_rounds:
        try:
            load_dataset("cifar10", data_dir=base.data.data_dir)  # cached for the runs
        except FileNotFoundError as exc:
            say(f"[joseph2025] conv-c10 skipped: {str(exc).split(';')[0]}")
        except (OSError, ValueError) as exc:  # on disk but unreadable: say so, go on
            say(f"[joseph2025] conv-c10 skipped: CIFAR-10 could not be read ({exc})")
        else:
            c10 = {"model": "cnn:c10", "data": {"name": "cifar10", "image_size": None},
                   "rounds": sc.cifar_rounds}
            settings.append(("conv-c10 CIFAR-10", c10, ("LAgg-A", "LOpt-A"), "tuning-c10"))
    for k in sc.other_workers:  # LAgg-A has one input channel per worker: K is fixed
        settings.append((f"K={k} workers", {"workers": {"num_workers": k}}, ("LOpt-A",),
                         None))
    for h in sc.other_local_steps:
        settings.append((f"H={h} local steps", {"workers": {"local_steps": h}},
                         ("LAgg-A", "LOpt-A"), None))
    rows, all_curves = [], {}
    for name, change, learned, folder in settings:
        methods = {"LAgg-A": _learned_config(base, lagg), "LOpt-A": _learned_config(base, lopt)}
        methods = {k: v for k, v in methods.items() if k in learned}
        if folder is not None:
            task = changed_config(base, **change, seed=TUNING_SEED)
            grids = sc.big_grids if sc.big_grids is not None else sc.grids
            for b in BASELINES:
                say(f"[joseph2025] tuning {b} on {name} ({change['rounds']} rounds per trial)")
                result = tune(task, b, budget=change["rounds"], grid=grids.get(b, {}),
                              out_dir=out / folder / b, progress=False,
                              resume=search_started(out / folder / b, resume))
                count_tuning_time(out / folder / b)
                # `change` is applied below again; it leaves a tuned config unchanged
                methods[b] = config_from_dict({**result["config"],
                                               "eval_every": base.eval_every})
            for label in learned:  # the workers' local lr, from the baselines' grid
                lr, trials = _tune_local_lr(methods[label], change, grids, out / folder / label,
                                            resume)
                say(f"[joseph2025] {label} on {name}: local lr {lr:g} "
                    f"({', '.join(f'{k:g}: {v:.4f}' for k, v in trials.items())})")
                if lr != methods[label].workers.local_lr:
                    as_trained = f"{label} (local lr {methods[label].workers.local_lr:g})"
                    methods[as_trained] = methods[label]
                    methods[label] = changed_config(methods[label], workers={"local_lr": lr})
        else:
            methods.update(tuned)
        curves = {}
        for label, cfg in methods.items():
            changed = merge(config_to_dict(cfg), change)
            h = change.get("workers", {}).get("local_steps")
            if label in ONE_STEP and h is not None:
                # a one-step baseline sees the K·H·B examples of a round in one batch
                changed["workers"].update(local_steps=1, batch_size=h * base.workers.batch_size)
            cfg2 = config_from_dict(changed)
            say(f"[joseph2025] generalization {name}: {label}")
            dataset = dataset_for(cfg2)
            curves[label] = run_curves(cfg2, dataset, sc.evals, seeds,
                                    out / "runs" / f"{slug(name)}-{slug(label)}.json", resume)
        finals = {label: mean_curve(runs)[-1][1] for label, runs in curves.items()}
        best = best_baseline(finals, [b for b in BASELINES if b in finals])
        for label in curves:
            hit = rounds_to_reach(curves[label], finals[best])
            rows.append({"setting": name, "method": label, "final_train_loss": finals[label],
                         "best_baseline": best, "rounds_to_target": hit,
                         "speedup": round(cfg2.rounds / hit, 2) if hit else None})
        all_curves[name] = curves
    return rows, all_curves


def _tune_local_lr(cfg: RunConfig, change: Mapping[str, Any],
                   grids: Mapping[str, Mapping[str, Sequence[Any]]], folder: Path,
                   resume: bool) -> tuple[float, dict[float, float]]:
    """The workers' local lr for a learned optimizer on a new task: the value of the
    baselines' `workers.local_lr` grid (or the paper's) with the lowest training loss on
    the tuning seed — the same choice every local-SGD baseline gets; the learned
    optimizer itself is not retrained. Returns (best lr, {lr: loss}); writes trials.csv."""
    values = {cfg.workers.local_lr}
    for b in BASELINES:
        if b not in ONE_STEP:  # the baselines that have workers with a local lr
            values.update(grids.get(b, {}).get("workers.local_lr", LOCAL_LRS))
    task = changed_config(cfg, **change)
    dataset = dataset_for(task)
    trials = {}
    for lr in sorted(values, reverse=True):
        trial = with_seed(task, TUNING_SEED, workers={"local_lr": lr})
        runs = run_curves(trial, dataset, 1, [TUNING_SEED], folder / f"local_lr-{lr!r}.json",
                       resume)
        trials[lr] = runs[0][-1]["train_loss"]
    finite = {lr: v for lr, v in trials.items() if math.isfinite(v)}
    best = min(finite, key=finite.get) if finite else cfg.workers.local_lr
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "trials.csv", [{"workers.local_lr": lr, "train_loss": v,
                                        "best": lr == best} for lr, v in trials.items()])
    return best, trials


def _write_curves(path: Path, curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]):
    rows = [{"method": label, "seed": seed, "round": row["round"],
             "train_loss": row["train_loss"], "test_accuracy": row["test_accuracy"]}
            for label, runs in curves.items() for seed, run in enumerate(runs) for row in run]
    write_csv(path, rows)


def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _write_report(path: Path, s: Mapping[str, Any], tuning_rows, speed_rows, sc: Scale,
                  base: RunConfig) -> None:
    lines = [
        "# Reproduction: Joseph et al. 2025 (LAgg-A / LOpt-A)",
        "",
        f"Produced by {provenance()}.",
        "",
        f"Scale `{s['scale']}`: {s['task']}, {s['rounds']} communication rounds, "
        f"{len(s['seeds'])} held-out seeds ({s['seeds'][0]}..{s['seeds'][-1]}); baselines "
        f"tuned by grid search at round {s['rounds']} on seed {TUNING_SEED}. "
        f"Learned optimizers: `{s['lagg']}`, `{s['lopt']}`. Wall time {s['wall_s']:.0f} s"
        + (f"; a resumed run: {s['read_back']} searches and runs were read back, and all "
           f"runs and tuning trials took {s['compute_s']:.0f} s when they ran."
           if s.get("read_back") else "."),
        "",
        "The paper reports that LAgg-A and LOpt-A reach the tuned baselines' loss in "
        "2–6× fewer communication rounds.",
        "",
        "## Tuned baselines",
        "",
        format_table(["baseline", "trials", "best setting", f"train loss @ {s['rounds']}"],
                     tuning_rows),
        "## Rounds to reach the target",
        "",
        f"Target: the best tuned baseline's ({s['best_baseline']}) mean training loss at "
        f"round {s['rounds']}, {s['target']:.4f}. Rounds are resolved to the evaluation "
        f"interval ({max(1, s['rounds'] // sc.evals)} rounds).",
        "",
        format_table(["method", f"train loss @ {s['rounds']}", "rounds to target", "speed-up"],
                     [[r["method"], _fmt(r["final_train_loss"]),
                       str(r["rounds_to_target"] or f"> {s['rounds']}"),
                       f"{r['speedup']:.2f}x" if r["speedup"] else "—"] for r in speed_rows]),
        "![loss vs rounds](loss_vs_rounds.png)",
        "",
    ]
    if s["generalization"]:
        lines += [
            "## Generalisation without retraining",
            "",
            "Each setting changes the task and runs the learned optimizers as trained (not "
            "retrained). On 784-128-128 every baseline is tuned again on that task "
            "(`tuning-big/`), and so on conv-c10 (`tuning-c10/`); there the learned "
            "optimizers' workers get the same choice of local learning rate as the "
            "baselines' (the grid's value with the lowest training loss on the tuning seed, "
            "`tuning-*/LAgg-A/trials.csv`), and a row '(local lr X)' shows them at the "
            "local lr they were meta-trained with when that differs. For other K and H the "
            "baselines keep the settings tuned on the meta-training task. The target is the "
            "best baseline's loss at the end.",
            "",
            format_table(["setting", "method", "final train loss", "rounds to target",
                          "speed-up"],
                         [[r["setting"], r["method"], _fmt(r["final_train_loss"]),
                           str(r["rounds_to_target"] or "not reached"),
                           f"{r['speedup']:.2f}x" if r["speedup"] else "—"]
                          for r in s["generalization"]]),
            "![generalization](generalization.png)",
            "",
        ]
    if not s.get("generalization_run", True):
        lines += ["Generalisation settings not run (`--no-generalization`).", ""]
    elif sc.cifar_rounds and not any(r["setting"].startswith("conv-c10")
                                     for r in s["generalization"]):
        lines += ["conv-c10 was not run: CIFAR-10 was not found on disk or could not be read "
                  "(put `cifar-10-batches-py/` or the archive in `$METAGG_DATA_DIR/cifar10/`, "
                  "check it with `metagg data check cifar10`, and run again).", ""]
    if base.data.name != "fashion_mnist":
        lines += [f"Dataset: `{base.data.name}` stands in for Fashion-MNIST at this scale.", ""]
    path.write_text("\n".join(lines))
