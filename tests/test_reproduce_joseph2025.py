"""`metagg reproduce joseph2025` at its tiny (test) scale: every file, every row."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest

from metagg.config import config_from_dict, config_to_dict
from metagg.data import sources
from metagg.experiments import runs
from metagg.experiments.joseph2025 import (
    BASELINES,
    SCALES,
    _generalization,
    _task_config,
    reproduce_joseph2025,
)
from metagg.experiments.runs import merge as _merge
from metagg.experiments.runs import rounds_to_reach

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_cifar_but_the_tests(tmp_path_factory, monkeypatch):
    """Only CIFAR-10 files a test writes count (not a user's $METAGG_DATA_DIR or cache)."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setattr(sources, "CACHE_ROOT", tmp_path_factory.mktemp("cache"))


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
    # the target stated is the best baseline's mean final loss, recomputed from curves.csv
    last = max(int(r["round"]) for r in curves)
    finals = [float(r["train_loss"]) for r in curves
              if r["method"] == s["best_baseline"] and int(r["round"]) == last]
    assert f"({s['best_baseline']}) mean training loss at round {last}, " \
           f"{sum(finals) / len(finals):.4f}" in report
    for method, row in rows.items():  # the table shows what rounds_to_target.csv holds
        assert f"| {method} | " in report and f"| {row['rounds_to_target'] or '>'}" in report
    assert "MLP 128-128 on digits" in report
    assert any("tuning fedavg" in line for line in lines)
    assert "conv-c10 was not run: CIFAR-10 was not found on disk" in report


def test_conv_c10_generalization_when_cifar_is_on_disk(tmp_path, monkeypatch):
    from metagg.data import cifar

    folder = tmp_path / "data" / "cifar10" / cifar.BATCH_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate((*cifar.TRAIN_BATCHES, cifar.TEST_BATCH)):
        y = (np.arange(8) + i) % 10
        cifar.write_cifar_batch(folder / name, rng.integers(0, 256, (8, 3, 32, 32),
                                                            dtype=np.uint8), y)
    monkeypatch.setenv("METAGG_DATA_DIR", str(tmp_path / "data"))
    # only the conv-c10 setting, 2 rounds of 2-image batches: a conv-c10 step costs
    # ~90 MFLOP per image
    sc = dataclasses.replace(SCALES["tiny"], big_rounds=0, cifar_rounds=2, other_workers=(),
                             seeds=1, evals=2)
    base = config_from_dict(_merge(config_to_dict(_task_config(sc, rounds=sc.rounds)),
                                   {"workers": {"batch_size": 2}}))
    rows, curves = _generalization(sc, base, "lagg:init", "lopt:init", {}, [0],
                                   lambda msg: None, tmp_path / "out")
    assert {r["method"] for r in rows} == {"LAgg-A", "LOpt-A", *BASELINES}
    assert {r["setting"] for r in rows} == {"conv-c10 CIFAR-10"}
    assert all(math.isfinite(r["final_train_loss"]) for r in rows)
    assert (tmp_path / "out" / "tuning-c10" / "fedavg" / "best.yaml").exists()
    assert len(curves["conv-c10 CIFAR-10"]["LAgg-A"][0]) >= 2  # evaluated along the way


def test_a_diverged_baseline_never_sets_the_target():
    from metagg.experiments.runs import best_baseline as _best_baseline

    nan = float("nan")
    assert _best_baseline({"fedavg": nan, "sgd": 0.7, "adam": 0.5}, ["fedavg", "sgd", "adam"]) \
        == "adam"
    with pytest.raises(RuntimeError, match="diverged"):
        _best_baseline({"fedavg": nan, "sgd": float("inf")}, ["fedavg", "sgd"])


def test_resume_without_generalization_trains_nothing_again(tmp_path, monkeypatch):

    first = reproduce_joseph2025(tmp_path, scale="tiny", lagg="lagg:init", lopt="lopt:init",
                                 generalization=False, log=lambda _: None)
    assert first["generalization"] == [] and not (tmp_path / "tuning-big").exists()
    assert "not run (`--no-generalization`)" in (tmp_path / "report.md").read_text()
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2 + len(BASELINES)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "run_curve", no_training)
    monkeypatch.setattr("metagg.simulation.Simulation.step", no_training)  # tuning trials too
    again = reproduce_joseph2025(tmp_path, scale="tiny", lagg="lagg:init", lopt="lopt:init",
                                 generalization=False, resume=True, log=lambda _: None)
    for key in ("target", "best_baseline", "final_train_loss", "speedup"):
        assert again[key] == first[key], key
    assert first["read_back"] == 0 and again["read_back"] == len(BASELINES) + 2 + len(BASELINES)
    assert "were read back" in (tmp_path / "report.md").read_text()
    # another config (here: other seeds) is not taken from the cache
    cache = tmp_path / "runs" / "fedavg.json"
    saved = json.loads(cache.read_text())
    saved["key"]["seeds"] = [5, 6]
    cache.write_text(json.dumps(saved))
    with pytest.raises(AssertionError, match="trained again"):
        reproduce_joseph2025(tmp_path, scale="tiny", lagg="lagg:init", lopt="lopt:init",
                             generalization=False, resume=True, log=lambda _: None)


def test_weights_sha256_names_the_saved_weights_of_every_learned_kind():
    from metagg.experiments.joseph2025 import LAGG_PRETRAINED
    from metagg.learned.store import weights_sha256

    assert weights_sha256("mean") is None and weights_sha256("lagg:no/such/dir") is None
    digests = {weights_sha256(n) for n in (LAGG_PRETRAINED, "trust:pretrained/robust")}
    assert len(digests) == 2 and all(isinstance(d, str) and len(d) == 64 for d in digests)


def test_learned_optimizers_get_the_baselines_local_lr_grid(tmp_path, monkeypatch):
    """On a retuned task the learned optimizers' workers take the local lr of the
    baselines' grid that trains best on the tuning seed; the as-trained run stays a row."""
    from metagg.experiments import joseph2025 as j

    tried = []

    def fake_curves(cfg, dataset, evals, seeds, cache, resume):
        tried.append((cfg.workers.local_lr, list(seeds)))
        return [[{"round": 0, "train_loss": 2.0},
                 {"round": cfg.rounds, "train_loss": abs(cfg.workers.local_lr - 0.3)}]]

    monkeypatch.setattr(j, "run_curves", fake_curves)
    sc = SCALES["tiny"]
    base = _task_config(sc, rounds=sc.rounds)
    grids = {"fedavg": {"workers.local_lr": [0.5, 0.3]}, "slowmo": {"workers.local_lr": [0.1]},
             "fedadam": {"optimizer.lr": [0.01]}}  # no local_lr axis: the paper's LOCAL_LRS
    lr, trials = j._tune_local_lr(j._learned_config(base, "lopt:init"), {"rounds": 4}, grids,
                                  tmp_path / "LOpt-A", resume=False)
    assert lr == 0.3 and set(trials) == {1.0, 0.5, 0.3, 0.1}
    assert all(seeds == [j.TUNING_SEED] for _, seeds in tried)  # never an evaluation seed
    with open(tmp_path / "LOpt-A" / "trials.csv") as fh:
        assert [r["best"] for r in csv.DictReader(fh)] == ["False", "False", "True", "False"]
    only = {b: {"workers.local_lr": [0.5]} for b in ("fedavg", "slowmo", "fedadam")}
    assert set(j._tune_local_lr(j._learned_config(base, "lopt:init"), {"rounds": 4}, only,
                                tmp_path / "x", resume=False)[1]) == {0.5}

    monkeypatch.undo()
    monkeypatch.setattr(j, "_tune_local_lr", lambda cfg, *a: (0.3, {0.3: 0.1, 0.5: 0.2}))
    sc = dataclasses.replace(SCALES["tiny"], cifar_rounds=0, other_workers=(), seeds=1)
    rows, _ = _generalization(sc, base, "lagg:init", "lopt:init", {}, [0],
                                   lambda msg: None, tmp_path / "out")
    methods = {r["method"] for r in rows}
    assert {"LAgg-A", "LOpt-A", "LAgg-A (local lr 0.5)", "LOpt-A (local lr 0.5)"} <= methods
    saved = json.loads((tmp_path / "out" / "runs" / "MLP-128-128-on-digits-LAgg-A.json")
                       .read_text())
    assert saved["key"]["config"]["workers"]["local_lr"] == 0.3
    assert saved["key"]["config"]["model"] == "mlp:128,128:relu"


def test_other_weights_under_the_same_name_are_run_again(tmp_path, monkeypatch):
    from metagg.experiments import joseph2025 as j

    sc = SCALES["tiny"]
    cfg = j._learned_config(_task_config(sc, rounds=2), "lopt:init")
    ds = runs.dataset_for(cfg)
    cache = tmp_path / "LOpt-A.json"
    first = runs.run_curves(cfg, ds, 1, [0], cache, resume=False)
    runs.ACCOUNT.update(read_back=0, compute_s=0.0)
    assert runs.run_curves(cfg, ds, 1, [0], cache, resume=True) == first
    assert runs.ACCOUNT["read_back"] == 1  # and the time it took when it ran is counted
    assert runs.ACCOUNT["compute_s"] == json.loads(cache.read_text())["wall_s"] > 0
    monkeypatch.setattr(runs, "weights_sha256", lambda name: "another sha256")
    monkeypatch.setattr(runs, "run_curve", lambda *a: [{"round": 0, "train_loss": 9.0}])
    assert runs.run_curves(cfg, ds, 1, [0], cache, resume=True) == \
        [[{"round": 0, "train_loss": 9.0}]]


def test_local_lr_falls_back_to_the_trained_one_when_every_trial_diverges(tmp_path,
                                                                          monkeypatch):
    from metagg.experiments import joseph2025 as j

    nan = float("nan")
    monkeypatch.setattr(j, "run_curves", lambda cfg, *a: [[{"round": 4, "train_loss": nan}]])
    base = _task_config(SCALES["tiny"], rounds=4)
    grids = {b: {"workers.local_lr": [1.0, 0.3]} for b in BASELINES}
    lr, trials = j._tune_local_lr(j._learned_config(base, "lopt:init"), {"rounds": 4}, grids,
                                  tmp_path, resume=False)
    assert lr == base.workers.local_lr == 0.5 and set(trials) == {1.0, 0.5, 0.3}


def test_cli_reproduce_options():
    from metagg.cli import build_parser

    args = build_parser().parse_args(["reproduce", "joseph2025", "--out", "x"])
    assert args.generalization and not args.resume
    args = build_parser().parse_args(["reproduce", "joseph2025", "--no-generalization",
                                      "--resume", "--out", "x"])
    assert not args.generalization and args.resume


@pytest.mark.parametrize("log_loss", [False, True])
def test_plot_overlay_log_loss_axis(tmp_path, monkeypatch, log_loss):
    from metagg import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path, title: seen.append(fig))
    runs = [[{"round": r, "train_loss": 1.0 / (r + 1), "test_accuracy": 0.5} for r in range(3)]]
    plots.plot_overlay({"a": runs}, tmp_path / "x.png", log_loss=log_loss)
    loss_ax = seen[0].axes[0]
    assert loss_ax.get_yscale() == ("log" if log_loss else "linear")  # span 3× < 20×
