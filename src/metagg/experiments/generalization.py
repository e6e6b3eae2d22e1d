"""`metagg reproduce generalization`: learned aggregators on tasks no meta-training saw.

    metagg reproduce generalization --scale quick --out runs/gen
    reproduce_generalization("runs/gen", scale="quick", learned={"LAgg-A": "lagg:PATH"})

For every task of the held-out suite (`metagg.tasks.families.HELD_OUT`, which no task
family can draw):

1. every baseline (FedAvg, SlowMo, server Adam, one-step Adam, ...) is tuned there with
   `metagg.tune` at the horizon R, on a tuning seed no evaluation uses; the task's K, H
   and batch size are part of the task and are not tuned;
2. the tuned baselines and the learned aggregators — with **no per-task tuning at all**:
   their workers use the local lr they were meta-trained with — run on held-out seeds for
   `long`·R rounds;
3. per task: the target is the best tuned baseline's seed-mean training loss at R; rounds
   to reach it (searched up to `long`·R) give the speed-up R / rounds; the final loss
   ratios to the best baseline at R and at `long`·R; the seed spread (std of log loss at R)
   relative to the best baseline's. A mean loss below `FITTED` counts as 0, the task
   fitted (wine at R = 300: every adaptive method ends between 0 and 1e-5 nats, and ratios
   of such numbers are float32 noise); where the best baseline fitted the task by R the
   target is "fitted" and the speed-up is its rounds to get there / the method's;
4. over tasks: geometric mean and interquartile mean of the speed-ups (a task whose
   target is never reached counts as R / (`long`·R), an upper bound, and is flagged), and
   how many tasks each learned aggregator ends worse than the best baseline.

A gradient-mode learned aggregator (the RNN of Ji et al. 2019: `rnn:PATH`) is judged in
gradient mode — each of its M workers (the RNN's input width) sends one minibatch gradient
per round — against mean aggregation + server SGD and + server Adam tuned the same way on
the same M-worker task; its rows also say whether it is below every tuned baseline on
every seed at R and at `long`·R (the issue's target for a general RNN). Mean aggregation
+ Prodigy, parameter-free and untuned, runs beside them for reference, as local SGD +
server Prodigy does beside the local-SGD learned aggregators.

Writes, in --out: `tasks.csv` (per task and method), `summary.json`, `generalization.png`
(one panel per task) and `report.md`; `tuning/<task>/<baseline>/` and `runs/` (cached
curves: `resume=True` reuses them).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from metagg.checkpoint import atomic_write_text, json_text
from metagg.compare import format_table
from metagg.config import RunConfig, config_from_dict, config_to_dict
from metagg.experiments.runs import (
    ACCOUNT,
    best_baseline,
    changed_config,
    count_tuning_time,
    dataset_for,
    mean_curve,
    plot_panels,
    provenance,
    rounds_to_reach,
    run_curves,
    search_started,
    slug,
    write_csv,
)
from metagg.tasks.families import HELD_OUT, TaskSpec
from metagg.tune import BASELINES as TUNABLE
from metagg.tune import tune

__all__ = ["GRADIENT_KINDS", "GRADIENT_REFERENCES", "LOCAL_REFERENCES", "SCALES",
           "GeneralizationScale",
           "below_every_seed", "learned_local_lr", "reproduce_generalization", "summarize_task"]

TUNING_SEED = 10_000  # never an evaluation seed
# nats: a seed-mean training loss below this counts as 0 (the task fitted: p(correct) >
# 0.99999 on average), so ratios of float32 round-off near 0 rank no method
FITTED = 1e-5
DEFAULT_LEARNED = {"LAgg-A": "lagg:pretrained/general", "LOpt-A": "lopt:pretrained/general"}
GRADIENT_KINDS = ("rnn",)  # learned aggregators judged in gradient mode
# run beside them, untuned, as a reference (not a baseline of the target): the
# parameter-free server optimizer the RNN's "prodigy" output rule corrects
GRADIENT_REFERENCES = {"mean+prodigy": {"name": "prodigy", "lr": 1.0}}
# and beside the local-SGD learned ones: local SGD at the learned aggregators' default
# local lr with server Prodigy — no tuning at all, what a learned step has to add to
LOCAL_REFERENCES = {"fedavg+prodigy": (0.5, {"name": "prodigy", "lr": 1.0})}


@dataclass(frozen=True)
class GeneralizationScale:
    """How much of the suite to run."""

    tasks: tuple[TaskSpec, ...]
    rounds: int  # R: the baselines' tuning horizon
    long: int  # the runs go on to long·R
    seeds: int  # evaluation seeds 0..seeds-1
    evals: int  # evaluation points per R rounds
    baselines: tuple[str, ...]
    grids: Mapping[str, Mapping[str, Sequence[Any]]]  # per baseline; absent axes: the paper's
    max_trials: int | None = None  # sample at most this many grid points per baseline
    # the baselines of gradient-mode learned aggregators (one server step per gradient)
    gradient_baselines: tuple[str, ...] = ("sgd", "adam")
    gradient_grids: Mapping[str, Mapping[str, Sequence[Any]]] = field(default_factory=dict)


_QUICK_GRIDS = {
    "fedavg": {"workers.local_lr": [1.0, 0.5, 0.3, 0.1]},
    "slowmo": {"workers.local_lr": [1.0, 0.5, 0.3], "optimizer.lr": [1.0, 0.5, 0.3],
               "optimizer.beta": [0.95, 0.9, 0.7]},
    "fedadam": {"workers.local_lr": [1.0, 0.5, 0.1], "optimizer.lr": [0.1, 0.03, 0.01]},
    "adam": {"optimizer.lr": [0.03, 0.01, 3e-3]},
}
_QUICK_GRADIENT_GRIDS = {"sgd": {"optimizer.lr": [3.0, 1.0, 0.3, 0.1, 0.03]},
                         "adam": {"optimizer.lr": [0.1, 0.03, 0.01, 3e-3, 1e-3]}}
SCALES: dict[str, GeneralizationScale] = {
    # every held-out task, the paper's grids (SlowMo's 144 points sampled to 48)
    "full": GeneralizationScale(tasks=HELD_OUT, rounds=300, long=4, seeds=5, evals=30,
                                baselines=("fedavg", "slowmo", "fedadam", "sgd", "adam"),
                                grids={}, max_trials=48),
    # the held-out tasks that train in seconds per run and do not learn to ~0 loss
    # within 4R (wine does: it is in full only); Fashion-MNIST is skipped when absent
    "quick": GeneralizationScale(
        tasks=tuple(t for t in HELD_OUT if t.dataset.split(":")[0]
                    in ("digits", "breast_cancer", "synthetic", "fashion_mnist@28")),
        rounds=100, long=4, seeds=2, evals=10,
        baselines=("fedavg", "slowmo", "fedadam", "adam"), grids=_QUICK_GRIDS,
        gradient_grids=_QUICK_GRADIENT_GRIDS),
    # for tests
    "tiny": GeneralizationScale(
        tasks=tuple(t for t in HELD_OUT if t.dataset in ("wine", "breast_cancer")),
        rounds=6, long=2, seeds=2, evals=3, baselines=("fedavg", "slowmo"),
        grids={"fedavg": {"workers.local_lr": [0.3]},
               "slowmo": {"workers.local_lr": [0.3], "optimizer.lr": [0.5],
                          "optimizer.beta": [0.9]}},
        gradient_grids={"sgd": {"optimizer.lr": [0.3]}, "adam": {"optimizer.lr": [0.01]}}),
}


def learned_local_lr(spec: str, default: float = 0.5) -> float:
    """The workers' local lr a saved LAgg-A / LOpt-A was meta-trained with."""
    from metagg.learned.store import pretrained_for, read_aggregator_info

    kind, _, arg = spec.partition(":")
    if not arg or arg == "init":
        return default
    info = read_aggregator_info(pretrained_for(kind, arg))
    return float((info.get("trained_on") or {}).get("local_lr", default))


def _learned_config(task: TaskSpec, spec: str, rounds: int) -> RunConfig | None:
    """The learned aggregator `spec` on `task` at its own local lr; None where it cannot
    run (a fixed-K LAgg-A on another K)."""
    from metagg.aggregators.registry import build_aggregator

    kind, _, arg = spec.partition(":")
    aggregator = {"name": kind, "options": {"init": True}} if arg == "init" else {"name": spec}
    cfg = task.run_config(rounds=rounds, local_lr=learned_local_lr(spec))
    data = config_to_dict(cfg)
    data["aggregator"] = aggregator
    cfg = config_from_dict(data)
    agg = build_aggregator(cfg.aggregator.name, options=cfg.aggregator.options)
    fixed_k = getattr(getattr(agg, "config", None), "num_workers", 0)
    if fixed_k and fixed_k != task.num_workers:
        return None
    return cfg


def _by_width(learned: Mapping[str, str]) -> dict[int, dict[str, str]]:
    """Gradient-mode learned aggregators grouped by their number of workers M (the RNN's
    input width), each group run on the same M-worker tasks; loading them checks the
    files."""
    from metagg.aggregators.registry import build_aggregator

    groups: dict[int, dict[str, str]] = {}
    for label, spec in learned.items():
        m = build_aggregator(spec).config.num_workers
        groups.setdefault(m, {})[label] = spec
    return groups


def _local_section(task: TaskSpec, local: Mapping[str, str], base: RunConfig,
                   sc: GeneralizationScale, out: Path, resume: bool,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """The task as it is (local SGD): the tuned baselines, the untuned reference and the
    local-SGD learned aggregators, each run on the evaluation seeds."""
    name = task.name
    methods = _tuned(base, sc.baselines, sc.grids, task.local_steps, name, sc, out, resume,
                     say)
    if local:
        for method, (local_lr, optimizer) in LOCAL_REFERENCES.items():
            methods[method] = task.run_config(rounds=sc.rounds, local_lr=local_lr,
                                              optimizer=optimizer)
    for label, spec in local.items():
        cfg = _learned_config(task, spec, sc.rounds)
        if cfg is None:
            say(f"[generalization] {name}: {label} skipped (trained for another K)")
            continue
        methods[label] = cfg
    return _curves(methods, name, sc, out, resume, say)


def _gradient_section(task: TaskSpec, m: int, group: Mapping[str, str],
                      sc: GeneralizationScale, out: Path, resume: bool,
                      say: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """The task in gradient mode with M = m workers (H = 1): mean + server SGD / Adam
    tuned there, the untuned reference and the RNNs of width m. Returns (label, curves)."""
    gtask = replace(task, num_workers=m, local_steps=1)
    label = f"{gtask.name} (gradient mode)"
    base = gtask.run_config(rounds=sc.rounds, seed=TUNING_SEED, checkpoint_every=0,
                            mode="gradient")
    methods = _tuned(base, sc.gradient_baselines, sc.gradient_grids, 1, label, sc, out,
                     resume, say)
    for method, optimizer in GRADIENT_REFERENCES.items():
        methods[method] = gtask.run_config(rounds=sc.rounds, mode="gradient",
                                           optimizer=optimizer)
    for method, spec in group.items():
        methods[method] = gtask.run_config(rounds=sc.rounds, mode="gradient", aggregator=spec)
    return label, _curves(methods, label, sc, out, resume, say)


def _tuned(base: RunConfig, baselines: Sequence[str],
           grids: Mapping[str, Mapping[str, Sequence[Any]]], local_steps: int, name: str,
           sc: GeneralizationScale, out: Path, resume: bool,
           say: Callable[[str], None]) -> dict[str, RunConfig]:
    """Every baseline tuned on `base` at R (H fixed: it belongs to the task)."""
    methods: dict[str, RunConfig] = {}
    for b in baselines:
        say(f"[generalization] {name}: tuning {b} ({sc.rounds} rounds per trial)")
        folder = out / "tuning" / slug(name) / b
        grid = {**grids.get(b, {})}
        if not TUNABLE[b].one_step:
            grid["workers.local_steps"] = [local_steps]
        result = tune(base, b, budget=sc.rounds, out_dir=folder, grid=grid,
                      max_trials=sc.max_trials, progress=False,
                      resume=search_started(folder, resume))
        count_tuning_time(folder)
        methods[b] = config_from_dict(result["config"])
    return methods


def _curves(methods: Mapping[str, RunConfig], name: str, sc: GeneralizationScale, out: Path,
            resume: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Each method on the evaluation seeds for long·R rounds (cached in out/runs)."""
    horizon = sc.long * sc.rounds
    curves = {}
    for label, cfg in methods.items():
        cfg = changed_config(cfg, rounds=horizon, checkpoint_every=0)
        say(f"[generalization] {name}: {label}, {sc.seeds} seeds x {horizon} rounds")
        curves[label] = run_curves(cfg, dataset_for(cfg), sc.evals * sc.long,
                                   list(range(sc.seeds)),
                                   out / "runs" / f"{slug(name)}-{slug(label)}.json", resume)
    return curves


def summarize_task(curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
                   baselines: Sequence[str], rounds: int) -> list[dict[str, Any]]:
    """Per method: loss at R and at the end, ratios to the best baseline, rounds to the
    target (the best baseline's loss at R), speed-up, seed spread (see the module
    docstring), and whether it is below every (other) baseline on every seed at R and at
    the end. `curves[label]` are the seeds' runs (the same seeds, in the same order),
    evaluated at R among other rounds."""
    def loss_at(runs, r):
        return next((v for t, v in mean_curve(runs) if t == r), math.nan)

    def spread(runs):  # std over seeds of log(loss at R)
        logs = [math.log(max(next(row["train_loss"] for row in run if row["round"] == rounds),
                             FITTED)) for run in runs]
        return statistics.pstdev(logs) if len(logs) > 1 else 0.0

    end = min(mean_curve(runs)[-1][0] for runs in curves.values())
    at_r = {m: loss_at(runs, rounds) for m, runs in curves.items()}
    at_end = {m: loss_at(runs, end) for m, runs in curves.items()}
    best = best_baseline(at_r, baselines)
    best_end = min((at_end[b] for b in baselines if math.isfinite(at_end[b])), default=math.nan)
    target = fitted(at_r[best])
    best_rounds = rounds
    if target == 0.0:  # of the baselines that fitted the task by R, the first to
        best = min((b for b in baselines if fitted(at_r[b]) == 0.0),
                   key=lambda b: rounds_to_reach(curves[b], FITTED) or rounds)
        best_rounds = rounds_to_reach(curves[best], FITTED) or rounds
    rows = []
    for method, runs in curves.items():
        hit = rounds_to_reach(runs, FITTED if target == 0.0 else target)
        rows.append({
            "method": method, "baseline": method in baselines, "best_baseline": best,
            "loss_at_R": at_r[method], "loss_at_end": at_end[method],
            "ratio_at_R": loss_ratio(fitted(at_r[method]), target),
            "ratio_at_end": loss_ratio(fitted(at_end[method]), fitted(best_end)),
            "rounds_to_target": hit, "speedup": best_rounds / hit if hit else None,
            "spread_ratio": (spread(runs) / spread(curves[best]) if spread(curves[best]) > 0
                             else math.nan),
            "local_lr_at_end": final_local_lr(runs),
            "below_every_seed_at_R": below_every_seed(curves, method, baselines, rounds),
            "below_every_seed_at_end": below_every_seed(curves, method, baselines, end),
        })
    return rows


def fitted(loss: float) -> float:
    """`loss`, or 0.0 where it is below `FITTED` (the task fitted)."""
    return 0.0 if loss < FITTED else loss


def loss_ratio(loss: float, best: float) -> float:
    """loss / best, where a fitted task (see `fitted`) gives 1 if `loss` is 0 too and inf
    otherwise, instead of dividing by zero."""
    if best == 0.0:
        return 1.0 if loss == 0.0 else math.inf
    return loss / best


def below_every_seed(curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], method: str,
                     baselines: Sequence[str], round_: int) -> bool:
    """Whether `method`'s training loss at `round_` is below every other baseline's on
    every seed (seed i against seed i); False where a loss is missing or not finite."""
    def losses(runs):
        return [next((row["train_loss"] for row in run if row["round"] == round_), math.nan)
                for run in runs]

    mine = [fitted(v) for v in losses(curves[method])]
    others = [[fitted(v) for v in losses(curves[b])] for b in baselines if b != method]
    return bool(others) and all(
        all(math.isfinite(v) and v < o[i] for o in others) for i, v in enumerate(mine))


def final_local_lr(runs: Sequence[Sequence[Mapping[str, Any]]]) -> float | None:
    """The workers' local lr at the end, mean over seeds (None where not recorded)."""
    last = [run[-1].get("local_lr") for run in runs]
    return statistics.fmean(last) if last and None not in last else None


def _iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle half (Agarwal et al. 2021)."""
    v = sorted(values)
    n = len(v)
    cut = n // 4
    middle = v[cut:n - cut] if n - 2 * cut > 0 else v
    return statistics.fmean(middle)


def select_scale(sc: GeneralizationScale, *, seeds: int | None = None,
                 tasks: Sequence[str] | None = None) -> GeneralizationScale:
    """`sc` with `seeds` evaluation seeds and only the `tasks` named (by dataset or full
    task name); None keeps the scale's own. An unknown name is an error that lists the
    scale's tasks."""
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"seeds: must be an integer >= 1, got {seeds!r}")
        sc = replace(sc, seeds=seeds)
    if tasks:
        def matches(task: TaskSpec, name: str) -> bool:
            return name in (task.name, task.dataset, task.dataset.split("@")[0].split(":")[0])

        unknown = [n for n in tasks if not any(matches(t, n) for t in sc.tasks)]
        if unknown:
            raise ValueError(f"tasks {unknown} are not in this scale; choose from: "
                             f"{', '.join(t.name for t in sc.tasks)} (a dataset name "
                             f"such as 'digits' selects its tasks)")
        sc = replace(sc, tasks=tuple(t for t in sc.tasks if any(matches(t, n) for n in tasks)))
    return sc


def reproduce_generalization(
    out_dir: str | Path,
    *,
    scale: str = "quick",
    learned: Mapping[str, str] | None = None,
    resume: bool = False,
    seeds: int | None = None,
    tasks: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the held-out suite at `scale` ("quick", "full"; "tiny" for tests) into `out_dir`.

    `learned` maps a label to an aggregator spec (default: the shipped general LAgg-A and
    LOpt-A). `seeds` replaces the scale's number of evaluation seeds (0..seeds-1); `tasks`
    keeps only the scale's tasks whose dataset (e.g. "digits", "breast_cancer") or full
    name is listed. Returns the numbers in report.md."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
    sc = select_scale(SCALES[scale], seeds=seeds, tasks=tasks)
    learned = dict(learned or DEFAULT_LEARNED)
    unknown = [b for b in sc.baselines if b not in TUNABLE]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    ACCOUNT.update(read_back=0, compute_s=0.0)
    gradient = {k: v for k, v in learned.items() if v.partition(":")[0] in GRADIENT_KINDS}
    local = {k: v for k, v in learned.items() if k not in gradient}
    for spec in local.values():  # a missing file fails now, not after tuning
        _learned_config(HELD_OUT[0], spec, sc.rounds)
    widths = _by_width(gradient)

    rows, panels, marks, skipped = [], {}, {}, {}
    for task in sc.tasks:
        name = task.name
        base = task.run_config(rounds=sc.rounds, seed=TUNING_SEED, checkpoint_every=0)
        try:
            dataset_for(base)
        except FileNotFoundError as exc:  # e.g. Fashion-MNIST not installed: say so, go on
            skipped[name] = " ".join(str(exc).split())
            say(f"[generalization] {name}: skipped ({skipped[name]})")
            continue
        if local or not gradient:
            curves = _local_section(task, local, base, sc, out, resume, say)
            for row in summarize_task(curves, sc.baselines, sc.rounds):
                rows.append({"task": name, "mode": "local_sgd", **row})
            panels[name], marks[name] = curves, sc.rounds
        for m, group in widths.items():
            label, curves = _gradient_section(task, m, group, sc, out, resume, say)
            for row in summarize_task(curves, sc.gradient_baselines, sc.rounds):
                rows.append({"task": label, "mode": "gradient", **row})
            panels[label], marks[label] = curves, sc.rounds

    if not rows:
        raise FileNotFoundError(f"no held-out task could be loaded: {skipped}")
    write_csv(out / "tasks.csv", rows)
    plot_panels(panels, out / "generalization.png", mark_round=marks)
    aggregate = {label: _aggregate([r for r in rows if r["method"] == label], sc)
                 for label in learned}
    summary = {"scale": scale, "rounds": sc.rounds, "long": sc.long,
               "seeds": list(range(sc.seeds)), "tasks": [t.name for t in sc.tasks],
               "learned": learned, "aggregate": aggregate,
               "baselines": list(sc.baselines) if local or not gradient else [],
               "gradient_learned": list(gradient),
               "gradient_baselines": list(sc.gradient_baselines),
               "skipped": skipped,
               "rows": rows, "read_back": ACCOUNT["read_back"],
               "compute_s": round(ACCOUNT["compute_s"], 1),
               "wall_s": round(time.perf_counter() - start, 1)}
    atomic_write_text(out / "summary.json", json_text(summary, indent=2))
    _write_report(out / "report.md", summary, sc)
    say(f"[generalization] done in {summary['wall_s']:.0f} s: {out / 'report.md'}")
    return summary


def _aggregate(rows: Sequence[Mapping[str, Any]], sc: GeneralizationScale) -> dict[str, Any]:
    """Over the tasks a learned aggregator ran on: geometric mean / IQM of the speed-ups
    (unreached: the bound 1/long), tasks worse than the best baseline at R and at the end."""
    if not rows:
        return {"tasks": 0}
    speed = [r["speedup"] if r["speedup"] else 1.0 / sc.long for r in rows]
    return {
        "tasks": len(rows),
        "geomean_speedup": math.exp(statistics.fmean(math.log(s) for s in speed)),
        "iqm_speedup": _iqm(speed),
        "unreached": sum(1 for r in rows if not r["speedup"]),
        "worse_at_R": sum(1 for r in rows if not r["ratio_at_R"] <= 1.0),
        "worse_at_end": sum(1 for r in rows if not r["ratio_at_end"] <= 1.0),
        "below_every_seed": sum(1 for r in rows
                                if r["below_every_seed_at_R"] and r["below_every_seed_at_end"]),
    }


def _fmt(v: Any, digits: int = 3) -> str:
    if v == math.inf:
        return "∞"
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _write_report(path: Path, s: Mapping[str, Any], sc: GeneralizationScale) -> None:
    end = s["rounds"] * s["long"]
    local = [k for k in s["learned"] if k not in s["gradient_learned"]]

    def named(labels):
        return ", ".join(f"{k}: `{s['learned'][k]}`" for k in labels)

    lines = [
        "# Learned aggregators on held-out tasks",
        "",
        f"Produced by {provenance()}.",
        "",
        f"Scale `{s['scale']}`: {len(s['tasks']) - len(s['skipped'])} held-out tasks (none "
        f"can be drawn by a "
        f"meta-training task family), R = {s['rounds']} rounds, runs to {end}, seeds "
        f"{s['seeds'][0]}..{s['seeds'][-1]}. Wall time {s['wall_s']:.0f} s.",
        "",
        *([f"Baselines ({', '.join(s['baselines'])}) tuned on each task at R on seed "
           f"{TUNING_SEED}; the learned aggregators "
           f"({named(local)}) with **no per-task "
           f"tuning** (their workers' local lr is the one they were meta-trained with, or "
           f"their own choice each round where they set it: last column)"
           + (f"; {', '.join(LOCAL_REFERENCES)} (local lr 0.5, server Prodigy: untuned) is "
              f"shown for reference and is not a baseline of the comparison." if local
              else "."), ""]
          if s["baselines"] else []),
        *([f"Gradient-mode learned aggregators "
           f"({named(s['gradient_learned'])}), with "
           f"**no per-task tuning**, run on the same tasks in gradient mode (tasks marked "
           f"`gradient mode`: K = M workers, the RNN's input width, each sending one "
           f"minibatch gradient per round: H = 1) against mean aggregation + server "
           f"{' and + server '.join(s['gradient_baselines'])}, each tuned there at R on seed "
           f"{TUNING_SEED}; {', '.join(GRADIENT_REFERENCES)} (parameter-free, untuned) is "
           f"shown for reference and is not a baseline of the comparison.", ""]
          if s["gradient_learned"] else []),
        "## Over tasks",
        "",
        format_table(
            ["learned", "tasks", "geo-mean speed-up", "IQM speed-up", "target not reached",
             f"worse than best baseline @ {s['rounds']}", f"worse @ {end}",
             "below every baseline on every seed"],
            [[label, str(a.get("tasks", 0)), _fmt(a.get("geomean_speedup"), 2),
              _fmt(a.get("iqm_speedup"), 2), str(a.get("unreached", "—")),
              str(a.get("worse_at_R", "—")), str(a.get("worse_at_end", "—")),
              str(a.get("below_every_seed", "—"))]
             for label, a in s["aggregate"].items()]),
        f"Speed-up = R / rounds to reach the best tuned baseline's loss at R (searched to "
        f"{end}); a task where it is never reached counts as 1/{s['long']} (an upper bound). "
        f"A mean loss below {FITTED:g} nats counts as 0, the task fitted; where the best "
        f"baseline fitted it by R, the target is the first baseline to fit it, and the "
        f"speed-up is its rounds to get there / the method's. "
        f"Below every baseline: tasks where its training loss is below every tuned "
        f"baseline's on every seed, both at {s['rounds']} and at {end}.",
        "",
        "## Per task",
        "",
        format_table(
            ["task", "method", f"loss @ {s['rounds']}", "ratio to best", f"loss @ {end}",
             "ratio to best", "rounds to target", "speed-up", "spread ratio",
             "local lr @ end", "below all, every seed @ R / end"],
            [[r["task"], r["method"] + (" (best)" if r["method"] == r["best_baseline"] else ""),
              _fmt(r["loss_at_R"], 4), _fmt(r["ratio_at_R"]), _fmt(r["loss_at_end"], 4),
              _fmt(r["ratio_at_end"]), str(r["rounds_to_target"] or f"> {end}"),
              _fmt(r["speedup"], 2), _fmt(r["spread_ratio"], 2),
              _fmt(r.get("local_lr_at_end"), 3),
              f"{_yes(r['below_every_seed_at_R'])} / {_yes(r['below_every_seed_at_end'])}"]
             for r in s["rows"]]),
        "Ratios are to the best tuned baseline (at R: the one with the lowest loss at R; at "
        f"{end}: the lowest of the baselines there). Spread ratio: the std over seeds of "
        "log(loss at R) relative to the best baseline's.",
        "",
        "![loss vs rounds per held-out task](generalization.png)",
        "",
    ]
    for name, why in s["skipped"].items():
        lines += [f"Skipped `{name}`: {why}", ""]
    path.write_text("\n".join(lines))
