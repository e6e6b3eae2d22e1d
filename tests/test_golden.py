"""Behaviour pinned across the restructure of the learned half (issue "One implementation
per idea"): short runs of every shipped learned aggregator, of the robust rules under the
attacks that use every random stream and server path (missing workers, dropped rows,
skipped rounds, worker momentum, white-box attack), and a few steps of every
meta-training loop (BPTT, attack mixtures, heterogeneous workers, PES for LAgg-A and
LOpt-A), compared with `golden/pre_restructure.json`.

That file was written by the code of commit 21517e0 (before the move) at one torch
thread; metrics agree with it to ~3e-7 at two threads, so the tolerance below (1e-5
relative) catches any change of behaviour while allowing float rounding from a
different operation order. Counters (dropped, skipped, missing updates) must match
exactly. A PES gradient estimate divides a difference of two nearly equal losses by 2σ²
(σ = 0.01): it turns float rounding of ~1e-7 in the losses into ~1e-4 in the gradient,
so its norm is compared to 1e-3 (the losses, validations and baselines stay at 1e-5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from metagg.config import load_config
from metagg.data import load_dataset
from metagg.simulation import Simulation

GOLDEN = json.loads((Path(__file__).parent / "golden" / "pre_restructure.json").read_text())
RTOL = 1e-5
LOOSER = {"grad_norm": 1e-3}  # PES estimates amplify rounding (see the module docstring)
EXACT = {"round", "dropped", "skipped", "missing", "iteration", "step", "clipped", "resets"}


def assert_close(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict), path
        for key, value in want.items():
            assert key in got, f"{path}/{key} missing"
            if key in EXACT:
                assert got[key] == value, f"{path}/{key}: {got[key]} != {value}"
            elif key in LOOSER and "pes" in path:
                assert math.isclose(got[key], value, rel_tol=LOOSER[key]), f"{path}/{key}"
            else:
                assert_close(got[key], value, f"{path}/{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, str) and want in ("inf", "nan", "-inf"):
        assert repr(float(got)) == want, f"{path}: {got} != {want}"
    elif isinstance(want, float):
        assert math.isclose(float(got), want, rel_tol=RTOL, abs_tol=1e-7), \
            f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def simulation_rows(overrides: list[str]) -> list[dict[str, Any]]:
    cfg = load_config(None, overrides)
    sim = Simulation(cfg)
    rows = [{"round": 0, **sim.evaluate()}]
    while sim.round < cfg.rounds:
        sim.step()
        if sim.round % cfg.eval_every == 0:
            rows.append({"round": sim.round, **sim.evaluate(), "dropped": sim.dropped_updates,
                         "skipped": sim.skipped_rounds, "missing": sim.missing_updates,
                         "worker_loss": sim.last_worker_loss})
    return rows


SIM_CASES = [name for name, case in GOLDEN.items() if "rows" in case]


@pytest.mark.parametrize("name", SIM_CASES)
def test_simulation_matches_pre_restructure(name: str) -> None:
    case = GOLDEN[name]
    assert_close(simulation_rows(case["overrides"]), case["rows"], name)


def _phi_abs(net: torch.nn.Module) -> float:
    return float(sum(p.double().abs().sum() for p in net.parameters()))


def test_hetero_evaluation_and_meta_training_match_pre_restructure() -> None:
    from metagg.hetero import PAPER_GROUPS, HeteroEnv, HeteroMetaConfig, meta_train_hetero
    from metagg.learned import evaluate_aggregator, load_aggregator

    digits = load_dataset("digits")
    env = HeteroEnv(digits, PAPER_GROUPS)
    agg = load_aggregator("pretrained/digits-hetero4x3-mlp20-lstm")
    assert_close(evaluate_aggregator(agg, env, [100, 101], (10, 20)),
                 GOLDEN["hetero_zoo_eval"], "hetero_zoo_eval")
    env02 = HeteroEnv(digits, PAPER_GROUPS, active_groups=(0, 2))
    assert_close(evaluate_aggregator(agg, env02, [100], (10,)),
                 GOLDEN["hetero_zoo_eval_active02"], "hetero_zoo_eval_active02")
    res = meta_train_hetero(env, HeteroMetaConfig(iterations=2, unroll=10, truncation=5,
                                                  validate_every=2, validation_seeds=1))
    phi_sum = float(sum(p.double().sum() for p in res.net.parameters()))
    assert_close({"phi_sum": phi_sum, "phi_abs": _phi_abs(res.net)}, GOLDEN["hetero_meta"],
                 "hetero_meta")


def test_bptt_meta_training_matches_pre_restructure() -> None:
    from metagg.learned import meta_train_rnn

    r = meta_train_rnn(iterations=3, unroll=10, truncation=5, validate_every=3,
                       validation_seeds=2, long_horizon=2, num_workers=4, progress=False)
    got = {"history": r.history, "best_score": r.best_score,
           "phi_abs": _phi_abs(r.aggregator.net)}
    assert_close(got, GOLDEN["bptt_rnn"], "bptt_rnn")
    r = meta_train_rnn(iterations=2, unroll=10, truncation=5, validate_every=2,
                       validation_seeds=1, long_horizon=1, num_workers=5, arnn=True,
                       attack="ipm,none", num_byzantine=2, cell="gru", progress=False)
    got = {"history": r.history, "best_score": r.best_score,
           "phi_abs": _phi_abs(r.aggregator.net)}
    assert_close(got, GOLDEN["bptt_arnn_mix"], "bptt_arnn_mix")


@pytest.mark.parametrize("kind", ["lagg", "lopt"])
def test_pes_meta_training_matches_pre_restructure(kind: str, tmp_path: Path) -> None:
    from metagg.learned.meta_pes import MetaTrainPESConfig, meta_train_pes

    extra = {"step_mode": "reference"} if kind == "lopt" else {}
    cfg = MetaTrainPESConfig(kind=kind, dataset="digits", model="mlp:32:relu", num_workers=4,
                             local_steps=2, batch_size=32, unroll=5, pairs=2, min_inner=5,
                             max_inner=12, steps=4, warmup=2, validate_every=2,
                             validation_seeds=2, validation_rounds=(5, 10), checkpoint_every=2,
                             **extra)
    summary = meta_train_pes(cfg, tmp_path, progress=False)
    history = [json.loads(line) for line in (tmp_path / "meta_train.jsonl").open()]
    for row in history:
        row.pop("wall_s", None)
        row.pop("step_s", None)
    got = {"history": history, "best_score": summary["best_score"],
           "baselines": summary["baselines"]}
    assert_close(got, GOLDEN[f"pes_{kind}"], f"pes_{kind}")
