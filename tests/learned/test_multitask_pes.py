"""Multi-task PES: tasks drawn from families, groups of pairs, resume, validation score."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from metagg.cli import main
from metagg.config import ConfigError
from metagg.config.meta import MetaTrainPESConfig
from metagg.learned.lagg import load_lagg
from metagg.learned.meta import meta_train
from metagg.learned.meta.multitask import MultiTaskPES
from metagg.tasks.families import FAMILIES, HELD_OUT


def tiny(**overrides) -> MetaTrainPESConfig:
    options = dict(kind="lagg", step_mode="general", tasks="synthetic", correction_scale=0.1,
                   pairs=4, task_groups=2, unroll=5, min_inner=5, max_inner=15, steps=4,
                   validation_tasks=2, validation_seeds=2, validation_rounds=(10,),
                   validate_every=2, checkpoint_every=1)
    options.update(overrides)
    return MetaTrainPESConfig(**options)


def test_tasks_follow_the_seed_and_never_a_held_out_one():
    cfg = tiny(tasks="image-mlp,synthetic")
    a, b = MultiTaskPES(cfg), MultiTaskPES(cfg)
    assert [a.task(i) for i in range(6)] == [b.task(i) for i in range(6)]
    assert a.validation_tasks == b.validation_tasks
    training = {a.task(i).name for i in range(50)}
    assert not training & {s.name for s in a.validation_tasks}
    assert not (training | {s.name for s in a.validation_tasks}) & {s.name for s in HELD_OUT}
    assert all(FAMILIES["image-mlp"].contains(a.task(i)) for i in range(0, 20, 2))
    assert all(FAMILIES["synthetic"].contains(a.task(i)) for i in range(1, 20, 2))


def test_config_rules():
    with pytest.raises(ConfigError, match="step_mode"):
        tiny(step_mode="residual")
    with pytest.raises(ConfigError, match="multiple of task_groups"):
        tiny(pairs=5)
    with pytest.raises(ValueError, match="unknown task families"):
        MultiTaskPES(tiny(tasks="synthetic,imagenet"))


def test_groups_change_task_when_their_run_ends_and_losses_are_in_units_of_ln_c():
    est = MultiTaskPES(tiny())
    phi, state = est.init_phi(0), est.init_state()
    assert state.task.tolist() == [0, 1]
    dims = [g.theta.shape[1] for g in state.groups]
    assert dims == [est.runner(est.task(i)).env.task.dim for i in (0, 1)]
    seen = set()
    for step in range(6):
        res = est.estimate(phi, state, step)
        assert torch.isfinite(res.grad).all() and res.grad.shape == (est.dim,)
        assert 0 < res.metrics["meta_loss"] <= est.cfg.loss_clip  # clipped at 1.5·ln C / ln C
        state = res.state
        seen.update(state.task.tolist())
        # a group that moved on starts with no accumulated perturbation
        for g, inner in enumerate(state.groups):
            if int(inner.round[0]) == 0:
                assert not state.accum[g * 2:(g + 1) * 2].any()
    assert len(seen) > 2  # run lengths of 5-15 rounds: tasks were replaced


def test_meta_training_resumes_to_the_same_result(tmp_path):
    full = meta_train(tiny(), out_dir=tmp_path / "full", threads=1)
    meta_train(tiny(), out_dir=tmp_path / "part", threads=1, stop_at=3)
    meta_train(tiny(), out_dir=tmp_path / "part", threads=1, resume=True)
    a = load_file(tmp_path / "full" / "meta_state.safetensors")
    b = load_file(tmp_path / "part" / "meta_state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    agg = load_lagg(tmp_path / "full")
    assert agg.config.step_mode == "general" and agg.config.num_workers == 0
    summary = full.summary
    # SlowMo is the reference of the score: its own score is exactly 0
    assert summary["baselines"]["slowmo"]["score"] == 0.0
    assert math.isfinite(summary["baselines"]["fedavg"]["score"])
    info = json.loads((tmp_path / "full" / "aggregator.json").read_text())
    assert info["trained_on"]["tasks"] == ["synthetic"]
    assert "SlowMo" in info["validation"]["score_definition"]


def test_cli_meta_trains_on_task_families(tmp_path, capsys):
    code = main(["meta-train", "lopt", "--tasks", "synthetic", "--steps", "2", "--out",
                 str(tmp_path / "g"), "--set", "pairs=2", "--set", "task_groups=2",
                 "--set", "unroll=3", "--set", "validation_tasks=1",
                 "--set", "validation_rounds=[5]", "--set", "validate_every=2"])
    assert code == 0
    agg = load_lagg(tmp_path / "g")
    assert agg.config.kind == "lopt" and agg.config.step_mode == "general"
    assert "lopt:" in capsys.readouterr().out


def test_augmented_validation_scores_every_lr_factor_against_slowmo_at_that_factor():
    """With lr_augment, validation runs each task at the workers' lr × (1/a, 1, a); SlowMo
    itself (the untrained step with α 0.6 and the controller off) scores 0 at each."""
    est = MultiTaskPES(tiny(residual_base="momentum", learned_local_lr=True,
                            local_lr_gain=0.1, lr_augment=2.0))
    assert est.validation_factors == (0.5, 1.0, 2.0)
    slowmo = est._slowmo_phi()
    for c in (0.5, 2.0):  # the φ path is SlowMo: scores 0 against itself
        runner = est.runner(est.validation_tasks[0])
        assert est._relative(0, runner.validation_runs(slowmo, lr_factor=c), c) == 0.0
    score, means = est.validate(est.init_phi(0))  # gain 0.1: the lr moves, the score too
    assert math.isfinite(score) and score != 0.0
    assert {"task0@x0.5/mean_loss@10", "task0/mean_loss@10", "task0@x2/mean_loss@10"} <= set(means)
    with pytest.raises(ValueError, match="residual_base momentum"):
        MultiTaskPES(tiny(residual_base="mean", lr_augment=2.0))


def test_a_diverged_run_costs_the_loss_cap_not_an_infinite_score():
    """Validation losses are bounded to [1e-4·ln C, loss cap] (NaN/inf = the cap): one
    diverged run, the φ's or the reference's, moves the score by a finite amount."""
    est = MultiTaskPES(tiny(residual_base="momentum"))
    ref = est._reference(0)
    env = est.runner(est.validation_tasks[0]).env
    cap = env.loss_max
    diverged = {k: [math.nan, *v[1:]] for k, v in ref.items() if k.startswith("loss@")}
    first = ref["loss@10"][0]
    want = math.log(cap / max(first, 1e-4 * env.loss_scale)) / len(ref["loss@10"])
    assert est._relative(0, diverged) == pytest.approx(want)
    assert est._relative(0, ref) == 0.0
