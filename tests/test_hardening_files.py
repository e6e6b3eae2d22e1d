"""Runs and files under hostile use: nothing corrupt is resumed, nothing is silently
overwritten, bad data is refused by name, every JSON file is strict JSON (issue 16)."""

import json
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from metagg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metagg.config import ConfigError, load_config
from metagg.data import load_dataset
from metagg.data.datasets import Dataset
from metagg.simulation import Simulation, read_metrics


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as jq and browsers do."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def _cfg(*overrides: str):
    return load_config(None, ["rounds=4", "eval_every=2", "checkpoint_every=2",
                              "workers.num_workers=3", *overrides])


# -- checkpoints ------------------------------------------------------------------

def test_edited_checkpoint_metadata_is_refused(tmp_path):
    Simulation(_cfg()).run(tmp_path, progress=False)
    sidecar = tmp_path / "checkpoint.json"
    meta = json.loads(sidecar.read_text())
    assert meta["round"] == 4
    meta["round"] = 2  # resume round-4 weights as round 2?
    sidecar.write_text(json.dumps(meta, indent=2))
    with pytest.raises(CheckpointError, match=r"modified after it was written.*round"):
        Simulation(_cfg()).run(tmp_path, progress=False, resume=True)


def test_untouched_checkpoint_still_loads_and_nan_metadata_compares(tmp_path):
    save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, {"round": 3, "best": float("nan")})
    tensors, meta = load_checkpoint(tmp_path / "c")
    assert meta["round"] == 3 and torch.equal(tensors["w"], torch.ones(2))


# -- file modes and strict JSON ---------------------------------------------------

def test_every_output_file_has_the_same_mode(tmp_path):
    Simulation(_cfg()).run(tmp_path / "run", progress=False)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_diverged_run_writes_null_not_nan_and_resumes(tmp_path):
    cfg = _cfg("optimizer.lr=1e38", "checkpoint_every=2")
    sim = Simulation(cfg)
    sim.run(tmp_path, progress=False, stop_after=2)
    rows = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["train_loss"] is None for r in rows), rows  # it did diverge
    summary = Simulation(cfg).run(tmp_path, progress=False, resume=True)
    assert summary["diverged"] is True
    _strict_json((tmp_path / "summary.json").read_text())
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)
    back = read_metrics(tmp_path / "metrics.jsonl")
    assert all(isinstance(r["train_loss"], float) for r in back)  # null read back as NaN


# -- no silent overwrite ------------------------------------------------------------

def _metagg(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metagg", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=300)


def test_run_refuses_to_overwrite_results(tmp_path):
    common = ["run", "--set", "rounds=2", "--set", "workers.num_workers=3", "--no-progress",
              "--out", "out"]
    assert _metagg(*common, cwd=tmp_path).returncode == 0
    before = (tmp_path / "out" / "summary.json").read_text()
    again = _metagg(*common, "--set", "seed=5", cwd=tmp_path)
    assert again.returncode == 2
    assert "already holds results" in again.stderr and "--overwrite" in again.stderr
    assert (tmp_path / "out" / "summary.json").read_text() == before  # nothing lost
    assert _metagg(*common, "--overwrite", "--set", "seed=5", cwd=tmp_path).returncode == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["seed"] == 5


def test_compare_and_tune_refuse_to_overwrite(tmp_path):
    from argparse import Namespace

    from metagg.cli.run import refuse_to_overwrite

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "trials.jsonl").write_text("")
    args = Namespace(resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="already holds results"):
        refuse_to_overwrite(tmp_path / "t", ("trials.jsonl", "summary.json"), args)
    seed_dir = tmp_path / "c" / "no_attack" / "mean" / "seed0"
    seed_dir.mkdir(parents=True)
    (seed_dir / "checkpoint.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"checkpoint\.json"):
        refuse_to_overwrite(tmp_path / "c", ("results.csv", "*/*/seed*/checkpoint.json"), args)
    refuse_to_overwrite(tmp_path / "c", ("results.csv",), Namespace(resume=True, overwrite=False))
    refuse_to_overwrite(tmp_path / "new", ("results.csv",), args)  # nothing there: fine


# -- data ---------------------------------------------------------------------------

def _npz(path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def test_float64_data_that_overflows_float32_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    path = _npz(tmp_path / "big.npz", rng.normal(size=(20, 4)) * 1e200, np.arange(20) % 3,
                rng.normal(size=(5, 4)), np.arange(5) % 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning either
        with pytest.raises(ValueError, match=r"x_train has 80 value\(s\).*float32"):
            load_dataset("npz", path=path)


def test_empty_test_split_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    path = _npz(tmp_path / "e.npz", rng.normal(size=(20, 4)), np.arange(20) % 3,
                np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="no test examples"):
        load_dataset("npz", path=path)


def test_inferred_class_count_is_said_and_can_be_set(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0, 5, 99] * 6 + [0, 5])
    path = _npz(tmp_path / "g.npz", rng.normal(size=(20, 4)).astype(np.float32), labels,
                rng.normal(size=(3, 4)).astype(np.float32), np.array([0, 5, 99]))
    with pytest.warns(UserWarning, match=r"100 classes inferred.*97 of the labels"):
        assert load_dataset("npz", path=path).num_classes == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset("npz", path=path, num_classes=120).num_classes == 120
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.49 \(num_classes=50\)"):
        load_dataset("npz", path=path, num_classes=50)
    cfg = load_config(None, ["data.name=npz", f"data.path={path}", "data.num_classes=100"])
    assert cfg.data.num_classes == 100
    with pytest.raises(ConfigError, match=r"data\.num_classes"):
        load_config(None, ["data.num_classes=0"])


def test_dataset_checks_labels_and_takes_numpy():
    x = np.zeros((4, 3), dtype=np.float32)
    y = np.array([0, 1, 2, 5])
    with pytest.raises(ValueError, match=r"y_train labels must be in 0\.\.2 \(num_classes=3\)"):
        Dataset("mine", x, y, x, y, 3)
    ds = Dataset("mine", x, y, x, y, 6)
    assert isinstance(ds.x_train, torch.Tensor) and ds.num_classes == 6
    with pytest.raises(ValueError, match=r"must be float32.*got torch.float64"):
        Dataset("mine", x.astype(np.float64), y, x, y, 6)
    with pytest.raises(ValueError, match=r"must be a torch\.Tensor or numpy array, got list"):
        Dataset("mine", x.tolist(), y, x, y, 6)
