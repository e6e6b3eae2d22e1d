"""`metagg reproduce robustness`: every robust rule against every attack, at several
Byzantine fractions, with IID and Dirichlet data, with and without worker momentum.

    metagg reproduce robustness --scale quick --out runs/robustness      # digits, ~15 min
    metagg reproduce robustness --scale full --out runs/robustness-full  # + FMNIST, a table

For each setting (dataset × partition × worker momentum) one `metagg compare` table
runs every rule × attack × fraction (`SETTING_DIR/results.csv`, its runs, curves); this
module collects them into

- `results.csv`: one row per run, with the setting's columns;
- `heatmap-SETTING.png`: final test accuracy, rules × (attack, fraction), one per setting;
- `report.md`: provenance, the command, each setting's table, and every rule's **worst
  case** over the whole grid (the lowest mean-over-seeds final test accuracy of any cell
  it could run in, and where).

Beside the rules, each setting runs a **perfect filter** at every Byzantine count b: the
Byzantine workers' rows dropped and the rest averaged (the `crash` fault, `honest-only/`).
It is what filtering the rows can reach at best: where even it ends below 95 % of the
no-attack accuracy (3 honest Dirichlet shards miss classes), issue 15's "≥ 95 % of its own
no-attack accuracy" is out of reach of a rule that only picks rows; only one that adds what
the server's trusted sample says (FLTrust's reference, the trust rule's share) can get
there. The report counts those cells.

A rule that is undefined for a number of Byzantine workers (Bulyan needs n ≥ 4f + 3) is
"n/a" there and its worst case is over the other cells (the count of n/a cells is
reported); a rule run outside its guarantee (Krum with f ≥ n/2) is run anyway and marked
† as in `metagg compare`. Robust rules assume f = the number of Byzantine workers.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metagg.checkpoint import atomic_write_text, json_text
from metagg.compare import attack_label, compare, format_table, parse_attack_setting
from metagg.config import RunConfig, config_from_dict
from metagg.experiments.runs import provenance, slug
from metagg.simulation import load_run_dataset

__all__ = ["ATTACKS", "RULES", "SCALES", "RobustnessScale", "reproduce_robustness",
           "worst_cases"]

#: the rules compared (robust pre-aggregations compose with a rule: nnm+krum)
RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
         "bulyan", "centered_clip", "nnm+krum", "bucketing+median", "zeno", "fltrust")
#: the shipped learned robust aggregators evaluated beside them: the attack-free ARNN
#: (its input width is 10) and the trust rule meta-trained over an attack mixture
LEARNED = ("arnn:pretrained/digits-mlp20-arnn-lstm", "trust:pretrained/robust")
#: attack settings without the count: name[:key=value...] (`metagg compare --attacks`)
ATTACKS = ("sign_flip:scale=4", "gaussian", "alie", "ipm", "ipm:eps=100", "min_max",
           "min_sum", "label_flip", "mimic", "whitebox")
NUM_WORKERS = 10


@dataclass(frozen=True)
class RobustnessScale:
    datasets: tuple[str, ...]
    rounds: int
    seeds: int
    fractions: tuple[int, ...]  # Byzantine workers out of NUM_WORKERS (0 = no attack)
    partitions: tuple[str, ...]
    momentum: tuple[float, ...]
    rules: tuple[str, ...] = RULES
    attacks: tuple[str, ...] = ATTACKS


SCALES: dict[str, RobustnessScale] = {
    "full": RobustnessScale(datasets=("digits", "fashion_mnist", "breast_cancer"), rounds=300,
                            seeds=3, fractions=(0, 1, 3, 7), partitions=("iid", "dirichlet"),
                            momentum=(0.0, 0.9)),
    "quick": RobustnessScale(datasets=("digits",), rounds=150, seeds=1, fractions=(0, 3, 7),
                             partitions=("iid", "dirichlet"), momentum=(0.0, 0.9)),
    # the tests' scale
    "tiny": RobustnessScale(datasets=("digits",), rounds=4, seeds=1, fractions=(0, 3),
                            partitions=("iid",), momentum=(0.0,), rules=("mean", "median"),
                            attacks=("sign_flip", "min_max")),
}


def setting_config(dataset: str, partition: str, momentum: float, rounds: int) -> RunConfig:
    """The run config of one setting (digits' robustness table: MLP 20 sigmoid, 10 workers
    in gradient mode, B = 32, server SGD lr 1, 100 trusted samples for Zeno/FLTrust/ARNN)."""
    return config_from_dict({
        "seed": 0, "rounds": rounds, "model": "mlp:20:sigmoid",
        "data": {"name": dataset, "partition": partition, "alpha": 0.5},
        "workers": {"num_workers": NUM_WORKERS, "mode": "gradient", "batch_size": 32,
                    "momentum": momentum},
        "optimizer": {"name": "sgd", "lr": 1.0}, "aggregator": {"name": "mean"},
        "trusted_samples": 100, "eval_every": max(1, rounds // 10), "checkpoint_every": 0})


def attack_settings(sc: RobustnessScale) -> list[str]:
    """`metagg compare --attacks` strings: no attack, then each attack at each fraction."""
    out = ["none"] if 0 in sc.fractions else []
    for attack in sc.attacks:
        name, _, options = attack.partition(":")
        for b in sc.fractions:
            if b:
                out.append(f"{name}:{b}" + (f":{options}" if options else ""))
    return out


def _options(momentum: float) -> dict[str, dict[str, Any]]:
    # centered clipping's radius follows the spread of what it clips (README: τ 0.3
    # on gradients, 0.1 on the smaller spread of worker momenta)
    return {"centered_clip": {"tau": 0.1 if momentum else 0.3, "iters": 3}}


def reproduce_robustness(out_dir: str | Path, *, scale: str = "quick",
                         learned: Sequence[str] = LEARNED, resume: bool = False,
                         datasets: Sequence[str] | None = None,
                         rules: Sequence[str] | None = None,
                         log: Callable[[str], None] | None = None,
                         progress: bool | None = None) -> dict[str, Any]:
    """Run the grid of `scale` into `out_dir` (see the module docstring); returns the
    worst cases and where the files are. `datasets` / `rules` replace the scale's (e.g.
    only Fashion-MNIST, only the rules that use the trusted sample); `learned` are added
    to the rules. `progress`: a bar over all runs (default: when stderr is a terminal)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
    sc = SCALES[scale]
    chosen = {}
    if datasets is not None:
        chosen["datasets"] = tuple(datasets)
    if rules is not None:
        chosen["rules"] = tuple(rules)
    sc = dataclasses.replace(sc, **chosen)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    every = [*sc.rules, *learned]
    attacks = attack_settings(sc)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    honest: list[dict[str, Any]] = []  # the perfect filter's runs
    sections: list[str] = []
    filtered = sum(1 for b in sc.fractions if b)  # the perfect filter's runs per setting
    total = (len(sc.datasets) * len(sc.partitions) * len(sc.momentum)
             * (len(every) * len(attacks) + filtered) * sc.seeds)
    bar = _bar(total, sys.stderr.isatty() if progress is None else progress)

    def tick(*_: Any) -> None:
        if bar is not None:
            bar.update(1)

    for dataset in sc.datasets:
        for partition in sc.partitions:
            for momentum in sc.momentum:
                cfg = setting_config(dataset, partition, momentum, sc.rounds)
                name = setting_name(dataset, partition, momentum)
                try:
                    data = load_run_dataset(cfg)
                except FileNotFoundError as exc:
                    say(f"[robustness] {name}: skipped ({' '.join(str(exc).split())})")
                    sections.append(f"### {name}\n\nskipped: {' '.join(str(exc).split())}\n")
                    continue
                say(f"[robustness] {name}: {len(every)} rules x {len(attacks)} attack "
                    f"settings x {sc.seeds} seed(s), {sc.rounds} rounds")
                results = compare(cfg, every, seeds=sc.seeds, out_dir=out / slug(name),
                                  attacks=attacks, aggregator_options=_options(momentum),
                                  dataset=data, resume=resume,
                                  on_run=tick)
                rows += [{"dataset": dataset, "partition": partition, "momentum": momentum,
                          **r} for r in results]
                ceiling = perfect_filter(cfg, sc, data, out / slug(name) / "honest-only",
                                         resume, on_run=tick)
                honest += [{"dataset": dataset, "partition": partition, "momentum": momentum,
                            **r} for r in ceiling]
                cells = cell_means(results)
                columns = [attack_label(parse_attack_setting(a), NUM_WORKERS) for a in attacks]
                plot_heatmap(cells, every, columns, out / f"heatmap-{slug(name)}.png",
                             title=f"{name}: final test accuracy (%)")
                sections.append(f"### {name}\n\n" + (out / slug(name) / "results.md").read_text()
                                + _ceiling_line(ceiling, results)
                                + f"\n![{name}](heatmap-{slug(name)}.png)\n")
    if bar is not None:
        bar.close()
    worst = worst_cases(rows, every)
    targets = target_counts(rows, learned, honest)
    _write_csv(out / "results.csv", rows)
    _write_csv(out / "honest_only.csv", honest)
    summary = {"scale": scale, "rules": every, "attacks": attacks, "worst": worst,
               "targets": targets, "honest_only": _ceilings(honest),
               "wall_s": round(time.perf_counter() - start, 1)}
    atomic_write_text(out / "summary.json", json_text(summary, indent=2))
    _write_report(out, sc, scale, learned, worst, sections, summary["wall_s"], chosen, resume,
                  targets)
    return summary


def perfect_filter(cfg: RunConfig, sc: RobustnessScale, data: Any, out: Path,
                   resume: bool, on_run: Callable[..., Any] | None = None
                   ) -> list[dict[str, Any]]:
    """The mean of the honest rows alone at each Byzantine count of the scale (the
    Byzantine workers crash: the server averages the others), on the scale's seeds."""
    counts = [f"crash:{b}" for b in sc.fractions if b]
    if not counts:
        return []
    return compare(cfg, ["mean"], seeds=sc.seeds, out_dir=out, attacks=counts, dataset=data,
                   resume=resume, on_run=on_run)


def _ceilings(honest: Sequence[dict[str, Any]]) -> dict[str, float]:
    """"setting, b/n" -> the perfect filter's mean-over-seeds final test accuracy."""
    runs: dict[str, list[float]] = {}
    for r in honest:
        key = (f"{setting_name(r['dataset'], r['partition'], r['momentum'])}, "
               f"{r['num_byzantine']}/{NUM_WORKERS}")
        runs.setdefault(key, []).append(float(r["final_test_accuracy"]))
    return {k: statistics.fmean(v) for k, v in runs.items()}


def _ceiling_line(ceiling: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]) -> str:
    if not ceiling:
        return ""
    clean = [float(r["final_test_accuracy"]) for r in results
             if r["aggregator"] == "mean" and r["num_byzantine"] == 0]
    by_count: dict[int, list[float]] = {}
    for r in ceiling:
        by_count.setdefault(int(r["num_byzantine"]), []).append(float(r["final_test_accuracy"]))
    parts = [f"{b}/{NUM_WORKERS}: {100 * statistics.fmean(v):.1f} %"
             for b, v in sorted(by_count.items())]
    ref = (f" (the mean without attack: {100 * statistics.fmean(clean):.1f} %)" if clean
           else "")
    return ("\nA perfect filter (the Byzantine workers' rows dropped, the honest rows "
            f"averaged) ends at {', '.join(parts)}{ref}.\n")


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="robustness", unit="run")


def setting_name(dataset: str, partition: str, momentum: float) -> str:
    part = "Dirichlet α=0.5" if partition == "dirichlet" else "IID"
    return f"{dataset}, {part}, " + (f"worker momentum {momentum:g}" if momentum
                                     else "no worker momentum")


def cell_means(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float | None]:
    """(rule, attack label) -> mean final test accuracy over seeds; None where the rule
    is undefined."""
    by_cell: dict[tuple[str, str], list[float]] = {}
    missing = set()
    for r in results:
        key = (r["aggregator"], r["attack_label"])
        if "unavailable" in r:
            missing.add(key)
        else:
            by_cell.setdefault(key, []).append(float(r["final_test_accuracy"]))
    cells: dict[tuple[str, str], float | None] = {k: statistics.fmean(v)
                                                   for k, v in by_cell.items()}
    cells.update({k: None for k in missing})
    return cells


def worst_cases(rows: Sequence[dict[str, Any]], rules: Sequence[str]) -> list[dict[str, Any]]:
    """Per rule: the lowest mean-over-seeds final test accuracy over every setting and
    attack cell it ran in, where that was, and how many cells it could not run in;
    sorted from the best worst case down, rules that could not run everywhere last."""
    cells: dict[tuple[str, ...], list[float]] = {}
    unavailable: dict[str, int] = {}
    for r in rows:
        where = (r["aggregator"], setting_name(r["dataset"], r["partition"], r["momentum"]),
                 r["attack_label"])
        if "unavailable" in r:
            unavailable[r["aggregator"]] = unavailable.get(r["aggregator"], 0) + 1
            continue
        cells.setdefault(where, []).append(float(r["final_test_accuracy"]))
    out = []
    for rule in rules:
        mine = {k[1:]: statistics.fmean(v) for k, v in cells.items() if k[0] == rule}
        if not mine:
            continue
        (setting, attack), acc = min(mine.items(), key=lambda kv: kv[1])
        out.append({"rule": rule, "worst_accuracy": acc, "setting": setting, "attack": attack,
                    "cells": len(mine), "unavailable_cells": unavailable.get(rule, 0)})
    return sorted(out, key=lambda w: (w["unavailable_cells"] > 0, -w["worst_accuracy"]))


def target_counts(rows: Sequence[dict[str, Any]], learned: Sequence[str],
                  honest: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Issue 15's first target, counted per learned rule: each no-attack cell at or above
    the mean's accuracy − 0.5 point; each attacked cell at or above the better of Zeno and
    FLTrust − 1 point ("met"), and also at ≥ 95 % of the rule's own no-attack accuracy in
    that setting ("both"). Per Byzantine count; cells where a rule did not run are left
    out, and nothing is counted without mean, Zeno and FLTrust in the grid. With the
    perfect filter's runs (`honest`), attacked cells also count "reachable": where that
    filter ends at ≥ 95 % of the rule's own no-attack accuracy."""
    acc: dict[tuple[Any, ...], list[float]] = {}
    byzantine: dict[tuple[Any, ...], int] = {}
    for r in rows:
        if "unavailable" in r:
            continue
        cell = (r["dataset"], r["partition"], r["momentum"], r["attack_label"])
        byzantine[cell] = int(r["num_byzantine"])
        acc.setdefault((*cell, r["aggregator"]), []).append(float(r["final_test_accuracy"]))
    mean = {k: statistics.fmean(v) for k, v in acc.items()}
    ceiling: dict[tuple[Any, ...], list[float]] = {}
    for r in honest:
        ceiling.setdefault((r["dataset"], r["partition"], r["momentum"],
                            int(r["num_byzantine"])), []).append(
            float(r["final_test_accuracy"]))
    out = []
    for rule in learned:
        counts: dict[int, dict[str, int]] = {}
        for cell, b in sorted(byzantine.items(), key=lambda kv: kv[1]):
            mine = mean.get((*cell, rule))
            if b == 0:
                bar = mean.get((*cell, "mean"))
                bar = None if bar is None else bar - 0.005
            else:
                zeno, fltrust = mean.get((*cell, "zeno")), mean.get((*cell, "fltrust"))
                bar = None if zeno is None or fltrust is None else max(zeno, fltrust) - 0.01
            if mine is None or bar is None:
                continue
            c = counts.setdefault(b, {"met": 0, "both": 0, "cells": 0})
            own = mean.get((*cell[:3], "no attack", rule))
            c["cells"] += 1
            c["met"] += mine >= bar
            c["both"] += mine >= bar and (b == 0 or (own is not None and mine >= 0.95 * own))
            best = ceiling.get((*cell[:3], b))
            if b and best and own is not None:
                c["reachable"] = c.get("reachable", 0) + (statistics.fmean(best)
                                                          >= 0.95 * own)
        if counts:
            out.append({"rule": rule, "by_byzantine": counts})
    return out


def plot_heatmap(cells: dict[tuple[str, str], float | None], rules: Sequence[str],
                 columns: Sequence[str], path: Path, *, title: str) -> None:
    """Rules × attack columns, colour and number = accuracy (%), grey = n/a."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(rules), len(columns)), np.nan)
    for i, rule in enumerate(rules):
        for j, col in enumerate(columns):
            value = cells.get((rule, col))
            if value is not None:
                grid[i, j] = 100 * value
    width = max(5.0, 1.0 + 0.55 * len(columns))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.4 * len(rules)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(len(rules)):
        for j in range(len(columns)):
            text = "n/a" if math.isnan(grid[i, j]) else f"{grid[i, j]:.0f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rules)), [r.split("/")[-1] for r in rules], fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    keys = ["dataset", "partition", "momentum", "aggregator", "attack", "num_byzantine",
            "attack_label", "seed", "final_test_accuracy", "final_train_loss", "diverged",
            "unsafe", "unavailable", "wall_s"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_report(out: Path, sc: RobustnessScale, scale: str, learned: Sequence[str],
                  worst: list[dict[str, Any]], sections: list[str], wall_s: float,
                  chosen: dict[str, tuple[str, ...]], resume: bool = False,
                  targets: Sequence[dict[str, Any]] = ()) -> None:
    worst_rows = [[w["rule"], f"{100 * w['worst_accuracy']:.1f}", w["setting"], w["attack"],
                   str(w["cells"]), str(w["unavailable_cells"])] for w in worst]
    target_part: list[str] = []
    if targets:
        counts = sorted({b for t in targets for b in t["by_byzantine"]})

        def cell(c: dict[str, int] | None, b: int) -> str:
            if c is None:
                return "—"
            if b == 0:
                return f"{c['met']}/{c['cells']}"
            reach = f"; {c['reachable']} reachable" if "reachable" in c else ""
            return f"{c['met']}/{c['cells']} ({c['both']}{reach})"

        header = ["learned rule"] + [
            "no attack: ≥ mean − 0.5" if b == 0 else f"{b}/{NUM_WORKERS}: ≥ best of Zeno, "
            "FLTrust − 1 (and ≥ 95 % of own no-attack)" for b in counts]
        target_part = [
            "## Learned rules against the robust-aggregator target", "",
            "Cells (setting × attack) where the learned rule's accuracy reaches the bar; in "
            "brackets, those also at ≥ 95 % of its own no-attack accuracy in that setting, "
            "and the cells where a perfect filter (the honest rows' mean) ends at ≥ 95 % of "
            "it (\"reachable\" by filtering the rows; a rule that adds the server's "
            "trusted-sample update can go beyond).",
            "", format_table(header, [[t["rule"]] + [cell(t["by_byzantine"].get(b), b)
                                                     for b in counts] for t in targets]), ""]
    text = "\n".join([
        "# Robustness benchmark", "",
        f"Produced by {provenance()}.", "",
        f"Command: `metagg reproduce robustness --scale {scale} --out {out}"
        + ("" if tuple(learned) == LEARNED else f" --learned {','.join(learned) or 'none'}")
        + "".join(f" --{k} {','.join(v)}" for k, v in chosen.items()) + "`.", "",
        f"Scale `{scale}`: datasets {', '.join(sc.datasets)}; MLP 20 sigmoid, "
        f"{NUM_WORKERS} workers in gradient mode, B = 32, server SGD lr 1, {sc.rounds} "
        f"rounds, {sc.seeds} seed(s); Byzantine workers {', '.join(map(str, sc.fractions))} "
        f"of {NUM_WORKERS}; partitions {', '.join(sc.partitions)} (Dirichlet α = 0.5); "
        f"worker momentum {', '.join(f'{m:g}' for m in sc.momentum)}. Robust rules assume "
        "f = the number of Byzantine workers; Zeno, FLTrust, the ARNN and the trust rule get "
        "the same 100 "
        f"trusted samples. Wall time {wall_s:.0f} s"
        + (" (with `--resume`: runs finished earlier in the output directory were kept, "
           "not timed)" if resume else "") + ".", "",
        "## Worst case of each rule over the whole grid", "",
        "The lowest final test accuracy (mean over seeds) of any cell the rule ran in; "
        "rules undefined in some cells (n/a: e.g. Bulyan needs n ≥ 4f + 3) come last, "
        "their worst case taken over the cells they could run in only.", "",
        format_table(["rule", "worst accuracy (%)", "setting", "attack", "cells",
                      "n/a cells"], worst_rows), "", *target_part,
        "## Per setting", "", *sections])
    atomic_write_text(out / "report.md", text)
