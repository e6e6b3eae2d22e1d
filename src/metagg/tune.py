"""Grid search for the baselines learned optimizers are compared with (Joseph et al. 2025).

    metagg tune configs/fmnist8x8-local-sgd.yaml --baseline slowmo --budget 300 --out runs/tune
    best = tune(cfg, "slowmo", budget=300, out_dir="runs/tune")   # Python

Every grid point trains from scratch for `budget` communication rounds on `seeds`
seeds and is scored by its final training loss (mean over seeds; the paper compares
optimizers by training loss at a fixed number of rounds). The grids are the paper's:

    local lr      {1, .5, .3, .1}
    server lr     1 … 1e-5 (half-decade log grid)
    SlowMo β      {.99, .95, .9, .8, .7, .55}
    local steps H {4, 8, 16, 32}

SlowMo's slow learning rate α uses {1, .5, .3, .1, .03, .01}: below that SlowMo
cannot move within any budget worth tuning for. `grid={"workers.local_steps": [4]}`
(CLI `--grid workers.local_steps=4`) fixes or replaces any axis, e.g. to keep the H
a learned optimizer was trained for; `max_trials` samples that many grid points
(seeded) when the full product is too large.

The one-step baselines (`sgd`, `adam`) take one server step per round on the same
K·H·B examples the local-SGD baselines see: gradient mode with per-worker batch H·B.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metagg.checkpoint import atomic_write_text, json_text
from metagg.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_value,
)

__all__ = ["BASELINES", "Baseline", "parse_grid", "trial_config", "tune"]

LOCAL_LRS = (1.0, 0.5, 0.3, 0.1)
SERVER_LRS = (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
SLOWMO_LRS = (1.0, 0.5, 0.3, 0.1, 0.03, 0.01)
SLOWMO_BETAS = (0.99, 0.95, 0.9, 0.8, 0.7, 0.55)
LOCAL_STEPS = (4, 8, 16, 32)
METRICS = ("train_loss", "test_loss", "test_accuracy")


@dataclass(frozen=True)
class Baseline:
    """A baseline: fixed config settings and the grid searched over (config keys)."""

    description: str
    fixed: Mapping[str, Any]
    grid: Mapping[str, Sequence[Any]]
    one_step: bool = False  # one server step per round on the K·H·B examples


BASELINES: dict[str, Baseline] = {
    "fedavg": Baseline(
        "local SGD, mean of the pseudo-gradients, server SGD lr 1",
        {"workers.mode": "local_sgd", "aggregator.name": "mean", "optimizer.name": "sgd",
         "optimizer.lr": 1.0},
        {"workers.local_lr": LOCAL_LRS, "workers.local_steps": LOCAL_STEPS},
    ),
    "slowmo": Baseline(
        "local SGD + SlowMo (slow momentum on the mean pseudo-gradient)",
        {"workers.mode": "local_sgd", "aggregator.name": "mean", "optimizer.name": "slowmo"},
        {"workers.local_lr": LOCAL_LRS, "optimizer.lr": SLOWMO_LRS,
         "optimizer.beta": SLOWMO_BETAS, "workers.local_steps": LOCAL_STEPS},
    ),
    "fedadam": Baseline(
        "local SGD + server Adam on the mean pseudo-gradient",
        {"workers.mode": "local_sgd", "aggregator.name": "mean", "optimizer.name": "adam"},
        {"workers.local_lr": LOCAL_LRS, "optimizer.lr": SERVER_LRS,
         "workers.local_steps": LOCAL_STEPS},
    ),
    "sgd": Baseline(
        "one SGD step per round on the K·H·B examples (no local steps)",
        {"aggregator.name": "mean", "optimizer.name": "sgd"},
        {"optimizer.lr": SERVER_LRS},
        one_step=True,
    ),
    "adam": Baseline(
        "one Adam step per round on the K·H·B examples (no local steps)",
        {"aggregator.name": "mean", "optimizer.name": "adam"},
        {"optimizer.lr": SERVER_LRS},
        one_step=True,
    ),
}


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """`["optimizer.lr=0.1,0.01", "workers.local_steps=4"]` → {key: [values]} (YAML values)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. optimizer.lr=0.1,0.01")
        grid[key.strip()] = [parse_value(v) for v in values.split(",") if v.strip()]
    return grid


def trial_config(cfg: RunConfig, baseline: str, point: Mapping[str, Any], budget: int,
                 seed: int) -> RunConfig:
    """The config one trial runs: `cfg` + the baseline's fixed settings + one grid point."""
    if baseline not in BASELINES:
        raise ConfigError(f"unknown baseline {baseline!r}; allowed: {', '.join(BASELINES)}")
    b = BASELINES[baseline]
    settings = {**b.fixed, **point, "rounds": budget, "eval_every": budget, "seed": seed}
    if b.one_step:
        # the examples a local-SGD round would see, in one step: per-worker batch H·B
        h = int(point.get("workers.local_steps", cfg.workers.local_steps))
        settings.update({"workers.mode": "gradient", "workers.local_steps": 1,
                         "workers.batch_size": h * cfg.workers.batch_size})
    data = json.loads(json.dumps(config_to_dict(cfg)))  # a deep copy
    overrides = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
    return config_from_dict(apply_overrides(data, overrides))


def _grid_points(baseline: str, grid: Mapping[str, Sequence[Any]], max_trials: int | None,
                 seed: int) -> list[dict[str, Any]]:
    axes = {**BASELINES[baseline].grid, **grid}
    keys = list(axes)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]
    if max_trials is not None and len(points) > max_trials:
        points = random.Random(seed).sample(points, max_trials)
    return points


def tune(
    cfg: RunConfig,
    baseline: str,
    *,
    budget: int,
    out_dir: str | Path | None = None,
    seeds: int = 1,
    grid: Mapping[str, Sequence[Any]] | None = None,
    metric: str = "train_loss",
    max_trials: int | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Grid-search `baseline` on the task in `cfg`; return (and write) the best setting.

    Args:
        cfg: the task (model, data, workers, K, B); its aggregator/optimizer are replaced.
        baseline: one of `BASELINES` (fedavg, slowmo, fedadam, sgd, adam).
        budget: communication rounds per trial; the score is `metric` at that round.
        out_dir: writes trials.jsonl (each trial as it finishes), trials.csv (every grid
            point), best.yaml (a runnable config) and summary.json.
        seeds: seeds per grid point (cfg.seed, cfg.seed + 1, ...); the score is the mean.
        grid: replaces or adds axes, {config key: values}.
        metric: train_loss (default) or test_loss (lower is better), or
            test_accuracy (higher is better).
        max_trials: sample this many grid points (seeded by cfg.seed) if there are more.
        on_trial: called with each finished trial's row.
        progress: tqdm bar (default: only on a terminal).
        resume: keep the trials already in out_dir/trials.csv (written as each trial
            finishes) and run only the others; the search must be the same one.

    Returns:
        {"baseline", "metric", "score", "best": {key: value}, "trials", "config": dict}.
    """
    from metagg.simulation import Simulation, load_run_dataset

    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if budget < 1 or seeds < 1:
        raise ConfigError(f"budget and seeds must be >= 1, got budget={budget}, seeds={seeds}")
    points = _grid_points(baseline, grid or {}, max_trials, cfg.seed)
    for point in points:  # every config error before the first trial runs
        trial_config(cfg, baseline, point, budget, cfg.seed)
    dataset = load_run_dataset(cfg)
    sign = -1.0 if metric == "test_accuracy" else 1.0  # lower score is better
    search = {"baseline": baseline, "budget": budget, "seeds": seeds, "metric": metric,
              "points": points, "task": config_to_dict(cfg)}
    done = _start_trials_file(out_dir, search, resume)

    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points), desc=f"tune {baseline}", unit="trial", leave=False)
    rows: list[dict[str, Any]] = []
    try:
        for i, point in enumerate(points):
            if i in done:
                rows.append({"trial": i, **point, **done[i]})
                if bar is not None:
                    bar.update(1)
                continue
            start = time.perf_counter()
            values, diverged = [], False
            for s in range(seeds):
                sim = Simulation(trial_config(cfg, baseline, point, budget, cfg.seed + s),
                                 dataset=dataset)
                for _ in range(budget):
                    sim.step()
                ev = sim.evaluate()
                values.append(ev[metric])
                # a run whose loss blew up has diverged whatever its accuracy says
                diverged |= not (math.isfinite(ev[metric]) and math.isfinite(ev["train_loss"]))
            mean = statistics.fmean(values) if not diverged else math.nan
            row = {"trial": i, **point, metric: mean,
                   "std": statistics.pstdev(values) if not diverged else math.nan,
                   "seeds": seeds, "diverged": diverged,
                   "wall_s": round(time.perf_counter() - start, 2)}
            rows.append(row)
            if out_dir is not None:
                _append_trial(Path(out_dir), row)
            if on_trial is not None:
                on_trial(row)
            if bar is not None:
                bar.update(1)
                best_so_far = _best(rows, metric, sign)
                if best_so_far is not None:
                    bar.set_postfix({metric: f"{best_so_far[metric]:.4f}"})
    finally:
        if bar is not None:
            bar.close()

    best = _best(rows, metric, sign)
    if best is None:
        raise RuntimeError(f"every {baseline} trial diverged; widen the grid (--grid)")
    best_point = {k: best[k] for k in points[0]}
    best_cfg = trial_config(cfg, baseline, best_point, budget, cfg.seed)
    best_cfg.eval_every = cfg.eval_every
    result = {"baseline": baseline, "metric": metric, "score": best[metric],
              "std": best["std"], "best": best_point, "budget": budget, "seeds": seeds,
              "trials": len(rows), "config": config_to_dict(best_cfg)}
    if out_dir is not None:
        _write(Path(out_dir), rows, result, baseline)
    return result


def _best(rows: list[dict[str, Any]], metric: str, sign: float) -> dict[str, Any] | None:
    ok = [r for r in rows if not r["diverged"]]
    return min(ok, key=lambda r: (sign * r[metric], r["std"], r["trial"])) if ok else None


def _start_trials_file(out_dir: str | Path | None, search: dict[str, Any],
                       resume: bool) -> dict[int, dict[str, Any]]:
    """Prepare out_dir for a search; with `resume`, the results of finished trials."""
    if out_dir is None:
        if resume:
            raise ConfigError("resume needs an output directory")
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, trials = out / "search.json", out / "trials.jsonl"
    mine = json.loads(json.dumps(search))
    if not resume:
        atomic_write_text(state, json.dumps(mine, indent=1))
        atomic_write_text(trials, "")
        return {}
    if not state.exists():
        raise ConfigError(f"nothing to resume in {out}: no search.json")
    saved = json.loads(state.read_text())
    try:  # through the parser: config keys added since it was written take their defaults
        saved["task"] = json.loads(json.dumps(config_to_dict(config_from_dict(saved["task"]))))
    except (KeyError, TypeError, ConfigError):
        pass  # then it differs below
    if saved != mine:
        raise ConfigError(f"{out} holds a different search (baseline, budget, seeds, metric, "
                          f"grid or task changed); use another --out or drop --resume")
    done, good = {}, []
    for line in trials.read_text().splitlines() if trials.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line: that trial runs again
        good.append(line)
        # a diverged trial's metric and std are NaN, written as null
        done[row.pop("trial")] = {k: math.nan if row[k] is None else row[k]
                                  for k in (search["metric"], "std", "seeds", "diverged",
                                            "wall_s")}
    atomic_write_text(trials, "".join(line + "\n" for line in good))  # drop a torn tail
    return done


def _append_trial(out: Path, row: dict[str, Any]) -> None:
    with open(out / "trials.jsonl", "a") as fh:
        fh.write(json_text(row) + "\n")


def _write(out: Path, rows: list[dict[str, Any]], result: dict[str, Any], baseline: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    setting = ", ".join(f"{k}={v}" for k, v in result["best"].items())
    header = (f"# best {baseline} found by `metagg tune` ({result['trials']} trials, "
              f"{result['budget']} rounds, {result['seeds']} seed(s)):\n"
              f"# {setting} -> {result['metric']} {result['score']:.4f}\n"
              f"# metagg run {out / 'best.yaml'} --out runs/{baseline}\n")
    config = dict(result["config"])
    config["rounds"] = result["budget"]
    atomic_write_text(out / "best.yaml", header + yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(out / "summary.json", json_text(result, indent=2))
