"""metagg.compare: an interrupted table resumes to the same numbers."""

import pytest

from metagg.checkpoint import CheckpointError
from metagg.compare import _configure, _safe, compare
from metagg.config import config_from_dict
from metagg.simulation import Simulation

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"rounds": 20, "eval_every": 10, "checkpoint_every": 5,
        "workers": {"num_workers": 4, "batch_size": 16}}


def strip(results):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in results]


def test_an_interrupted_table_resumes_to_the_same_results(digits, tmp_path, monkeypatch):
    cfg = config_from_dict(BASE)
    kw = dict(seeds=2, attacks=["none", "sign_flip:1"], dataset=digits)
    want = compare(cfg, ["mean", "median"], out_dir=tmp_path / "a", **kw)
    # as if killed during median / sign flip / seed 1: earlier runs done, that one half-way
    compare(cfg, ["mean"], out_dir=tmp_path / "b", **kw)
    setting = ("sign_flip", 1, {})
    run_cfg = _configure(cfg, "median", setting, 1, False, {})
    run_dir = tmp_path / "b" / _safe("sign_flip 1/4") / "median" / "seed1"
    Simulation(run_cfg, dataset=digits).run(run_dir, progress=False, stop_after=12)
    steps = []
    real_step = Simulation.step
    monkeypatch.setattr(Simulation, "step", lambda self: (steps.append(1), real_step(self)))
    got = compare(cfg, ["mean", "median"], out_dir=tmp_path / "b", resume=True, **kw)
    assert strip(got) == strip(want)
    # finished runs are not run again; median ran 2 + 1 whole runs and 8 resumed rounds
    assert len(steps) == 3 * 20 + 8
    assert (tmp_path / "b" / "results.md").read_text() == \
        (tmp_path / "a" / "results.md").read_text()
    # the runs on disk are from another setting: refused, not silently mixed
    other = config_from_dict({**BASE, "rounds": 20, "optimizer": {"lr": 0.5}})
    with pytest.raises(CheckpointError, match="different config"):
        compare(other, ["mean"], out_dir=tmp_path / "b", resume=True, **kw)


def test_a_resumed_table_runs_again_a_learned_aggregator_whose_weights_changed(digits, tmp_path,
                                                                              caplog):
    """Same name, other weights (e.g. a re-shipped pretrained rule): the finished runs of the
    old weights are not reused; the simulation alone refuses to resume them."""
    from metagg.learned.trust import TrustConfig, initial_phi, save_trust
    from metagg.simulation import WeightsChangedError

    cfg = config_from_dict({**BASE, "trusted_samples": 50})
    kw = dict(seeds=1, attacks=["sign_flip:2"], dataset=digits)  # 2f ≥ n: the share acts
    weights, name = tmp_path / "w", f"trust:{tmp_path / 'w'}"

    def ship(share):
        config = TrustConfig(budget=2.0, reference_share=share)
        save_trust(weights, config, initial_phi(config, 0), trained_on={}, validation={})

    ship(0.0)
    old = compare(cfg, [name], out_dir=tmp_path / "table", **kw)
    ship(0.5)
    want = compare(cfg, [name], out_dir=tmp_path / "fresh", **kw)
    assert strip(want) != strip(old)
    with caplog.at_level("WARNING", logger="metagg"):
        got = compare(cfg, [name], out_dir=tmp_path / "table", resume=True, **kw)
    assert strip(got) == strip(want)
    assert "changed since this run" in caplog.text
    ship(0.0)
    run_dir = tmp_path / "table" / _safe("sign_flip 2/4") / _safe(name) / "seed0"
    with pytest.raises(WeightsChangedError, match="other weights"):
        Simulation(_configure(cfg, name, ("sign_flip", 2, {}), 0, False, {}),
                   dataset=digits).run(run_dir, resume=True)
