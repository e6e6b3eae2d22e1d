"""Evaluation runs shared by the paper reproductions and the generalisation suite.

    curves = run_curves(cfg, dataset, evals=30, seeds=[0, 1], cache=out / "runs/x.json",
                        resume=True)                    # per seed: [{round, train_loss, ...}]
    rounds_to_reach(curves, target)                     # first round the seed mean is <= target

A run is `Simulation` on a config, evaluated at `evals` points; `run_curves` caches every
seed's curve in a JSON file keyed by the config, seeds, evaluation count and the learned
weights' checksum, so an interrupted reproduction resumed with `resume=True` reads back
what it finished. `ACCOUNT` counts what was read back and the seconds the runs took.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from metagg.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from metagg.data import Dataset
from metagg.learned.store import weights_sha256
from metagg.simulation import Simulation, load_run_dataset

__all__ = [
    "ACCOUNT",
    "best_baseline",
    "changed_config",
    "count_tuning_time",
    "dataset_for",
    "mean_curve",
    "merge",
    "plot_panels",
    "provenance",
    "rounds_to_reach",
    "run_curve",
    "run_curves",
    "search_started",
    "slug",
    "with_seed",
    "write_csv",
]


def provenance() -> str:
    """What produced a report, for its header: metagg version and git commit (with
    "+ local changes" when the checkout differs from it), torch version and threads,
    whether the workers were compiled, Python. A re-run that does not give the same
    tables starts from this line."""
    from metagg import __version__
    from metagg.compiling import describe_setting

    src = Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=src, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        commit = git("rev-parse", "--short=10", "HEAD")
        commit += " + local changes" if git("status", "--porcelain", "--untracked-files=no") \
            else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (not a git checkout)"
    threads = torch.get_num_threads()
    return (f"metagg {__version__} (commit {commit}), torch {torch.__version__}, "
            f"{threads} torch thread{'s' if threads > 1 else ''}, "
            f"{describe_setting()}, Python "
            f"{platform.python_version()}")


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out



def run_curve(cfg: RunConfig, dataset: Dataset, evals: int) -> list[dict[str, Any]]:
    """Train for cfg.rounds; the training loss and test accuracy at `evals` points (and,
    in local-SGD mode, the workers' local lr for the next round: an aggregator may set it)."""
    sim = Simulation(cfg, dataset=dataset)
    every = max(1, cfg.rounds // evals)

    def row() -> dict[str, Any]:
        out = {"round": sim.round, **sim.evaluate()}
        if cfg.workers.mode == "local_sgd":
            out["local_lr"] = sim.server.round_local_lr()
        return out

    rows = [row()]
    while sim.round < cfg.rounds:
        sim.step()
        if sim.round % every == 0 or sim.round == cfg.rounds:
            rows.append(row())
    return rows


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text)


def search_started(folder: Path, resume: bool) -> bool:
    """Resume a search only where one was started (tune refuses an empty folder)."""
    started = resume and (folder / "search.json").is_file()
    ACCOUNT["read_back"] += started
    return started


def count_tuning_time(folder: Path) -> None:
    """Count a finished search's trial time (trials.csv) into the compute time."""
    with open(folder / "trials.csv") as fh:
        ACCOUNT["compute_s"] += sum(float(r["wall_s"] or 0) for r in csv.DictReader(fh))


# for the report: searches and runs read back by a resume, and the seconds every run and
# trial took when it ran (read back ones included), so a resumed report stays informative
ACCOUNT = {"read_back": 0, "compute_s": 0.0}


def run_curves(cfg: RunConfig, dataset: Dataset, evals: int, seeds: Sequence[int],
            cache: Path, resume: bool) -> list[list[dict[str, Any]]]:
    """`run_curve` for every seed, written to `cache` when done; with `resume`, a cache of
    the same config, seeds, evals and learned weights is read instead of training again."""
    key = json.loads(json.dumps({"config": config_to_dict(cfg), "seeds": list(seeds),
                                 "evals": evals, "weights": weights_sha256(cfg.aggregator.name)}))
    if resume and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            # config keys added since the cache was written take their defaults
            saved["key"]["config"] = config_to_dict(config_from_dict(saved["key"]["config"]))
        except (OSError, ValueError, TypeError, KeyError, ConfigError):
            saved = {}
        if saved.get("key") == key:
            ACCOUNT["read_back"] += 1
            ACCOUNT["compute_s"] += float(saved.get("wall_s", 0.0))
            return saved["curves"]
    start = time.perf_counter()
    curves = [run_curve(with_seed(cfg, s), dataset, evals) for s in seeds]
    wall = round(time.perf_counter() - start, 2)
    ACCOUNT["compute_s"] += wall
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "curves": curves, "wall_s": wall}))
    tmp.replace(cache)  # atomic: a killed run leaves the old file or the new one
    return curves


def mean_curve(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[tuple[int, float]]:
    n = min(len(r) for r in runs)
    return [(runs[0][i]["round"], statistics.fmean(r[i]["train_loss"] for r in runs))
            for i in range(n)]


def best_baseline(finals: Mapping[str, float], baselines: Sequence[str]) -> str:
    """The baseline with the lowest final loss; a diverged (NaN/inf) one never wins."""
    finite = [b for b in baselines if math.isfinite(finals[b])]
    if not finite:
        raise RuntimeError(f"every tuned baseline diverged ({finals}); no target loss")
    return min(finite, key=lambda b: finals[b])


def rounds_to_reach(runs: Sequence[Sequence[Mapping[str, Any]]], target: float) -> int | None:
    """First evaluated round at which the seed-mean training loss is <= target."""
    return next((r for r, loss in mean_curve(runs) if loss <= target), None)



def changed_config(cfg: RunConfig, **over: Any) -> RunConfig:
    """`cfg` with the (nested) settings `over` changed."""
    return config_from_dict(merge(config_to_dict(cfg), over))


def with_seed(cfg: RunConfig, seed: int, **over: Any) -> RunConfig:
    return changed_config(cfg, seed=seed, **over)



_DATASETS: dict[str, Dataset] = {}


def dataset_for(cfg: RunConfig) -> Dataset:
    """The config's dataset, loaded once per process for every run that uses it."""
    key = json.dumps(config_to_dict(cfg)["data"], sort_keys=True)
    if key not in _DATASETS:
        _DATASETS[key] = load_run_dataset(cfg)
    return _DATASETS[key]


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_panels(curves: Mapping[str, Mapping[str, Any]], path: Path, *,
                mark_round: Mapping[str, int] | None = None) -> None:
    """One panel per setting (`curves[setting][label]` = runs): seed-mean training loss
    against rounds on a log axis; `mark_round[setting]` draws a dashed line there."""
    from metagg.plots import _loss_axis, _pyplot

    plt = _pyplot()
    cols = min(len(curves), 4)
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax, (name, by_label) in zip(axes.flat, curves.items(), strict=False):
        if mark_round and name in mark_round:
            ax.axvline(mark_round[name], color="grey", linestyle="--", linewidth=0.8)
        for label, runs in by_label.items():
            mean = mean_curve(runs)
            ax.plot([r for r, _ in mean], [v for _, v in mean], label=label)
        # log scale: the methods differ by ~10 % late in training, invisible on a linear
        # axis that has to reach the initial loss of 2.3
        _loss_axis(ax, [v for runs in by_label.values() for _, v in mean_curve(runs)],
                   force_log=True)
        ax.set(title=name, xlabel="round", ylabel="train loss (log scale)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
