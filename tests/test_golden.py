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


def _bptt_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history as the pre-restructure code wrote it: one row per meta-iteration (the
    mean per-round meta-loss over its truncations and the last truncation's gradient
    norm) instead of one per truncation; validation rows as they are."""
    out: list[dict[str, Any]] = []
    per_iteration: dict[int, list[dict[str, Any]]] = {}
    for row in history:
        if "validation_score" in row:
            out.append(row)
        else:
            group = per_iteration.setdefault(row["iteration"], [])
            group.append(row)
            if len(group) == 1:
                out.append({"iteration": row["iteration"], "_group": group})
    rows = []
    for row in out:
        group = row.pop("_group", None)
        if group is None:
            rows.append(row)
            continue
        done = [r for r in group if r["meta_loss"] is not None and not r["skipped"]]
        rounds = sum(r["rounds"] for r in done)
        rows.append({"iteration": row["iteration"],
                     "meta_loss": sum(r["meta_loss"] * r["rounds"] for r in done) / max(rounds, 1),
                     "grad_norm": done[-1]["grad_norm"] if done else math.nan,
                     "skipped": len(done) < len(group)})
    return rows


def test_hetero_evaluation_and_meta_training_match_pre_restructure() -> None:
    from metagg.cluster import PAPER_GROUPS
    from metagg.config.meta import MetaTrainConfig
    from metagg.learned import evaluate_aggregator, load_aggregator
    from metagg.learned.meta import HeteroEnv, meta_train

    digits = load_dataset("digits")
    env = HeteroEnv(digits, PAPER_GROUPS)
    agg = load_aggregator("pretrained/digits-hetero4x3-mlp20-lstm")
    assert_close(evaluate_aggregator(agg, env, [100, 101], (10, 20)),
                 GOLDEN["hetero_zoo_eval"], "hetero_zoo_eval")
    env02 = HeteroEnv(digits, PAPER_GROUPS, active_groups=(0, 2))
    assert_close(evaluate_aggregator(agg, env02, [100], (10,)),
                 GOLDEN["hetero_zoo_eval_active02"], "hetero_zoo_eval_active02")
    # the recipe meta_train_hetero ran before the move: validation at T only, no patience
    cfg = MetaTrainConfig(iterations=2, unroll=10, truncation=5, validate_every=2,
                          validation_seeds=1, long_horizon=1, patience=0)
    net = meta_train(cfg, [env], progress=False).aggregator.net
    phi_sum = float(sum(p.double().sum() for p in net.parameters()))
    assert_close({"phi_sum": phi_sum, "phi_abs": _phi_abs(net)}, GOLDEN["hetero_meta"],
                 "hetero_meta")


def test_bptt_meta_training_matches_pre_restructure() -> None:
    from metagg.learned import meta_train_rnn

    for name, options in (
            ("bptt_rnn", {"iterations": 3, "unroll": 10, "truncation": 5, "validate_every": 3,
                          "validation_seeds": 2, "long_horizon": 2, "num_workers": 4}),
            ("bptt_arnn_mix", {"iterations": 2, "unroll": 10, "truncation": 5,
                               "validate_every": 2, "validation_seeds": 1, "long_horizon": 1,
                               "num_workers": 5, "arnn": True, "attack": "ipm,none",
                               "num_byzantine": 2, "cell": "gru"})):
        r = meta_train_rnn(progress=False, **options)
        got = {"history": _bptt_history(r.history), "best_score": r.best_score,
               "phi_abs": _phi_abs(r.aggregator.net)}
        assert_close(got, GOLDEN[name], name)


@pytest.mark.parametrize("kind", ["lagg", "lopt"])
def test_pes_meta_training_matches_pre_restructure(kind: str, tmp_path: Path) -> None:
    from metagg.config.meta import MetaTrainPESConfig
    from metagg.learned.meta import meta_train_pes

    extra = {"step_mode": "reference"} if kind == "lopt" else {}
    cfg = MetaTrainPESConfig(kind=kind, dataset="digits", model="mlp:32:relu", num_workers=4,
                             local_steps=2, batch_size=32, unroll=5, pairs=2, min_inner=5,
                             max_inner=12, steps=4, warmup=2, validate_every=2,
                             validation_seeds=2, validation_rounds=(5, 10), checkpoint_every=2,
                             **extra)
    result = meta_train_pes(cfg, tmp_path, progress=False)
    history = [json.loads(line) for line in (tmp_path / "meta_train.jsonl").open()]
    for row in history:
        row.pop("wall_s", None)
        row.pop("step_s", None)
    got = {"history": history, "best_score": result.best_score,
           "baselines": result.summary["baselines"]}
    assert_close(got, GOLDEN[f"pes_{kind}"], f"pes_{kind}")
