"""`metagg reproduce robustness`: the grid, its files, and each rule's worst case."""

from __future__ import annotations

import csv

import pytest

from metagg.cli import main
from metagg.experiments.robustness import (
    ATTACKS,
    LEARNED,
    SCALES,
    attack_settings,
    reproduce_robustness,
    target_counts,
    worst_cases,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_grid_has_every_attack_at_every_fraction():
    settings = attack_settings(SCALES["quick"])
    assert settings[0] == "none"
    assert len(settings) == 1 + len(ATTACKS) * 2
    assert "ipm:7:eps=100" in settings and "min_sum:3" in settings
    assert {"whitebox:3", "label_flip:7", "mimic:3"} <= set(settings)


def test_worst_case_is_over_the_cells_a_rule_ran_in():
    def row(rule, attack, acc, **kw):
        return {"aggregator": rule, "attack_label": attack, "final_test_accuracy": acc,
                "dataset": "digits", "partition": "iid", "momentum": 0.0, **kw}

    rows = [row("mean", "no attack", 0.95), row("mean", "ipm 3/10", 0.2),
            row("mean", "ipm 3/10", 0.4),  # two seeds: mean 0.3
            row("bulyan", "no attack", 0.9), row("bulyan", "ipm 3/10", None, unavailable="n")]
    rows += [row("median", "no attack", 0.9), row("median", "ipm 3/10", 0.5)]
    worst = worst_cases(rows, ["mean", "bulyan", "median"])
    # best worst case first; a rule with n/a cells last, whatever its worst case
    assert [w["rule"] for w in worst] == ["median", "mean", "bulyan"]
    assert worst[1]["worst_accuracy"] == pytest.approx(0.3)
    assert worst[1]["attack"] == "ipm 3/10" and worst[1]["cells"] == 2
    assert worst[2]["unavailable_cells"] == 1 and worst[2]["cells"] == 1


def test_target_counts_compare_with_the_mean_and_the_better_of_zeno_and_fltrust():
    def row(rule, attack, b, acc, partition="iid"):
        return {"aggregator": rule, "attack_label": attack, "num_byzantine": b,
                "final_test_accuracy": acc, "dataset": "digits", "partition": partition,
                "momentum": 0.0}

    rows = []
    for part, clean, learned in (("iid", 0.90, [0.896, 0.855, 0.84]),
                                 ("dirichlet", 0.80, [0.79, 0.70, 0.795])):
        rows += [row("mean", "no attack", 0, clean, part), row("l", "no attack", 0,
                                                                 learned[0], part)]
        rows += [row("zeno", "ipm 3/10", 3, 0.86, part), row("fltrust", "ipm 3/10", 3, 0.5, part),
                 row("l", "ipm 3/10", 3, learned[1], part)]
        rows += [row("zeno", "ipm 7/10", 7, 0.2, part), row("fltrust", "ipm 7/10", 7, 0.8, part),
                 row("l", "ipm 7/10", 7, learned[2], part)]
    [t] = target_counts(rows, ["l", "absent"])
    counts = t["by_byzantine"]
    # no attack: 0.896 ≥ 0.90 − 0.005 yes, 0.79 ≥ 0.795 no
    assert counts[0] == {"met": 1, "both": 1, "cells": 2}
    # 3/10: 0.855 ≥ 0.86 − 0.01 yes (and ≥ 0.95 · 0.896); 0.70 no
    assert counts[3] == {"met": 1, "both": 1, "cells": 2}
    # 7/10: 0.84 ≥ 0.8 − 0.01 but < 0.95 · 0.896; 0.795 ≥ 0.79 and ≥ 0.95 · 0.79
    assert counts[7] == {"met": 2, "both": 1, "cells": 2}
    assert target_counts([r for r in rows if r["aggregator"] != "zeno"], ["l"])[0][
        "by_byzantine"].keys() == {0}  # no Zeno: attacked cells are not counted
    # the perfect filter's runs: a cell is reachable where they end at ≥ 95 % of the
    # rule's own no-attack accuracy (iid 0.896 → 0.8512; dirichlet 0.79 → 0.7505)
    honest = [{"dataset": "digits", "partition": p, "momentum": 0.0, "num_byzantine": b,
               "final_test_accuracy": a}
              for p, b, a in (("iid", 3, 0.86), ("iid", 7, 0.84), ("iid", 7, 0.87),
                              ("dirichlet", 3, 0.70), ("dirichlet", 7, 0.76))]
    counts = target_counts(rows, ["l"], honest)[0]["by_byzantine"]
    assert counts[3]["reachable"] == 1  # iid 0.86 yes, dirichlet 0.70 no
    assert counts[7]["reachable"] == 2  # iid: mean of two seeds 0.855; dirichlet 0.76
    assert "reachable" not in counts[0]


def test_tiny_benchmark_writes_its_files(tmp_path, capsys):
    summary = reproduce_robustness(tmp_path, scale="tiny", log=lambda msg: None, progress=True)
    # the bar counts every run: 4 rules x 3 attack settings, and the perfect filter's one
    assert "13/13" in capsys.readouterr().err
    rules = ["mean", "median", "arnn:pretrained/digits-mlp20-arnn-lstm", "trust:pretrained/robust"]
    assert [w["rule"] for w in summary["worst"]] != [] and summary["rules"] == rules
    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(rules) * 3  # no attack, sign_flip 3/10, min_max 3/10
    assert {r["attack_label"] for r in rows} == {"no attack", "sign_flip 3/10",
                                                 "min_max 3/10"}
    report = (tmp_path / "report.md").read_text()
    assert "## Worst case of each rule over the whole grid" in report
    # no Zeno or FLTrust in the tiny grid: only the no-attack cells are counted
    assert "## Learned rules against the robust-aggregator target" in report
    assert "no attack: ≥ mean − 0.5" in report and "3/10: ≥" not in report
    assert all(rule in report for rule in rules)
    assert (tmp_path / "heatmap-digits--IID--no-worker-momentum.png").stat().st_size > 1000
    # the perfect filter: the honest rows' mean at 3/10, in its own file and the report
    with open(tmp_path / "honest_only.csv") as fh:
        [ceiling] = list(csv.DictReader(fh))
    assert ceiling["aggregator"] == "mean" and ceiling["attack"] == "crash"
    assert ceiling["num_byzantine"] == "3"
    assert list(summary["honest_only"]) == ["digits, IID, no worker momentum, 3/10"]
    assert "A perfect filter (the Byzantine workers' rows dropped" in report


def test_cli_lists_the_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "robustness", "--help"])
    assert "worst case" in capsys.readouterr().out


def test_datasets_and_rules_can_be_chosen(tmp_path):
    summary = reproduce_robustness(tmp_path, scale="tiny", datasets=["breast_cancer"],
                                   rules=["zeno"], learned=LEARNED[1:], log=lambda msg: None)
    assert summary["rules"] == ["zeno", "trust:pretrained/robust"]
    with open(tmp_path / "results.csv") as fh:
        assert {r["dataset"] for r in csv.DictReader(fh)} == {"breast_cancer"}
    assert "--datasets breast_cancer --rules zeno`" in (tmp_path / "report.md").read_text()
