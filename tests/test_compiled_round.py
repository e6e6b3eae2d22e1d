"""The compiled worker round (`metagg.cluster.compiled_round`, the default outside tests)
against the eager vmapped autograd it replaces: same updates to float rounding, every
aggregator family in both modes, an exact resume, no recompile per run, and the eager
fallback when torch.compile fails."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from metagg.cli import main
from metagg.cluster import Cluster
from metagg.compiling import (
    AUTO_MIN_STEPS,
    ENV,
    compile_enabled,
    compile_setting,
    compiling_during,
    set_compile,
)
from metagg.config import load_config
from metagg.data import partition
from metagg.models import build_model
from metagg.simulation import Simulation, read_metrics
from metagg.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")

LOCAL = ["workers.mode=local_sgd", "workers.local_steps=3", "workers.local_lr=0.3",
         "workers.num_workers=6", "workers.batch_size=16", "model=mlp:16:relu"]
GRADIENT = ["workers.num_workers=6", "workers.batch_size=16", "model=mlp:16:relu"]


def cluster(digits, model: str, mode: str, compile: bool, **kw) -> Cluster:
    task = Task(build_model(model, digits.input_shape, 10), num_classes=10)
    shards = partition(digits.y_train, 5, "iid", seed=0)
    return Cluster(task, digits.x_train, digits.y_train, shards, batch_size=8, mode=mode,
                   local_steps=3 if mode == "local_sgd" else 1, local_lr=0.2, seed=1,
                   compile=compile, **kw)


@pytest.mark.parametrize("mode", ["local_sgd", "gradient"])
@pytest.mark.parametrize("model", ["mlp:12:relu", "mlp:12,8:tanh", "mlp:12:sigmoid", "linear"])
def test_compiled_round_matches_eager(digits, model, mode):
    params = Task(build_model(model, digits.input_shape, 10), num_classes=10).init_params(3)
    eager = cluster(digits, model, mode, compile=False).compute(params, 4)
    compiled = cluster(digits, model, mode, compile=True).compute(params, 4)
    torch.testing.assert_close(compiled.updates, eager.updates, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["local_sgd", "gradient"])
def test_compiled_round_of_one_worker_is_its_row(digits, mode):
    # what a worker process of `metagg launch` computes: bit for bit the simulator's row
    c = cluster(digits, "mlp:12:relu", mode, compile=True)
    params = c.task.init_params(0)
    every = c.compute(params, 2)
    for k in (1, 3):
        assert torch.equal(c.compute(params, 2, torch.tensor([k])).updates, every.updates[[k]])


def run_rows(overrides: list[str], compile: bool) -> list[dict]:
    with compiling_during(compile):
        cfg = load_config(None, ["rounds=6", "eval_every=3", *overrides])
        sim = Simulation(cfg)
        assert sim.cluster.compiled is compile
        rows = []
        while sim.round < cfg.rounds:
            sim.step()
            if sim.round % cfg.eval_every == 0:
                rows.append(sim.evaluate())
        return rows


FAMILIES = {
    "fedavg": [*LOCAL, "optimizer.name=sgd", "optimizer.lr=1.0"],
    "slowmo": [*LOCAL, "optimizer.name=slowmo"],
    "server_adam": [*LOCAL, "optimizer.name=adam", "optimizer.lr=0.01"],
    "lagg": [*LOCAL, "aggregator.name=lagg", "aggregator.options.init=true"],
    "lopt": [*LOCAL, "aggregator.name=lopt", "aggregator.options.init=true"],
    "median_gradient": [*GRADIENT, "aggregator.name=median", "attack.name=sign_flip",
                        "attack.num_byzantine=1"],
    "rnn_gradient": ["aggregator=rnn:pretrained/digits-mlp20-lstm", "model=mlp:20:sigmoid",
                     "workers.batch_size=16"],
    "zeno_gradient": [*GRADIENT, "aggregator.name=zeno", "trusted_samples=32",
                      "attack.name=gaussian", "attack.num_byzantine=2"],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_aggregator_family_runs_compiled_like_eager(family):
    eager, compiled = run_rows(FAMILIES[family], False), run_rows(FAMILIES[family], True)
    for e, c in zip(eager, compiled, strict=True):
        for key in ("train_loss", "test_loss"):
            assert c[key] == pytest.approx(e[key], rel=1e-4), (family, key)


def test_compiled_run_resumes_exactly(tmp_path):
    with compiling_during(True):
        cfg = load_config(None, ["rounds=8", "eval_every=2", "checkpoint_every=2", *LOCAL])
        Simulation(cfg).run(tmp_path / "whole")
        Simulation(cfg).run(tmp_path / "cut", stop_after=4)
        Simulation(cfg).run(tmp_path / "cut", resume=True)
    strip = [{k: v for k, v in r.items() if k != "wall_s"}
             for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    again = [{k: v for k, v in r.items() if k != "wall_s"}
             for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
    assert again == strip


def test_another_learning_rate_reuses_the_compiled_round(digits):
    params = cluster(digits, "mlp:10:relu", "local_sgd", compile=False).task.init_params(0)
    cluster(digits, "mlp:10:relu", "local_sgd", compile=True).compute(params, 0)
    graphs = counters["stats"]["unique_graphs"]
    for lr in (0.05, 0.5, 1.0):
        c = cluster(digits, "mlp:10:relu", "local_sgd", compile=True)
        c._lr = torch.tensor(lr)  # as a run with local_lr=lr
        c.compute(params, 0)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile (torch stops at 8)


def test_compile_failure_falls_back_to_eager_once(digits, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    params = cluster(digits, "mlp:12:relu", "local_sgd", compile=False).task.init_params(0)
    c = cluster(digits, "mlp:12:relu", "local_sgd", compile=True)
    with caplog.at_level(logging.WARNING, logger="metagg"):
        got = [c.compute(params, t).updates for t in range(3)]
    assert caplog.text.count("torch.compile failed (RuntimeError: no C++ compiler") == 1
    want = cluster(digits, "mlp:12:relu", "local_sgd", compile=False)
    for t in range(3):
        torch.testing.assert_close(got[t], want.compute(params, t).updates, rtol=1e-5,
                                   atol=1e-7)


def test_compile_setting_from_environment_and_cli(monkeypatch):
    with compiling_during(None):
        monkeypatch.setenv(ENV, "off")
        assert not compile_enabled() and compile_setting() is False
        monkeypatch.setenv(ENV, "1")
        assert compile_enabled(1) and compile_setting() is True
        for auto in ("auto", None):  # the default: long runs only
            if auto is None:
                monkeypatch.delenv(ENV)
            else:
                monkeypatch.setenv(ENV, auto)
            assert compile_setting() is None
            assert compile_enabled(AUTO_MIN_STEPS) and not compile_enabled(AUTO_MIN_STEPS - 1)
            assert compile_enabled()  # unknown length
        monkeypatch.setenv(ENV, "maybe")
        with pytest.raises(ValueError, match="METAGG_COMPILE must be"):
            compile_enabled()
        monkeypatch.setenv(ENV, "0")
        assert set_compile(True) and compile_enabled(1)
        assert set_compile(None) is False
    seen = []
    monkeypatch.setattr("metagg.simulation.Simulation.run",
                        lambda self, *a, **k: seen.append(self.cluster.compiled) or {})
    monkeypatch.setenv(ENV, "auto")
    with compiling_during(None):
        cases = (([], "rounds=1", False), ([], f"rounds={AUTO_MIN_STEPS}", True),
                 (["--compile"], "rounds=1", True), (["--no-compile"], "rounds=5000", False))
        for flag, rounds, want in cases:
            assert main(["run", "--set", rounds, *flag, "--threads", "1"]) == 0
            assert seen[-1] is want, (flag, rounds)
