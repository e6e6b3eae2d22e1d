"""Ji et al. 2019's reproduction: the CSV files, figures and report.md of a finished run
(a `metagg.experiments.ji2019.runner.Ji2019`: its records, tuning rows, notes and times)."""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metagg.experiments.ji2019.settings import (
    BYZ_ATTACKS,
    CSV_COLUMNS,
    MATCHED_ARNN,
    PAPER_CLAIMS,
    STAND_IN_ROWS,
    TUNING_COLUMNS,
)
from metagg.experiments.runs import provenance
from metagg.learned.store import resolve_path

__all__ = ["fmt", "plot", "write_csv", "write_report", "write_tuning"]


def fmt(values: Sequence[float], scale: float = 1.0, digits: int = 3, sci: bool = False) -> str:
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


def mean_or_inf(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) \
        else math.inf


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


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


def curve_finals(run: Any, figure: str, task: str, aggregator: str,
           setting: str = "none") -> list[dict[str, Any]]:
    """Each seed's last row of one curve."""
    rows = [r for r in run.records[figure] if r["task"] == task
            and r["aggregator"] == aggregator and r["setting"] == setting]
    last = max((r["round"] for r in rows), default=None)
    return [r for r in rows if r["round"] == last]

def write_csv(run: Any, figure: str) -> Path:
    path = run.out / f"figure{figure}.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(run.records[figure])
    return path

def plot(run: Any, figure: str) -> Path | None:
    """Mean over seeds against rounds: figure 6 test accuracy per setting; the others
    train loss (log) and test accuracy per task."""
    recs = run.records[figure]
    if not recs:
        return None

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
    fig.suptitle(f"Ji et al. 2019 figure {figure} (metagg, scale {run.scale.name})")
    fig.tight_layout()
    path = run.out / f"figure{figure}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

def write_tuning(run: Any) -> None:
    with open(run.out / "tuning.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=TUNING_COLUMNS)
        w.writeheader()
        w.writerows(run.tuning)

def _final_tables(run: Any, figure: str, key: str) -> str:
    """Two tables (final train loss, final test accuracy): aggregators × tasks/settings."""
    recs = run.records[figure]
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
                finals = curve_finals(run, figure, task, agg, setting)
                cell = fmt([r[metric] for r in finals], scale, digits, sci)
                lrs = {r["lr"] for r in finals if r["lr"] and agg.startswith("mean+")}
                if lrs and metric == "train_loss":
                    cell += f" (lr {', '.join(sorted(lrs))})"
                cells.append(cell)
            rows.append([agg, *cells])
        out.append(f"{title}, mean ± std over seeds {run.eval_seeds}:\n\n"
                   + _table(["aggregator", *cols], rows))
    return "\n".join(out)

def _final_mean(run: Any, figure: str, task: str, agg: str, metric: str,
                setting: str = "none") -> float | None:
    """Mean over seeds of one curve's final `metric` (None if it did not run)."""
    finals = curve_finals(run, figure, task, agg, setting)
    return mean_or_inf([r[metric] for r in finals]) if finals else None

def _vs(run: Any, figure: str, task: str, a: str, b: str) -> str:
    la, lb = (_final_mean(run, figure, task, x, "train_loss") for x in (a, b))
    if la is None or lb is None:
        return ""
    aa, ab = (100 * _final_mean(run, figure, task, x, "test_accuracy") for x in (a, b))
    return (f"{a} vs {b}: train loss {la:#.3g} vs {lb:#.3g} "
            f"({'lower' if la < lb else 'higher'}), test acc {aa:.1f} vs {ab:.1f} %")

def _ours(run: Any, figure: str) -> list[str]:
    """Our numbers on the paper's claim: per task (per attack setting in figure 6)."""
    recs = run.records[figure]
    aggs = list(dict.fromkeys(r["aggregator"] for r in recs))
    lines = []
    if figure in ("4", "5"):
        tasks = list(dict.fromkeys(r["task"] for r in recs))
        for a in (a for a in aggs if not a.startswith("mean+")):
            for b in ("mean+sgd", "mean+adam"):
                pairs = [(_final_mean(run, figure, t, a, "train_loss"),
                          _final_mean(run, figure, t, b, "train_loss")) for t in tasks]
                pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
                wins = sum(x < y for x, y in pairs)
                lines.append(f"- {a}: lower final train loss than tuned {b} on {wins} of "
                             f"{len(pairs)} tasks")
        for t in tasks:
            loss = {a: _final_mean(run, figure, t, a, "train_loss") for a in aggs}
            acc = {a: _final_mean(run, figure, t, a, "test_accuracy") for a in aggs}
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
            acc = {a: 100 * v for a in aggs if (v := _final_mean(run,
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
            text = _vs(run, "7", task, a, b)
            if text:
                lines.append(f"- {text}")
    return lines

def write_report(run: Any, figures: Sequence[str], command: str) -> Path:
    s = run.scale
    total = time.perf_counter() - run.start
    parts = [
        "# Ji et al. 2019, “Learning to Learn Gradient Aggregation by Gradient Descent” — "
        "metagg reproduction", "",
        f"Command: `{command}`  ",
        f"Produced by {provenance()}.  ",
        f"Scale `{s.name}`: {s.seeds} evaluation seed(s) {run.eval_seeds}, "
        f"{s.tune_seeds} tuning seed(s) {run.tune_seeds}; rounds {s.rounds} "
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
        *[f"- {_describe(n)}" for n in sorted(run.used)], "",
    ]
    titles = {"4": "Figure 4 — learned aggregators vs tuned averaging",
              "5": "Figure 5 — transfer without retraining (left: models, right: data)",
              "6": "Figure 6 — Byzantine workers (digits, mlp:20:sigmoid)",
              "7": "Figure 7 (§5.5) — heterogeneous worker models"}
    for f in figures:
        parts += [f"## {titles[f]}", "", f"Files: `figure{f}.png`, `figure{f}.csv`"
                  + (f" ({run.times[f]:.0f} s)" if f in run.times else ""), "",
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
        if run.records[f]:
            parts += ["**Ours:**", "", *_ours(run, f), "",
                      _final_tables(run, f, "setting" if f == "6" else "task")]
        for note in run.notes[f]:
            parts.append(f"- note: {note}")
        parts.append("")
    path = run.out / "report.md"
    path.write_text("\n".join(parts))
    return path


