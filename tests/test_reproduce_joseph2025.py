"""`metagg reproduce joseph2025` at its tiny (test) scale: every file, every row."""

from __future__ import annotations

import csv

import pytest

from metagg.experiments.joseph2025 import BASELINES, reproduce_joseph2025, rounds_to_reach

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rounds_to_reach_uses_the_seed_mean():
    runs = [[{"round": 0, "train_loss": 2.0}, {"round": 5, "train_loss": 1.0},
             {"round": 10, "train_loss": 0.5}],
            [{"round": 0, "train_loss": 2.0}, {"round": 5, "train_loss": 0.6},
             {"round": 10, "train_loss": 0.5}]]
    assert rounds_to_reach(runs, 0.8) == 5  # mean 0.8 at round 5
    assert rounds_to_reach(runs, 0.7) == 10
    assert rounds_to_reach(runs, 0.1) is None


def test_tiny_reproduction_writes_report_tables_and_figures(tmp_path):
    lines = []
    s = reproduce_joseph2025(tmp_path, scale="tiny", lagg="lagg:init", lopt="lopt:init",
                             log=lines.append)
    for name in ("report.md", "curves.csv", "loss_vs_rounds.png", "rounds_to_target.csv",
                 "generalization.csv", "generalization.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    for b in BASELINES:
        assert (tmp_path / "tuning" / b / "best.yaml").exists()
        assert (tmp_path / "tuning-big" / b / "best.yaml").exists()  # retuned on the big MLP
    with open(tmp_path / "rounds_to_target.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"LAgg-A", "LOpt-A", *BASELINES}
    # the best baseline reaches its own final loss by definition
    assert rows[s["best_baseline"]]["rounds_to_target"] == "8"
    with open(tmp_path / "curves.csv") as fh:
        curves = list(csv.DictReader(fh))
    assert {r["seed"] for r in curves} == {"0", "1"}
    report = (tmp_path / "report.md").read_text()
    assert "2–6× fewer" in report and "K=4 workers" in report and "digits" in report
    assert "MLP 128-128 on digits" in report and "tuned again" in report
    assert any("tuning fedavg" in line for line in lines)


def test_a_diverged_baseline_never_sets_the_target():
    from metagg.experiments.joseph2025 import _best_baseline

    nan = float("nan")
    assert _best_baseline({"fedavg": nan, "sgd": 0.7, "adam": 0.5}, ["fedavg", "sgd", "adam"]) \
        == "adam"
    with pytest.raises(RuntimeError, match="diverged"):
        _best_baseline({"fedavg": nan, "sgd": float("inf")}, ["fedavg", "sgd"])
