"""PNG plots of learning curves (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_curves", "plot_overlay"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _loss_axis(ax, values: Sequence[float], force_log: bool = False) -> None:
    finite = [v for v in values if np.isfinite(v) and v > 0]
    if finite and (force_log or max(finite) / min(finite) > 20):
        ax.set_yscale("log")


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "") -> None:
    """Train loss and test accuracy against rounds for one run."""
    plt = _pyplot()
    rounds = [r["round"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(rounds, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(rounds, [r["test_loss"] for r in rows], label="test", linestyle="--")
    _loss_axis(ax_loss, [r["train_loss"] for r in rows])
    ax_loss.set(xlabel="round", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(rounds, [100 * r["test_accuracy"] for r in rows])
    ax_acc.set(xlabel="round", ylabel="test accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    _save(plt, fig, path, title)


def _save(plt, fig, path: str | Path, title: str) -> None:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_overlay(
    curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    path: str | Path,
    *,
    title: str = "",
    metrics: Sequence[str] = ("train_loss", "test_accuracy"),
    log_loss: bool = False,
) -> None:
    """Mean ± std bands across seeds, one line per label (e.g. per aggregator).

    `curves[label]` is a list of runs, each a list of metric rows; runs of one label
    must share their evaluation rounds. Loss axes are logarithmic when the values span
    more than 20× or with `log_loss`.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics, strict=True):
        all_values: list[float] = []
        for label, runs in curves.items():
            n = min(len(run) for run in runs)
            rounds = np.array([row["round"] for row in runs[0][:n]])
            values = np.array([[row[metric] for row in run[:n]] for run in runs], dtype=float)
            scale = 100.0 if "accuracy" in metric else 1.0
            mean, std = scale * values.mean(0), scale * values.std(0)
            ax.plot(rounds, mean, label=label)
            if len(runs) > 1:
                ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
            all_values.extend(mean.tolist())
        if "loss" in metric:
            _loss_axis(ax, all_values, force_log=log_loss)
        ylabel = metric.replace("_", " ") + (" (%)" if "accuracy" in metric else "")
        ax.set(xlabel="round", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, fig, path, title)
