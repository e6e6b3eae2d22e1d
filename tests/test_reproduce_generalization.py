"""`metagg reproduce generalization` at its tiny (test) scale, and its metrics."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest

from metagg.cli import main
from metagg.experiments import runs
from metagg.experiments.generalization import (
    SCALES,
    _aggregate,
    _iqm,
    below_every_seed,
    final_local_lr,
    learned_local_lr,
    reproduce_generalization,
    select_scale,
    summarize_task,
)
from metagg.learned.lagg import LAggA, LAggConfig, save_lagg
from metagg.learned.rnn import RNNAggregator, RNNConfig, save_rnn
from metagg.tasks.families import HELD_OUT, TaskSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def curve(losses, every=5):
    return [{"round": i * every, "train_loss": v, "test_accuracy": 0.5}
            for i, v in enumerate(losses)]


def test_task_summary_speedup_ratios_and_spread():
    curves = {
        "slowmo": [curve([2, 1.0, 0.5, 0.4, 0.3]), curve([2, 1.0, 0.5, 0.4, 0.3])],
        "fedavg": [curve([2, 1.5, 0.9, 0.8, 0.7]), curve([2, 1.5, 0.9, 0.8, 0.7])],
        "learned": [curve([2, 0.5, 0.25, 0.2, 0.15]), curve([2, 0.4, 0.25, 0.2, 0.15])],
    }
    rows = {r["method"]: r for r in summarize_task(curves, ["slowmo", "fedavg"], rounds=10)}
    assert rows["learned"]["best_baseline"] == "slowmo"
    assert rows["learned"]["rounds_to_target"] == 5 and rows["learned"]["speedup"] == 2.0
    assert rows["learned"]["ratio_at_R"] == pytest.approx(0.5)
    assert rows["learned"]["ratio_at_end"] == pytest.approx(0.5)  # 0.15 / 0.3
    assert rows["fedavg"]["speedup"] is None and rows["fedavg"]["ratio_at_R"] == 1.8
    assert math.isnan(rows["learned"]["spread_ratio"])  # the best baseline has no spread
    agg = _aggregate([rows["learned"], {**rows["fedavg"]}], SCALES["tiny"])
    # unreached counts as 1/long = 0.5: geometric mean of 2 and 0.5 is 1
    assert agg["geomean_speedup"] == pytest.approx(1.0) and agg["unreached"] == 1
    assert agg["worse_at_R"] == 1 and agg["worse_at_end"] == 1
    assert _iqm([1, 2, 3, 100]) == 2.5
    assert rows["learned"]["local_lr_at_end"] is None  # no lr recorded
    assert rows["learned"]["below_every_seed_at_end"]
    assert not rows["fedavg"]["below_every_seed_at_end"]
    chosen = [curve([2, 1.0]), curve([2, 1.0])]
    chosen[0][-1]["local_lr"], chosen[1][-1]["local_lr"] = 0.4, 0.8
    assert final_local_lr(chosen) == pytest.approx(0.6)  # mean over seeds


def test_task_summary_when_the_best_baseline_fits_the_task():
    # float32 cross-entropy reaches 0.0 on small tables (wine at R = 300); below FITTED a
    # loss counts as 0, and the speed-up is against the rounds the best baseline took
    curves = {
        "slowmo": [curve([2, 0.5, 0.0, 2e-6]), curve([2, 0.4, 1e-7, 0.0])],
        "fedavg": [curve([2, 0.9, 0.1, 0.1]), curve([2, 0.8, 0.1, 0.1])],
        "adam": [curve([2, 0.9, 0.1, 0.0]), curve([2, 0.8, 0.1, 0.0])],  # lower, later
        "learned": [curve([2, 1e-6, 0.0, 0.0]), curve([2, 3e-6, 0.0, 0.0])],
        "late": [curve([2, 0.5, 0.2, 2e-6]), curve([2, 0.5, 0.2, 3e-6])],
    }
    rows = {r["method"]: r for r in summarize_task(curves, ["slowmo", "fedavg", "adam"],
                                                   rounds=15)}
    # the target is the first baseline to fit, not the one whose last bits are lowest
    assert rows["slowmo"]["best_baseline"] == "slowmo" and rows["slowmo"]["speedup"] == 1.0
    assert rows["adam"]["ratio_at_R"] == 1.0 and rows["adam"]["speedup"] == pytest.approx(2 / 3)
    assert rows["learned"]["ratio_at_R"] == 1.0 and rows["late"]["ratio_at_R"] == 1.0
    assert rows["fedavg"]["ratio_at_R"] == math.inf
    assert rows["learned"]["rounds_to_target"] == 5 and rows["learned"]["speedup"] == 2.0
    assert rows["late"]["speedup"] == pytest.approx(10 / 15)
    assert rows["fedavg"]["speedup"] is None
    assert not rows["learned"]["below_every_seed_at_R"]  # level with slowmo, not below
    assert rows["learned"]["ratio_at_end"] == 1.0
    agg = _aggregate(list(rows.values()), SCALES["tiny"])
    assert agg["worse_at_R"] == 1  # fedavg, the only one not fitted


def test_scales_only_use_held_out_tasks():
    names = {t.name for t in HELD_OUT}
    for sc in SCALES.values():
        assert sc.tasks and all(t.name in names for t in sc.tasks)
    assert len(SCALES["full"].tasks) == len(HELD_OUT)


def test_a_task_whose_data_is_missing_is_skipped_and_reported(tmp_path, general_lagg,
                                                              monkeypatch):
    missing = TaskSpec("mnist@8", "mlp:16:relu", 4, 1, 16)  # MNIST is never on disk here
    monkeypatch.setenv("METAGG_DATA_DIR", str(tmp_path / "nothing"))
    monkeypatch.setitem(SCALES, "tiny", dataclasses.replace(
        SCALES["tiny"], tasks=(missing, SCALES["tiny"].tasks[0])))
    s = reproduce_generalization(tmp_path / "out", scale="tiny",
                                 learned={"LAgg-A": general_lagg}, log=lambda m: None)
    assert list(s["skipped"]) == [missing.name]
    assert {r["task"] for r in s["rows"]} == {SCALES["tiny"].tasks[1].name}
    assert f"Skipped `{missing.name}`" in (tmp_path / "out" / "report.md").read_text()


@pytest.fixture(scope="module")
def general_lagg(tmp_path_factory):
    path = tmp_path_factory.mktemp("agg") / "general"
    cfg = LAggConfig(kind="lagg", step_mode="general", residual_base="momentum",
                     residual_scale=0.6, correction_scale=0.1)
    save_lagg(path, LAggA(config=cfg), trained_on={"local_lr": 0.3})
    return f"lagg:{path}"


def test_tiny_run_writes_every_file_and_resumes_without_training(tmp_path, general_lagg,
                                                                  monkeypatch):
    assert learned_local_lr(general_lagg) == 0.3
    assert learned_local_lr("lagg:pretrained/general") == 0.5  # the shipped general-lagg
    learned = {"LAgg-A": general_lagg, "K8": "lagg:pretrained/fmnist8x8-mlp32-lagg-k8h4"}
    s = reproduce_generalization(tmp_path, scale="tiny", learned=learned, log=lambda m: None)
    for name in ("tasks.csv", "summary.json", "generalization.png", "report.md"):
        assert (tmp_path / name).is_file()
    with open(tmp_path / "tasks.csv") as fh:
        rows = list(csv.DictReader(fh))
    tasks = [t.name for t in SCALES["tiny"].tasks]
    # the fixed-K=8 LAgg-A cannot run with K = 4 or 16: skipped, not faked
    assert {(r["task"], r["method"]) for r in rows} == \
        {(t, m) for t in tasks for m in ("fedavg", "slowmo", "fedavg+prodigy", "LAgg-A")}
    assert not any(r["baseline"] == "True" for r in rows if r["method"] == "fedavg+prodigy")
    assert s["aggregate"]["K8"] == {"tasks": 0}
    assert s["aggregate"]["LAgg-A"]["tasks"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "no per-task tuning" in report and all(t in report for t in tasks)
    assert json.loads((tmp_path / "summary.json").read_text())["scale"] == "tiny"

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "run_curve", no_training)
    again = reproduce_generalization(tmp_path, scale="tiny", learned=learned, resume=True,
                                     log=lambda m: None)
    assert again["rows"] == s["rows"] and again["read_back"] > 0


def test_cli(tmp_path, general_lagg, capsys, monkeypatch):
    monkeypatch.setitem(SCALES, "quick", SCALES["tiny"])
    assert main(["reproduce", "generalization", "--lagg", general_lagg, "--lopt", "none",
                 "--out", str(tmp_path)]) == 0
    assert "Learned aggregators on held-out tasks" in capsys.readouterr().out


def test_select_scale_keeps_the_named_tasks_and_sets_the_seeds():
    full = SCALES["full"]
    sc = select_scale(full, seeds=7, tasks=["digits", "fashion_mnist"])
    assert sc.seeds == 7 and sc.rounds == full.rounds
    # a dataset name selects every task on it (two on Fashion-MNIST: the MLP and the CNN)
    assert [t.dataset for t in sc.tasks] == ["digits", "fashion_mnist@28", "fashion_mnist@16"]
    by_name = select_scale(full, tasks=[HELD_OUT[4].name])
    assert by_name.tasks == (HELD_OUT[4],) and by_name.seeds == full.seeds
    assert select_scale(full) == full
    with pytest.raises(ValueError, match=r"not in this scale.*digits/mlp"):
        select_scale(full, tasks=["mnist"])
    with pytest.raises(ValueError, match="seeds"):
        select_scale(full, seeds=0)


def test_cli_seeds_and_tasks(tmp_path, general_lagg, capsys, monkeypatch):
    monkeypatch.setitem(SCALES, "quick", SCALES["tiny"])
    assert main(["reproduce", "generalization", "--lagg", general_lagg, "--lopt", "none",
                 "--seeds", "3", "--tasks", "wine", "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["seeds"] == [0, 1, 2]
    assert {r["task"] for r in s["rows"]} == {t.name for t in SCALES["tiny"].tasks
                                              if t.dataset == "wine"}
    assert "seeds 0..2" in capsys.readouterr().out
    assert main(["reproduce", "generalization", "--lagg", general_lagg, "--lopt", "none",
                 "--tasks", "cifar10", "--out", str(tmp_path / "x")]) != 0
    assert "not in this scale" in capsys.readouterr().err


def test_below_every_seed_compares_seed_by_seed():
    curves = {"a": [curve([2, 1.0]), curve([2, 3.0])], "b": [curve([2, 1.5]), curve([2, 2.0])],
              "c": [curve([2, 0.5]), curve([2, 4.0])], "x": [curve([2, 0.9]), curve([2, 1.9])]}
    # x beats a and b on both seeds; c is lower than the mean of a's seeds on seed 0 only
    assert below_every_seed(curves, "x", ["a", "b"], 5)
    assert not below_every_seed(curves, "c", ["a", "b"], 5)
    assert not below_every_seed(curves, "x", ["a", "b", "c"], 5)  # c's seed 0 is lower
    assert not below_every_seed(curves, "x", ["a"], 7)  # no such round: missing, not a win
    nan = {**curves, "x": [curve([2, math.nan]), curve([2, 0.1])]}
    assert not below_every_seed(nan, "x", ["a", "b"], 5)


@pytest.fixture(scope="module")
def small_rnn(tmp_path_factory):
    path = tmp_path_factory.mktemp("agg") / "rnn"
    save_rnn(path, RNNAggregator(config=RNNConfig(num_workers=3, hidden=4)))
    return f"rnn:{path}"


def test_an_rnn_runs_in_gradient_mode_against_tuned_sgd_and_adam(tmp_path, small_rnn):
    s = reproduce_generalization(tmp_path, scale="tiny", learned={"RNN": small_rnn},
                                 log=lambda m: None)
    tasks = [f"{dataclasses.replace(t, num_workers=3, local_steps=1).name} (gradient mode)"
             for t in SCALES["tiny"].tasks]
    assert all("/K3-H1-" in t for t in tasks)
    # only the gradient-mode section runs: no local-SGD baselines without a local learner
    assert {(r["task"], r["method"]) for r in s["rows"]} == \
        {(t, m) for t in tasks for m in ("sgd", "adam", "mean+prodigy", "RNN")}
    reference = [r for r in s["rows"] if r["method"] == "mean+prodigy"]
    assert not any(r["baseline"] for r in reference)  # shown, not what the RNN must beat
    assert all(r["mode"] == "gradient" for r in s["rows"])
    runs_file = tmp_path / "runs" / f"{runs.slug(tasks[0])}-RNN.json"
    cfg = json.loads(runs_file.read_text())["key"]["config"]
    assert cfg["workers"]["mode"] == "gradient" and cfg["workers"]["num_workers"] == 3
    adam = json.loads((tmp_path / "runs" / f"{runs.slug(tasks[0])}-adam.json").read_text())
    adam = adam["key"]["config"]
    # the baseline sees the RNN's batch: one gradient of B examples per worker and round
    assert adam["workers"]["batch_size"] == cfg["workers"]["batch_size"]
    assert adam["workers"]["num_workers"] == 3 and adam["optimizer"]["name"] == "adam"
    assert s["aggregate"]["RNN"]["tasks"] == 2
    assert "below_every_seed" in s["aggregate"]["RNN"]
    report = (tmp_path / "report.md").read_text()
    assert "gradient mode" in report and "server sgd and + server adam" in report


def test_cli_rnn_only(tmp_path, small_rnn, capsys, monkeypatch):
    monkeypatch.setitem(SCALES, "quick", SCALES["tiny"])
    assert main(["reproduce", "generalization", "--lagg", "none", "--lopt", "none",
                 "--rnn", small_rnn, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "K3-H1-B16/iid (gradient mode) | RNN" in out and "fedavg" not in out


def test_cli_defaults_before_general_weights_ship_say_what_to_pass(tmp_path, capsys,
                                                                    monkeypatch):
    from metagg.learned import store

    monkeypatch.setattr(store, "pretrained_names", lambda: ["digits-mlp20-lstm"])
    assert main(["reproduce", "generalization", "--lopt", "none",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "LAgg-A lagg:pretrained/general: no general weights ship yet" in err
    assert "--lagg lagg:runs/g" in err and not (tmp_path / "report.md").exists()


def test_cli_defaults_judge_the_shipped_general_weights(tmp_path, capsys, monkeypatch):
    """With no --lagg / --lopt: the shipped lagg:pretrained/general and
    lopt:pretrained/general; where no general LOpt-A ships, none (said on stderr), and an
    explicit --lopt lopt:pretrained/general is refused."""
    from metagg.experiments import generalization
    from metagg.learned import store

    seen = {}

    def fake(out, *, learned, **kw):
        seen.clear()
        seen.update(learned)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text("report")

    monkeypatch.setattr(generalization, "reproduce_generalization", fake)
    assert main(["reproduce", "generalization", "--out", str(tmp_path)]) == 0
    assert seen == {"LAgg-A": "lagg:pretrained/general", "LOpt-A": "lopt:pretrained/general"}
    monkeypatch.setattr(store, "pretrained_names", lambda: ["general-lagg"])
    assert main(["reproduce", "generalization", "--out", str(tmp_path)]) == 0
    assert seen == {"LAgg-A": "lagg:pretrained/general"}
    assert "LOpt-A: no general weights ship yet; skipped" in capsys.readouterr().err
    assert main(["reproduce", "generalization", "--lopt", "lopt:pretrained/general",
                 "--out", str(tmp_path)]) == 2
    assert "LOpt-A lopt:pretrained/general: no general weights ship yet" in (
        capsys.readouterr().err)


def test_cli_refuses_an_aggregator_of_another_kind_for_a_flag(tmp_path, capsys):
    assert main(["reproduce", "generalization", "--lagg", "none", "--lopt", "none",
                 "--rnn", "arnn:pretrained/digits-mlp20-arnn-lstm", "--out", str(tmp_path)]) == 2
    assert "--rnn takes a rnn:PATH aggregator" in capsys.readouterr().err
