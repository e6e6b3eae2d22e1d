"""Run one setting for several aggregators and seeds; write a table and an overlay plot.

    metagg compare configs/digits.yaml --aggregators mean,median --seeds 3 --out runs/cmp

Writes `results.csv` (one row per run), `results.md` (mean ± std per
aggregator), `curves.png` (mean ± std bands) and each run's own directory.
"""

from __future__ import annotations

import copy
import csv
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from metagg.config import RunConfig, config_from_dict, config_to_dict
from metagg.data import Dataset, load_dataset
from metagg.plots import plot_overlay
from metagg.simulation import Simulation, read_metrics

__all__ = ["compare", "format_table", "mean_std"]

SUMMARY_COLUMNS = (
    "final_test_accuracy",
    "final_train_loss",
    "final_test_loss",
    "rounds_to_test_accuracy_0.9",
    "wall_s",
)


def mean_std(values: Sequence[float | None], scale: float = 1.0, digits: int = 2) -> str:
    """'m ± s' of the non-missing values ('—' if none)."""
    vals = [scale * v for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _with(cfg: RunConfig, **changes: Any) -> RunConfig:
    """A validated copy of `cfg` with dotted-key changes applied."""
    data = copy.deepcopy(config_to_dict(cfg))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for k in parents:
            node = node[k]
        node[last] = value
    return config_from_dict(data)


def compare(
    cfg: RunConfig,
    aggregators: Sequence[str],
    *,
    seeds: int = 3,
    out_dir: str | Path,
    dataset: Dataset | None = None,
    on_run: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every aggregator on `seeds` seeds (cfg.seed, cfg.seed+1, ...); return run summaries."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    dataset = dataset or load_dataset(
        d.name, data_dir=d.data_dir, path=d.path, classes=d.classes, image_size=d.image_size
    )
    results: list[dict[str, Any]] = []
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for agg in aggregators:
        for i in range(seeds):
            run_cfg = _with(cfg, aggregator__name=agg, seed=cfg.seed + i)
            run_dir = out / _safe(agg) / f"seed{run_cfg.seed}"
            sim = Simulation(run_cfg, dataset=dataset)
            summary = sim.run(run_dir, progress=False)
            rows = read_metrics(run_dir / "metrics.jsonl")
            curves.setdefault(agg, []).append(rows)
            results.append(summary)
            if on_run is not None:
                on_run(agg, run_cfg.seed, summary)
    _write_results(results, aggregators, out, cfg, curves)
    return results


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_results(results, aggregators, out: Path, cfg: RunConfig, curves) -> None:
    keys = ["aggregator", "seed", *SUMMARY_COLUMNS, "final_train_accuracy", "dropped_updates",
            "skipped_rounds", "diverged"]
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    rows = []
    for agg in aggregators:
        runs = [r for r in results if r["aggregator"] == agg]
        rows.append([
            agg,
            mean_std([r["final_test_accuracy"] for r in runs], 100, 1),
            mean_std([r["final_train_loss"] for r in runs], 1, 4),
            mean_std([r["final_test_loss"] for r in runs], 1, 4),
            mean_std([r["rounds_to_test_accuracy_0.9"] for r in runs], 1, 0),
            mean_std([r["wall_s"] for r in runs], 1, 1),
        ])
    header = ["aggregator", "test acc (%)", "train loss", "test loss", "rounds to 90 %",
              "wall (s)"]
    seeds = sorted({r["seed"] for r in results})
    setting = (f"{cfg.data.name}, {cfg.model}, {cfg.workers.num_workers} workers "
               f"({cfg.workers.mode}), {cfg.rounds} rounds, optimizer {cfg.optimizer.name} "
               f"lr {cfg.optimizer.lr:g}, attack {cfg.attack.name} "
               f"({cfg.attack.num_byzantine} Byzantine), seeds {seeds}; mean ± std over seeds")
    (out / "results.md").write_text(f"{setting}\n\n" + format_table(header, rows))
    plot_overlay(curves, out / "curves.png", title=f"{cfg.data.name}: {cfg.model}")
