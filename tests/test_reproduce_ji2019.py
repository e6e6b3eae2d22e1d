"""`metagg reproduce ji2019` at the hidden tiny scale: files, CSV columns and rows, report."""

import csv

import pytest

from metagg.cli import main as cli_main
from metagg.data import load_dataset
from metagg.experiments.ji2019 import (
    CSV_COLUMNS,
    SCALES,
    check_seeds_disjoint,
    reproduce_ji2019,
)
from metagg.learned import RNNAggregator, RNNConfig, save_aggregator

pytestmark = pytest.mark.usefixtures("one_thread")


def read(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def fmnist_available() -> bool:
    try:
        load_dataset("fashion_mnist")
    except FileNotFoundError:
        return False
    return True


def test_tiny_reproduction_writes_every_figure(tmp_path, capsys):
    # an untrained 12-input RNN stands in for the figure-7 aggregator (no zoo entry needed)
    hetero = tmp_path / "hetero-rnn"
    save_aggregator(hetero, RNNAggregator(RNNConfig(num_workers=12)),
                    trained_on={"seed": 0, "iterations": 1, "validation_seeds": 1})
    out = tmp_path / "out"
    assert cli_main(["reproduce", "ji2019", "--scale", "tiny", "--out", str(out),
                     "--hetero-rnn", str(hetero)]) == 0
    assert "Figure 7" in capsys.readouterr().out

    for f in ("4", "5", "6", "7"):
        assert (out / f"figure{f}.png").stat().st_size > 1000
    assert (out / "tuning.csv").exists()
    scale = SCALES["tiny"]
    evals = scale.points + 1  # round 0 and every rounds // points
    fm = fmnist_available()

    cols, rows = read(out / "figure4.csv")
    assert tuple(cols) == CSV_COLUMNS
    tasks = {r["task"] for r in rows}
    assert tasks == ({"digits, mlp:20:sigmoid"} | ({"fashion_mnist, mlp:20:sigmoid"} if fm else
                                                   set()))
    assert {r["aggregator"] for r in rows} == {"rnn-lstm", "arnn-lstm", "mean+sgd", "mean+adam"}
    assert len(rows) == len(tasks) * 4 * scale.seeds * evals
    rounds = scale.rounds["digits"]
    assert {int(r["round"]) for r in rows} == set(range(0, rounds + 1, rounds // scale.points))
    assert all(float(r["train_loss"]) > 0 and 0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    assert {r["lr"] for r in rows if r["aggregator"] == "mean+adam"} == {"0.1"}

    _, rows = read(out / "figure5.csv")
    assert {r["panel"] for r in rows} == ({"left", "right"} if fm else {"left"})
    assert len(rows) == (5 if fm else 3) * 3 * scale.seeds * evals

    _, rows = read(out / "figure6.csv")
    assert {r["setting"] for r in rows} == set(scale.byz_settings)
    assert len(rows) == len(scale.byz_settings) * 10 * scale.seeds * evals
    assert {"krum", "arnn-ipm7", "zeno", "fltrust", "median"} <= {r["aggregator"] for r in rows}

    _, rows = read(out / "figure7.csv")
    assert {r["aggregator"] for r in rows} == {
        f"{agg} ({workers})" for agg in ("rnn", "mean+sgd", "mean+adam")
        for workers in ("4 models × 3", "12 mlp:20:sigmoid", "3 mlp:20:sigmoid only")}
    assert len(rows) == 9 * scale.seeds * evals

    report = (out / "report.md").read_text()
    for heading in ("Figure 4", "Figure 5", "Figure 6", "Figure 7", "Stand-in datasets"):
        assert heading in report
    # our own comparison, computed from figure6.csv's final accuracies
    _, rows6 = read(out / "figure6.csv")
    last = max(int(r["round"]) for r in rows6)

    def final(agg: str, setting: str) -> float:
        vals = [float(r["test_accuracy"]) for r in rows6 if r["aggregator"] == agg
                and r["setting"] == setting and int(r["round"]) == last]
        return 100 * sum(vals) / len(vals)

    diff = final("arnn-ipm7", "ipm 7/10") - final("krum", "ipm 7/10")
    assert f"arnn-ipm7 − krum = {diff:+.1f}" in report
    assert "rnn-gru: not in the zoo" in report  # missing pretrained models are named


def test_missing_hetero_rnn_is_reported(tmp_path, monkeypatch):
    import metagg.experiments.ji2019.runner as ji2019

    monkeypatch.setattr(ji2019, "HETERO_RNN", "no-such-rnn")  # as if the zoo lacked it
    report = reproduce_ji2019(tmp_path, "tiny", figures=["7"]).read_text()
    assert "RNN rows missing" in report
    _, rows = read(tmp_path / "figure7.csv")
    assert rows and not any(r["aggregator"].startswith("rnn") for r in rows)
    with pytest.raises(ValueError, match="unknown figure"):
        reproduce_ji2019(tmp_path, "tiny", figures=["8"])


def test_seed_clash_with_meta_training_is_refused(tmp_path):
    save_aggregator(tmp_path, RNNAggregator(RNNConfig(num_workers=10)),
                    trained_on={"seed": 100, "iterations": 1, "validation_seeds": 1})
    with pytest.raises(ValueError, match="meta-train"):
        check_seeds_disjoint([100, 101], [f"rnn:{tmp_path}"])
    check_seeds_disjoint([101], [f"rnn:{tmp_path}", "krum"])


def test_meta_train_fills_the_gaps_and_is_reused(tmp_path, monkeypatch):
    import metagg.experiments.ji2019.runner as ji2019

    monkeypatch.setattr(ji2019, "HETERO_RNN", "digits-hetero4x3-mlp20-lstm-test")  # not shipped
    reproduce_ji2019(tmp_path, "tiny", figures=["4", "7"], meta_train=True)
    made = sorted(p.name for p in (tmp_path / "aggregators").iterdir())
    expected = ["digits-hetero4x3-mlp20-lstm-test", "digits-mlp20-arnn-gru", "digits-mlp20-gru"]
    if fmnist_available():
        expected.append("fmnist-mlp20-lstm")
    assert made == sorted(expected)
    _, rows = read(tmp_path / "figure4.csv")
    assert {"rnn-gru", "arnn-gru"} <= {r["aggregator"] for r in rows}
    _, rows = read(tmp_path / "figure7.csv")
    assert "rnn (4 models × 3)" in {r["aggregator"] for r in rows}
    # a second run without --meta-train finds them in OUT/aggregators
    report = reproduce_ji2019(tmp_path, "tiny", figures=["7"]).read_text()
    assert "RNN rows missing" not in report and "hetero" in report


def test_interrupted_meta_training_is_not_taken_for_a_finished_one(tmp_path):
    import json

    from metagg.experiments.ji2019.runner import _meta_iterations_done

    assert _meta_iterations_done(tmp_path) is None  # nothing there
    (tmp_path / "meta_state.json").write_text(json.dumps({"iteration": 40}))
    assert _meta_iterations_done(tmp_path) == 40
    (tmp_path / "meta_state.json").write_text("{torn")
    assert _meta_iterations_done(tmp_path) is None


def test_a_rerun_gives_the_same_tables(tmp_path):
    """A reproduction re-run with the same code must give the same tables bit for bit, so
    the committed reports stay true (and drift is noticed the day it happens)."""
    for name in ("a", "b"):
        reproduce_ji2019(tmp_path / name, "tiny", figures=["4", "6"])
    tables = sorted(p.name for p in (tmp_path / "a").glob("*.csv"))
    assert tables == ["figure4.csv", "figure6.csv", "tuning.csv"]
    for table in tables:
        assert (tmp_path / "a" / table).read_bytes() == (tmp_path / "b" / table).read_bytes(), \
            table
    assert "Produced by metagg" in (tmp_path / "a" / "report.md").read_text()
