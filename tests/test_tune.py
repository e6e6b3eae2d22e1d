"""metagg.tune: the baseline grid search."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from metagg.config import ConfigError, load_config
from metagg.tune import BASELINES, parse_grid, trial_config, tune

TINY = ["rounds=5", "model=mlp:8:sigmoid", "workers.num_workers=3", "workers.batch_size=8",
        "workers.mode=local_sgd", "workers.local_steps=2", "eval_train_samples=200",
        "trusted_samples=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_grid_reads_yaml_values_and_rejects_garbage():
    assert parse_grid(["optimizer.lr=0.1,1e-2", "workers.local_steps=4"]) == {
        "optimizer.lr": [0.1, 0.01], "workers.local_steps": [4]}
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_grid(["optimizer.lr"])


def test_trial_config_applies_baseline_point_and_one_step_batch():
    cfg = load_config(None, TINY)
    slowmo = trial_config(cfg, "slowmo", {"optimizer.lr": 0.3, "optimizer.beta": 0.8}, 7, 4)
    opt = slowmo.optimizer
    assert (opt.name, opt.lr, opt.beta) == ("slowmo", 0.3, 0.8)
    assert (slowmo.workers.mode, slowmo.rounds, slowmo.seed) == ("local_sgd", 7, 4)
    # one step per round on the K·H·B examples a local-SGD round sees
    sgd = trial_config(cfg, "sgd", {"optimizer.lr": 0.1}, 7, 0)
    w = sgd.workers
    assert (w.mode, w.local_steps, w.batch_size) == ("gradient", 1, 16)
    with pytest.raises(ConfigError, match="unknown baseline"):
        trial_config(cfg, "fedprox", {}, 7, 0)
    with pytest.raises(ConfigError, match=r"optimizer\.lrr"):
        trial_config(cfg, "sgd", {"optimizer.lrr": 0.1}, 7, 0)


def test_tune_picks_the_lowest_loss_and_writes_a_runnable_config(tmp_path):
    cfg = load_config(None, TINY)
    seen = []
    result = tune(cfg, "fedavg", budget=6, seeds=2, out_dir=tmp_path,
                  grid={"workers.local_lr": [1.0, 0.01], "workers.local_steps": [2]},
                  on_trial=seen.append, progress=False)
    assert len(seen) == 2 and result["trials"] == 2
    losses = {r["workers.local_lr"]: r["train_loss"] for r in seen}
    assert result["best"]["workers.local_lr"] == min(losses, key=losses.get)
    assert result["best"]["workers.local_lr"] == 1.0  # lr 0.01 barely moves in 6 rounds
    with open(tmp_path / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["workers.local_lr"]) for r in rows] == [1.0, 0.01]
    best = load_config(tmp_path / "best.yaml")
    assert (best.workers.local_lr, best.workers.mode, best.rounds) == (1.0, "local_sgd", 6)
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["seed"] == cfg.seed


def test_tune_is_deterministic_and_max_trials_samples_the_grid():
    cfg = load_config(None, TINY)
    kw = dict(budget=3, grid={"optimizer.lr": [1.0, 0.1, 0.01, 0.001]}, max_trials=2,
              progress=False)
    a, b = tune(cfg, "sgd", **kw), tune(cfg, "sgd", **kw)
    assert a == b and a["trials"] == 2


def test_tune_checks_every_point_before_running():
    cfg = load_config(None, TINY)
    with pytest.raises(ConfigError, match="local_lr"):
        tune(cfg, "fedavg", budget=3, grid={"workers.local_lr": [0.5, "fast"]}, progress=False)
    with pytest.raises(ConfigError, match="metric"):
        tune(cfg, "fedavg", budget=3, metric="accuracy")


def test_every_baseline_builds_on_the_default_task():
    cfg = load_config(None, TINY)
    for name, b in BASELINES.items():
        point = {k: v[0] for k, v in b.grid.items()}
        assert trial_config(cfg, name, point, 3, 0).rounds == 3


def test_cli_baseline_names_match_the_library():
    from metagg.cli.run import BASELINE_NAMES

    assert set(BASELINE_NAMES) == set(BASELINES)


def test_cli_tune_writes_best_config(tmp_path, capsys):
    from metagg.cli import main

    argv = ["tune", "--baseline", "sgd", "--budget", "3", "--grid", "optimizer.lr=1,1e-3",
            "--out", str(tmp_path), *[a for kv in TINY for a in ("--set", kv)]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trial   1: optimizer.lr=0.001" in out and "best sgd (2 trials)" in out
    assert load_config(tmp_path / "best.yaml").workers.mode == "gradient"
    assert main(["tune", "--baseline", "sgd", "--budget", "3", "--grid", "optimizer.lr",
                 "--out", str(tmp_path)]) == 2


def test_interrupted_search_resumes_with_the_trials_it_finished(tmp_path):
    cfg = load_config(None, TINY)
    kw = dict(budget=3, grid={"optimizer.lr": [1.0, 0.1, 0.01]}, progress=False)
    full = tune(cfg, "sgd", out_dir=tmp_path / "a", **kw)
    lines = (tmp_path / "a" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # as if killed during the third trial, with a torn line
    (tmp_path / "a" / "trials.jsonl").write_text("\n".join(lines[:2]) + '\n{"tri')
    ran = []
    resumed = tune(cfg, "sgd", out_dir=tmp_path / "a", resume=True, on_trial=ran.append, **kw)
    assert [r["trial"] for r in ran] == [2]
    assert resumed == full
    assert len((tmp_path / "a" / "trials.jsonl").read_text().splitlines()) == 3  # no torn line
    with pytest.raises(ConfigError, match="different search"):
        tune(cfg, "sgd", out_dir=tmp_path / "a", resume=True, **{**kw, "budget": 4})
    with pytest.raises(ConfigError, match="nothing to resume"):
        tune(cfg, "sgd", out_dir=tmp_path / "b", resume=True, **kw)


def test_search_written_before_a_config_key_existed_still_resumes(tmp_path):
    cfg = load_config(None, TINY)
    kw = dict(budget=3, grid={"optimizer.lr": [1.0, 0.1]}, progress=False)
    full = tune(cfg, "sgd", out_dir=tmp_path, **kw)
    state = json.loads((tmp_path / "search.json").read_text())
    del state["task"]["workers"]["momentum"]  # as written by an older metagg
    (tmp_path / "search.json").write_text(json.dumps(state))
    assert tune(cfg, "sgd", out_dir=tmp_path, resume=True, **kw) == full
