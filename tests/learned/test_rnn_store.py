"""Saving / loading learned aggregators, and `rnn:PATH` through the simulator."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metagg.aggregators.registry import build_aggregator
from metagg.checkpoint import CheckpointError
from metagg.config import config_from_dict
from metagg.learned.rnn import RNNAggregator, RNNConfig, load_rnn, save_rnn
from metagg.learned.store import read_aggregator_info
from metagg.learned.zoo import load_aggregator, save_aggregator
from metagg.simulation import Simulation


def steps_of(agg, u, ctx, rounds=3):
    state = agg.init(ctx.layout, ctx.num_workers)
    out = []
    for _ in range(rounds):
        step, state = agg.step(state, u, ctx)
        out.append(step)
    return torch.stack(out)


@pytest.mark.parametrize("cfg", [RNNConfig(num_workers=4),
                                 RNNConfig(num_workers=4, cell="gru", output="paper",
                                           clamp_sign=False, p=6.0, scale=0.2)])
def test_round_trip_gives_identical_steps(tmp_path, make_ctx, cfg):
    agg = RNNAggregator(cfg, seed=5)
    stem = save_rnn(tmp_path / "agg", agg, trained_on={"dataset": "digits"},
                           validation={"score": 1.5})
    assert stem == tmp_path / "agg" / "aggregator"
    assert (tmp_path / "agg" / "aggregator.safetensors").exists()
    u = torch.randn(4, 33)
    want = steps_of(agg, u, make_ctx(33, 4))
    for path in (tmp_path / "agg", stem, stem.with_suffix(".safetensors")):
        loaded = load_rnn(path)
        assert loaded.config == cfg
        assert torch.equal(steps_of(loaded, u, make_ctx(33, 4)), want)
    info = read_aggregator_info(tmp_path / "agg")
    assert info["kind"] == "rnn" and info["config"]["cell"] == cfg.cell
    assert info["trained_on"] == {"dataset": "digits"} and info["validation"]["score"] == 1.5
    assert "metagg_version" in info and info["feature_names"][0] == "grad[0]"


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    save_rnn(tmp_path, RNNAggregator(RNNConfig(num_workers=2)))
    f = tmp_path / "aggregator.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-5] ^= 0xFF
    f.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_rnn(tmp_path)


def test_json_that_does_not_match_the_weights(tmp_path, rewrite_meta):
    save_rnn(tmp_path, RNNAggregator(RNNConfig(num_workers=2)))
    jf = tmp_path / "aggregator.json"
    meta = json.loads(jf.read_text())
    meta.pop("sha256")
    stem = tmp_path / "aggregator"
    for change, pattern in [({"hidden": 30}, r"tensor w_hh.0 has shape \(20, 80\)"),
                            ({"num_workers": 3}, r"tensor w_ih.0 has shape"),
                            ({"cell": "gru"}, "has shape"),
                            ({"cell": "tanh"}, "bad config.*cell: unknown value"),
                            ({"hiddden": 20}, "unknown config keys")]:
        rewrite_meta(stem, lambda m, change=change: m.update(
            json.loads(json.dumps(meta)), config={**meta["config"], **change}))
        with pytest.raises(CheckpointError, match=pattern):
            load_rnn(tmp_path)
    rewrite_meta(stem, lambda m: m.update(format="something.else"))
    with pytest.raises(CheckpointError, match="not a metagg RNN aggregator"):
        load_rnn(tmp_path)
    rewrite_meta(stem, lambda m: m.update(json.loads(json.dumps(meta))))
    jf.write_text(jf.read_text().replace('"cell"', '"kell"'))  # the sidecar alone: tampering
    with pytest.raises(CheckpointError, match="modified after it was written"):
        load_rnn(tmp_path)
    jf.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_rnn(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="expected a directory holding"):
        load_rnn(tmp_path / "nowhere")
    save_rnn(tmp_path, RNNAggregator(RNNConfig(num_workers=2)))
    (tmp_path / "aggregator.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_rnn(tmp_path)


def test_registry_checks_the_kind(tmp_path):
    save_rnn(tmp_path / "a", RNNAggregator(RNNConfig(num_workers=2, arnn=True)))
    assert build_aggregator(f"arnn:{tmp_path / 'a'}").uses_trusted_data
    with pytest.raises(ValueError, match="holds an 'arnn' aggregator"):
        build_aggregator(f"rnn:{tmp_path / 'a'}")
    agg = build_aggregator(f"arnn:{tmp_path / 'a'}", options={"chunk_size": 8})
    assert agg.chunk_size == 8


@pytest.mark.parametrize("kind", ["rnn", "arnn"])
def test_rnn_path_runs_in_the_simulator(tmp_path, digits, kind):
    save_rnn(tmp_path / "w", RNNAggregator(RNNConfig(num_workers=4, arnn=kind == "arnn")))
    cfg = config_from_dict({
        "rounds": 6, "eval_every": 3, "workers": {"num_workers": 4, "batch_size": 16,
                                                   "failure_prob": 0.3},
        "aggregator": {"name": f"{kind}:{tmp_path / 'w'}"}, "checkpoint_every": 3,
    })
    sim = Simulation(cfg, dataset=digits)
    summary = sim.run(tmp_path / "run")
    assert summary["rounds"] == 6 and math.isfinite(summary["final_train_loss"])
    # the RNN state is checkpointed and restored like any aggregator state
    resumed = Simulation(cfg, dataset=digits)
    resumed.load(tmp_path / "run" / "checkpoint")
    assert torch.equal(resumed.agg_state.h, sim.agg_state.h)


def test_zoo_loads_and_saves_every_kind(tmp_path, rewrite_meta):
    from metagg.learned.lagg import LOptA

    for agg in (RNNAggregator(RNNConfig(num_workers=2)), LOptA(seed=0)):
        save_aggregator(tmp_path / agg.name, agg)
        back = load_aggregator(tmp_path / agg.name)
        assert type(back) is type(agg) and back.config == agg.config
        for k, v in agg.net.state_dict().items():
            assert torch.equal(back.net.state_dict()[k], v), k
    rewrite_meta(tmp_path / "rnn" / "aggregator", lambda m: m.update(format="something.else"))
    with pytest.raises(CheckpointError, match=r"unknown format 'something\.else'"):
        load_aggregator(tmp_path / "rnn")
    with pytest.raises(TypeError, match="not a learned aggregator"):
        save_aggregator(tmp_path / "x", object())
