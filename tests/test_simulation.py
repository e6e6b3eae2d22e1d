import json

import pytest
import torch
from torch import nn

from metagg.attacks import Attack
from metagg.checkpoint import CheckpointError
from metagg.config import config_from_dict
from metagg.data import Dataset
from metagg.simulation import Simulation, read_metrics

SMALL = {"rounds": 30, "eval_every": 10, "workers": {"num_workers": 4, "batch_size": 16},
         "checkpoint_every": 10}


def cfg(**overrides):
    data = json.loads(json.dumps(SMALL))
    for key, value in overrides.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config_from_dict(data)


def strip_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_mean_sgd_digits_reaches_90_percent(digits):
    sim = Simulation(config_from_dict({"rounds": 300, "eval_every": 50}), dataset=digits)
    summary = sim.run()
    assert summary["final_test_accuracy"] >= 0.90
    assert summary["rounds_to_test_accuracy_0.9"] is not None


def test_same_seed_same_metrics_different_seed_differs(digits, tmp_path):
    a = Simulation(cfg(), dataset=digits).run(tmp_path / "a")
    b = Simulation(cfg(), dataset=digits).run(tmp_path / "b")
    c = Simulation(cfg(seed=1), dataset=digits).run(tmp_path / "c")
    ra, rb = read_metrics(tmp_path / "a/metrics.jsonl"), read_metrics(tmp_path / "b/metrics.jsonl")
    assert strip_wall(ra) == strip_wall(rb)
    assert a["final_train_loss"] == b["final_train_loss"] != c["final_train_loss"]


@pytest.mark.parametrize("mode,momentum", [("gradient", 0.0), ("local_sgd", 0.0),
                                           ("gradient", 0.9)])
def test_resume_gives_identical_metrics(digits, tmp_path, mode, momentum):
    extra = {"workers__mode": mode, "workers__local_steps": 2 if mode == "local_sgd" else 1,
             "workers__momentum": momentum, "optimizer__name": "adam", "optimizer__lr": 0.01}
    full = Simulation(cfg(**extra), dataset=digits)
    full.run(tmp_path / "full")
    part = Simulation(cfg(**extra), dataset=digits)
    part.run(tmp_path / "part", stop_after=17)  # checkpoint at round 17, mid-interval
    resumed = Simulation(cfg(**extra), dataset=digits)
    resumed.run(tmp_path / "part", resume=True)
    want = strip_wall(read_metrics(tmp_path / "full/metrics.jsonl"))
    got = strip_wall(read_metrics(tmp_path / "part/metrics.jsonl"))
    assert got == want
    assert torch.equal(full.params, resumed.params)


def test_resume_refuses_other_config_and_missing_checkpoint(digits, tmp_path):
    Simulation(cfg(), dataset=digits).run(tmp_path / "r", stop_after=5)
    with pytest.raises(CheckpointError, match="differs in: optimizer"):
        Simulation(cfg(optimizer__lr=0.5), dataset=digits).run(tmp_path / "r", resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Simulation(cfg(), dataset=digits).run(tmp_path / "empty", resume=True)


def test_checkpoint_from_before_a_config_key_existed_resumes(digits, tmp_path, rewrite_meta):
    Simulation(cfg(), dataset=digits).run(tmp_path / "full")
    Simulation(cfg(), dataset=digits).run(tmp_path / "r", stop_after=15)
    # as written by an older metagg
    rewrite_meta(tmp_path / "r" / "checkpoint", lambda m: m["config"]["workers"].pop("momentum"))
    Simulation(cfg(), dataset=digits).run(tmp_path / "r", resume=True)
    assert strip_wall(read_metrics(tmp_path / "r/metrics.jsonl")) == \
        strip_wall(read_metrics(tmp_path / "full/metrics.jsonl"))


def test_resume_cannot_shorten_a_run(digits, tmp_path):
    Simulation(cfg(), dataset=digits).run(tmp_path / "r")  # 30 rounds
    with pytest.raises(CheckpointError, match="at round 30, beyond rounds=20"):
        Simulation(cfg(rounds=20), dataset=digits).run(tmp_path / "r", resume=True)


def test_torn_metrics_line_ignored(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n{"rou')
    assert read_metrics(path) == [{"round": 0}, {"round": 1}]


def test_fedavg_equals_average_of_local_models(digits):
    c = cfg(workers__mode="local_sgd", workers__local_steps=3, workers__local_lr=0.2,
            optimizer__lr=1.0)
    sim = Simulation(c, dataset=digits)
    theta = sim.params.clone()
    xb, yb = sim.cluster.batches(0)
    locals_ = []
    for k in range(4):
        p = theta.clone()
        for h in range(3):
            p.requires_grad_(True)
            (g,) = torch.autograd.grad(sim.task.loss(p, xb[k, h], yb[k, h]), p)
            p = (p - 0.2 * g).detach()
        locals_.append(p)
    sim.step()
    torch.testing.assert_close(sim.params, torch.stack(locals_).mean(0), rtol=1e-5, atol=1e-6)


class NaNAttack(Attack):
    name = "nan"

    def forge(self, honest, byzantine, ctx, generator, *, defence=None):
        out = honest[byzantine].clone()
        out[:, 0] = float("nan")
        return out


def test_nonfinite_updates_dropped_and_counted(digits):
    sim = Simulation(cfg(attack__name="sign_flip", attack__num_byzantine=1), dataset=digits)
    sim.server.attack = NaNAttack()
    for _ in range(5):
        sim.step()
    assert sim.dropped_updates == 5
    assert torch.isfinite(sim.params).all()


def test_too_few_updates_skips_round(digits, caplog):
    c = cfg(aggregator__name="trimmed_mean", aggregator__f=1, workers__failure_prob=0.9)
    sim = Simulation(c, dataset=digits)
    before = sim.params.clone()
    for _ in range(3):
        sim.step()
    assert sim.skipped_rounds >= 1
    assert "skipped" in caplog.text
    if sim.skipped_rounds == 3:
        assert torch.equal(sim.params, before)


def test_bring_your_own_data_and_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long()
    ds = Dataset("toy", x[:160], y[:160], x[160:], y[160:], num_classes=2)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    sim = Simulation(cfg(rounds=60, optimizer__lr=0.5), dataset=ds, model=model)
    summary = sim.run(tmp_path / "toy")
    assert summary["final_test_accuracy"] > 0.85
    assert (tmp_path / "toy/curves.png").stat().st_size > 1000


def test_run_writes_all_outputs(digits, tmp_path):
    summary = Simulation(cfg(), dataset=digits).run(tmp_path / "o")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png",
                 "checkpoint.safetensors", "checkpoint.json"):
        assert (tmp_path / "o" / name).exists(), name
    rows = read_metrics(tmp_path / "o/metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 10, 20, 30]
    for key in ("round", "train_loss", "test_loss", "test_accuracy", "wall_s"):
        assert key in rows[-1]
    saved = json.loads((tmp_path / "o/summary.json").read_text())
    for key in ("final_test_accuracy", "final_test_loss", "final_train_loss", "rounds", "wall_s",
                "seed"):
        assert saved[key] == summary[key]



@pytest.mark.parametrize("bad", [float("nan"), 0.0, -0.1, float("inf")])
def test_an_aggregator_asking_for_a_bad_local_lr_is_a_clear_error(digits, bad):
    cfg = config_from_dict({"model": "mlp:8:relu", "rounds": 2,
                            "workers": {"num_workers": 3, "mode": "local_sgd",
                                        "local_steps": 2, "local_lr": 0.3}})
    sim = Simulation(cfg, dataset=digits)
    sim.server.aggregator.requested_local_lr = lambda state, ctx: bad
    with pytest.raises(ValueError, match=r"asked the workers for local lr .*finite and > 0"):
        sim.step()
    sim.server.aggregator.requested_local_lr = lambda state, ctx: 0.7
    sim.server.reset(sim.params)
    assert sim.server.round_local_lr() == 0.7 and sim.context(torch.arange(3)).local_lr == 0.7
