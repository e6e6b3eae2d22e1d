"""Run one setting for several aggregators (× attacks) and seeds; write tables and plots.

    metagg compare configs/digits.yaml --aggregators mean,median --seeds 3 --out runs/cmp
    metagg compare configs/digits.yaml --aggregators mean,krum,zeno \\
        --attacks none,sign_flip:3,alie:7 --seeds 3 --out runs/robust

Writes `results.csv` (one row per run), `results.md` (mean ± std per aggregator,
or an aggregator × attack matrix of final test accuracy), `curves.png` (mean ±
std bands; one `curves_<attack>.png` per attack setting) and each run's directory.
An attack setting is `name:b[:key=value...]`, e.g. `ipm:3:eps=100`.
"""

from __future__ import annotations

import copy
import csv
import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from metagg.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from metagg.data import Dataset
from metagg.plots import plot_overlay
from metagg.simulation import Simulation, WeightsChangedError, load_run_dataset, read_metrics

__all__ = ["compare", "format_table", "mean_std", "parse_attack_setting"]

log = logging.getLogger("metagg")

NO_ATTACK = ("none", 0, {})


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


def parse_attack_setting(spec: str) -> tuple[str, int, dict[str, Any]]:
    """'alie:7' -> ('alie', 7, {}); 'ipm:3:eps=100' -> ('ipm', 3, {'eps': 100}); 'none'."""
    parts = [p.strip() for p in spec.split(":")]
    name = parts[0]
    if name == "none":
        if len(parts) > 1:
            raise ConfigError(f"attack setting {spec!r}: 'none' takes no count")
        return NO_ATTACK
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConfigError(f"attack setting {spec!r}: expected name:count, e.g. sign_flip:3")
    options = {}
    for item in parts[2:]:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"attack setting {spec!r}: options are key=value, got {item!r}")
        options[key] = yaml.safe_load(raw)
    return name, int(parts[1]), options


def attack_label(setting: tuple[str, int, dict[str, Any]], num_workers: int) -> str:
    name, b, options = setting
    if name == "none":
        return "no attack"
    extra = "".join(f" {k}={v}" for k, v in options.items())
    return f"{name}{extra} {b}/{num_workers}"


def _configure(base: RunConfig, aggregator: str, setting, seed: int, unsafe: bool,
               agg_options: dict[str, Any]) -> RunConfig:
    data = copy.deepcopy(config_to_dict(base))
    name, b, options = setting
    data["seed"] = seed
    # The config's own options belong to the aggregator it names, not to every one.
    own = data["aggregator"]["options"] if data["aggregator"]["name"] == aggregator else {}
    data["aggregator"]["name"] = aggregator
    data["aggregator"]["options"] = {**own, **agg_options}
    if unsafe:
        data["aggregator"]["options"]["allow_unsafe"] = True
    data["attack"].update(name=name, num_byzantine=b, options=options)
    return config_from_dict(data)


def _simulation(cfg: RunConfig, dataset: Dataset, aggregator: str, setting, seed: int,
                agg_options: dict[str, Any]):
    """(Simulation, ran outside the guarantee?) or (None, reason) if the rule can't run."""
    unsafe = False
    while True:
        run_cfg = _configure(cfg, aggregator, setting, seed, unsafe, agg_options)
        try:
            return Simulation(run_cfg, dataset=dataset), unsafe
        except ValueError as exc:
            if "allow_unsafe" in str(exc) and not unsafe:
                unsafe = True  # outside the guarantee: run it anyway and mark the cell
            elif "needs at least" in str(exc):
                return None, str(exc)  # the rule is undefined for this many workers
            else:
                raise


def compare(
    cfg: RunConfig,
    aggregators: Sequence[str],
    *,
    seeds: int = 3,
    out_dir: str | Path,
    attacks: Sequence[str] | None = None,
    aggregator_options: dict[str, dict[str, Any]] | None = None,
    dataset: Dataset | None = None,
    on_run: Callable[[str, str, int, dict[str, Any] | None], None] | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run every aggregator × attack setting on `seeds` seeds (cfg.seed, cfg.seed + 1, ...).

    Without `attacks` the config's own attack is used. A rule whose guarantee the
    attack breaks (e.g. Krum at 7/10) is run with `allow_unsafe` and marked †; one
    that cannot run at all is reported as n/a. `aggregator_options` maps an
    aggregator name to extra options for it (e.g. {"centered_clip": {"tau": 0.3}}).
    With `resume`, each run with a checkpoint in `out_dir` continues from it (a finished
    one is not run again; a different config is an error; a learned aggregator whose
    weights file changed since is run again from the start), so a killed table picks up
    where it stopped with the same numbers. Returns every run's summary.
    """
    aggregator_options = aggregator_options or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = dataset or load_run_dataset(cfg)
    m = cfg.workers.num_workers
    settings = ([parse_attack_setting(a) for a in attacks] if attacks
                else [(cfg.attack.name, cfg.attack.num_byzantine, cfg.attack.options)])
    results: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list]] = {}
    for setting in settings:
        label = attack_label(setting, m)
        for agg in aggregators:
            for i in range(seeds):
                seed = cfg.seed + i
                sim, unsafe = _simulation(cfg, dataset, agg, setting, seed,
                                          aggregator_options.get(agg, {}))
                base = {"aggregator": agg, "attack": setting[0], "num_byzantine": setting[1],
                        "attack_label": label, "seed": seed}
                if sim is None:
                    results.append({**base, "unavailable": unsafe})
                    if on_run:
                        on_run(agg, label, seed, None)
                    continue
                run_dir = out / _safe(label) / _safe(agg) / f"seed{seed}"
                started = resume and (run_dir / "checkpoint.json").exists()
                try:
                    summary = sim.run(run_dir, progress=False, resume=started)
                except WeightsChangedError:
                    # the weights behind a learned aggregator's name changed: the old
                    # run measured other weights, so it is run again from round 0
                    log.warning("%s: the weights of %s changed since this run; running it "
                                "again", run_dir, agg)
                    summary = sim.run(run_dir, progress=False, resume=False)
                curves.setdefault(label, {}).setdefault(agg, []).append(
                    read_metrics(run_dir / "metrics.jsonl"))
                results.append({**summary, **base, "unsafe": unsafe})
                if on_run:
                    on_run(agg, label, seed, summary)
    _write_results(results, aggregators, settings, out, cfg, curves)
    return results


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace("/", "of"))


def _cell(runs: list[dict[str, Any]], key: str, scale: float, digits: int) -> str:
    if not runs or "unavailable" in runs[0]:
        return "n/a"
    text = mean_std([r.get(key) for r in runs], scale, digits)
    return text + (" †" if runs[0].get("unsafe") else "")


def _reached(runs: list[dict[str, Any]]) -> str:
    """Mean rounds to 90 % over the seeds that got there, and how many did."""
    if not runs or "unavailable" in runs[0]:
        return "n/a"
    hits = [r["rounds_to_test_accuracy_0.9"] for r in runs
            if r.get("rounds_to_test_accuracy_0.9") is not None]
    text = mean_std(hits, 1, 0)
    return text if len(hits) == len(runs) else f"{text} ({len(hits)}/{len(runs)} seeds)"


def _write_results(results, aggregators, settings, out: Path, cfg: RunConfig, curves) -> None:
    keys = ["aggregator", "attack", "num_byzantine", "seed", "final_test_accuracy",
            "final_train_loss", "final_test_loss", "rounds_to_test_accuracy_0.9",
            "final_train_accuracy", "dropped_updates", "skipped_rounds", "diverged", "unsafe",
            "wall_s", "unavailable"]
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    m = cfg.workers.num_workers
    labels = [attack_label(s, m) for s in settings]

    def runs(agg: str, label: str) -> list[dict[str, Any]]:
        return [r for r in results if r["aggregator"] == agg and r["attack_label"] == label]

    seeds = sorted({r["seed"] for r in results})
    setting = (f"{cfg.data.name}, {cfg.model}, {m} workers ({cfg.workers.mode}), "
               f"{cfg.rounds} rounds, server {cfg.optimizer.name} lr {cfg.optimizer.lr:g}, "
               f"seeds {seeds}; mean ± std over seeds")
    if len(settings) == 1:
        header = ["aggregator", "test acc (%)", "train loss", "test loss", "rounds to 90 %",
                  "wall (s)"]
        rows = [[agg, _cell(runs(agg, labels[0]), "final_test_accuracy", 100, 1),
                 _cell(runs(agg, labels[0]), "final_train_loss", 1, 4),
                 _cell(runs(agg, labels[0]), "final_test_loss", 1, 4),
                 _reached(runs(agg, labels[0])),
                 _cell(runs(agg, labels[0]), "wall_s", 1, 1)] for agg in aggregators]
        setting += f", attack: {labels[0]}"
    else:
        header = ["aggregator", *labels]
        rows = [[agg, *(_cell(runs(agg, lab), "final_test_accuracy", 100, 1) for lab in labels)]
                for agg in aggregators]
        setting += "; cells: final test accuracy (%)"
    notes = ""
    if any(r.get("unsafe") for r in results):
        notes += "\n† run outside the rule's guarantee (too many Byzantine workers for its f).\n"
    if any("unavailable" in r for r in results):
        notes += "\nn/a: the rule is undefined for this many Byzantine workers.\n"
    (out / "results.md").write_text(f"{setting}\n\n" + format_table(header, rows) + notes)
    for i, (label, by_agg) in enumerate(curves.items()):
        name = "curves.png" if i == 0 else f"curves_{_safe(label)}.png"
        plot_overlay(by_agg, out / name, title=f"{cfg.data.name}, {cfg.model}: {label}")
