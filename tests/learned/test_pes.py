"""Truncated PES: the generic estimate against true gradients, the vmapped unroll against a
loop over particles through the aggregator class, and the meta-training loop's checkpoint /
resume, outputs and CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

from metagg.aggregators.base import RoundContext
from metagg.aggregators.registry import build_aggregator
from metagg.checkpoint import CheckpointError, load_checkpoint
from metagg.cli import main as cli_main
from metagg.cluster import Cluster
from metagg.config.meta import MetaTrainPESConfig
from metagg.data import partition
from metagg.learned.lagg import load_lagg
from metagg.learned.meta import loop as lp
from metagg.learned.meta import meta_train_pes
from metagg.learned.meta import pes as mp
from metagg.learned.meta.evaluate import evaluate_aggregator
from metagg.learned.meta.pes import PES, antithetic_noise, lagg_config, pes_step, reset_pairs
from metagg.models import build_model
from metagg.tasks import Task, mlp_grad_fn


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# --------------------------------------------------------------------------- generic PES


def test_single_truncation_is_antithetic_es_and_matches_the_gradient():
    """Fresh accumulators: PES is antithetic ES; on a quadratic it is unbiased, so with many
    pairs its cosine with ∇L is near 1 (and a lone pair's is not)."""
    gen = torch.Generator().manual_seed(0)
    n = 12
    q = torch.randn(n, n, generator=gen)
    q = q @ q.T / n + torch.eye(n)
    c = torch.randn(n, generator=gen)
    theta = torch.randn(n, generator=gen)

    def unroll(batch, inner):
        z = batch - c
        return 0.5 * torch.einsum("pi,ij,pj->p", z, q, z), inner

    true = q @ (theta - c)
    for pairs, lo, hi in ((4000, 0.97, 1.0), (1, -1.0, 0.9)):
        eps = antithetic_noise(pairs, n, 0.01, gen)
        res = pes_step(unroll, theta, torch.zeros(pairs, n), None, eps, sigma=0.01)
        assert lo < cosine(res.grad, true) < hi
        assert torch.equal(res.accum, eps)
        assert res.loss_pos.shape == res.loss_neg.shape == (pairs,)


def _lr_problem():
    """Inner GD on f(w) = ½ Σ a_j w_j² with learnable per-coordinate lr exp(θ_j)."""
    dt = torch.float64
    a = torch.tensor([1.0, 0.3, 0.05], dtype=dt)
    w0 = torch.tensor([1.0, -2.0, 3.0], dtype=dt)
    tau = 5

    def unroll(batch, w):
        losses = torch.zeros(batch.shape[0], dtype=dt)
        for _ in range(tau):
            losses = losses + 0.5 * (a * w * w).sum(-1)
            w = w - torch.exp(batch) * a * w
        return losses / tau, w

    theta = torch.log(torch.tensor([0.3, 0.5, 0.8], dtype=dt))
    return unroll, theta, w0


@pytest.mark.parametrize("persistent", [True, False])
def test_pes_is_unbiased_over_truncations_and_resets(persistent):
    """Σ over the truncations of the PES estimates ≈ ∇ of the whole-horizon loss (autograd),
    also across an inner reset; truncated ES (accumulators dropped) is biased."""
    unroll, theta, w0 = _lr_problem()
    truncations, runs, pairs, sigma = 4, 2, 4000, 0.01

    def horizon_loss(th):
        total, w = 0.0, w0[None]
        for _ in range(truncations):
            loss, w = unroll(th[None], w)
            total = total + loss[0]
        return total

    th = theta.clone().requires_grad_()
    true = runs * torch.autograd.grad(horizon_loss(th), th)[0]
    gen = torch.Generator().manual_seed(1)
    accum = torch.zeros(pairs, 3, dtype=torch.float64)
    w = w0.expand(2 * pairs, 3).clone()
    total = torch.zeros(3, dtype=torch.float64)
    for k in range(runs * truncations):
        eps = torch.randn(pairs, 3, generator=gen, dtype=torch.float64) * sigma
        res = pes_step(unroll, theta, accum, w, eps, sigma=sigma)
        total += res.grad
        done = torch.full((pairs,), not persistent or (k + 1) % truncations == 0)
        accum, w = reset_pairs(res.accum, done), res.inner
        if (k + 1) % truncations == 0:
            w = w0.expand(2 * pairs, 3).clone()  # the inner runs restart
    rel = float((total - true).norm() / true.norm())
    if persistent:
        assert rel < 0.05 and cosine(total, true) > 0.999
    else:
        assert rel > 0.3


def test_reset_pairs_and_shape_checks():
    accum = torch.ones(3, 2)
    out = reset_pairs(accum, torch.tensor([False, True, False]))
    assert out.tolist() == [[1, 1], [0, 0], [1, 1]] and accum.sum() == 6
    with pytest.raises(ValueError, match="do not fit"):
        pes_step(lambda b, i: (b.sum(1), i), torch.zeros(2), torch.zeros(3, 2), None,
                 torch.zeros(2, 2), sigma=0.1)


# --------------------------------------------------------------------------- building blocks


def tiny_config(**options) -> MetaTrainPESConfig:
    base = dict(dataset="digits", num_workers=3, local_steps=2, batch_size=8, pairs=2,
                unroll=3, min_inner=4, max_inner=9, steps=6, warmup=2, lr=1e-2,
                validate_every=3, validation_seeds=2, validation_rounds=(4, 8),
                checkpoint_every=2)
    base.update(options)
    return MetaTrainPESConfig(**base)


@pytest.mark.parametrize("spec", ["mlp:16,7:relu", "mlp:5:sigmoid", "mlp:4:tanh", "linear"])
def test_mlp_grad_fn_matches_autograd(spec):
    task = Task(build_model(spec, (1, 8, 8), 10), num_classes=10)
    gen = torch.Generator().manual_seed(2)
    params = torch.randn(5, task.dim, generator=gen) * 0.3
    x, y = torch.rand(5, 9, 1, 8, 8, generator=gen), torch.randint(0, 10, (5, 9), generator=gen)
    grads, losses = mlp_grad_fn(task)(params, x, y)
    want_g, want_l = vmap(grad_and_value(task.loss))(params, x, y)
    torch.testing.assert_close(grads, want_g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, want_l, rtol=1e-6, atol=1e-6)


def test_mlp_grad_fn_declines_other_models():
    task = Task(build_model("cnn:ji2019", (1, 8, 8), 10), num_classes=10)
    assert mlp_grad_fn(task) is None


def _unroll_losses(trainer, cfg):
    phi = trainer.phi.init(1)
    eps = antithetic_noise(cfg.pairs, trainer.phi.dim, 0.1, torch.Generator().manual_seed(0))
    losses, inner = trainer.unroll(torch.cat([phi + eps, phi - eps]),
                                   trainer.fresh_inner(range(cfg.pairs)))
    return losses, inner.theta


def test_compiled_trainer_matches_eager(digits, caplog):
    cfg = tiny_config(model="mlp:6:relu")
    want = _unroll_losses(PES(cfg, digits), cfg)
    got = _unroll_losses(PES(cfg, digits, compile=True), cfg)
    assert "torch.compile failed" not in caplog.text  # it really compiled
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _fails_when_called(fn, **kwargs):
    def fail(*args):
        raise RuntimeError("no C++ compiler here")
    return fail


def _fails_when_built(fn, **kwargs):
    raise RuntimeError("torch.compile is not supported on this Python")


@pytest.mark.parametrize("broken", [_fails_when_called, _fails_when_built])
def test_compile_failure_falls_back_to_eager(digits, monkeypatch, caplog, broken):
    monkeypatch.setattr(torch, "compile", broken)
    cfg = tiny_config()
    want = _unroll_losses(PES(cfg, digits), cfg)
    got = _unroll_losses(PES(cfg, digits, compile=True), cfg)
    assert "torch.compile failed (RuntimeError: " in caplog.text
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_lr_schedule_warms_up_then_decays():
    settings = lp.LoopSettings(steps=20, warmup=4, lr=1.0, final_lr=0.1)
    lrs = [lp.lr_at(settings, s) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(15 / 16 * math.pi)))


def test_adamw_matches_torch():
    settings = lp.LoopSettings(steps=5, lr=0.01, final_lr=0.01, weight_decay=0.1, beta1=0.8,
                               beta2=0.95)
    p = torch.nn.Parameter(torch.randn(4))
    ref = torch.optim.AdamW([p], lr=0.01, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-8)
    run = lp._Outer(0, p.detach().clone(), torch.zeros(4), torch.zeros(4), 0, None,
                    torch.zeros(4))
    for k in range(5):
        g = torch.randn(4, generator=torch.Generator().manual_seed(k))
        p.grad = g.clone()
        ref.step()
        lp._adamw(settings, run, g, 0.01)
        torch.testing.assert_close(run.phi, p.detach(), rtol=1e-6, atol=1e-7)


def test_config_checks():
    with pytest.raises(ValueError, match="pairs"):
        tiny_config(pairs=0)
    with pytest.raises(ValueError, match="max_inner"):
        tiny_config(min_inner=10, max_inner=5)
    with pytest.raises(ValueError, match="step_mode"):
        tiny_config(step_mode="fancy")
    # caught at construction, not after the data loads
    with pytest.raises(ValueError, match=r"max_inner: expected an integer, got -5\.0"):
        tiny_config(max_inner=-5.0)
    with pytest.raises(ValueError, match=r"seed: must be an integer in \[0, 2\*\*63 - 1\]"):
        tiny_config(seed=-1)
    with pytest.raises(ValueError, match="beta1: expected a number, got 'a'"):
        tiny_config(beta1="a")
    with pytest.raises(ValueError, match="sigma: expected a finite number"):
        tiny_config(sigma=float("inf"))
    assert tiny_config(validation_rounds=[8, 4]).validation_rounds == (4, 8)


# --------------------------------------------------------------------------- vmapped vs looped


def looped_unroll(trainer: PES, phi_batch: torch.Tensor, inner: mp.InnerState):
    """The same truncation one particle at a time, through the ordinary aggregator class and
    `Cluster.compute` (autograd): what `lagg:PATH` does in the simulator."""
    cfg, env = trainer.cfg, trainer.env
    pairs = len(inner.seed)
    losses, thetas, accs = [], [], []
    for i in range(phi_batch.shape[0]):
        agg = trainer.aggregator(phi_batch[i])
        theta, state = inner.theta[i], tree_map(lambda x, i=i: x[i], inner.acc)
        cluster = Cluster(env.task, env.data.x_train, env.data.y_train,
                          partition(env.data.y_train, cfg.num_workers, cfg.partition,
                                    seed=cfg.seed), batch_size=cfg.batch_size,
                          mode="local_sgd", local_steps=cfg.local_steps,
                          local_lr=cfg.local_lr, seed=int(inner.seed[i % pairs]))
        start, total = int(inner.round[i % pairs]), 0.0
        factor = (float(trainer.lr_factors([int(inner.seed[i % pairs])])[0])
                  if cfg.lr_augment > 1 else 1.0)
        for t in range(start, start + cfg.unroll):
            ctx = RoundContext(round=t, params=theta, layout=env.task.layout,
                               num_workers=cfg.num_workers, worker_ids=torch.arange(3))
            lr = agg.requested_local_lr(state, ctx)
            out = cluster.compute(theta, t, lr=(cfg.local_lr if lr is None else lr) * factor)
            total += float(env.clip_loss(out.losses.mean()))
            step, state = agg.step(state, out.updates, ctx)
            theta = theta - step
        losses.append(total / cfg.unroll)
        thetas.append(theta)
        accs.append(state)
    acc = tree_map(lambda *x: torch.stack(x), *accs)
    return torch.tensor(losses), inner._replace(theta=torch.stack(thetas), acc=acc,
                                                round=inner.round + cfg.unroll)


@pytest.mark.parametrize("kind,options", [
    ("lagg", {"step_mode": "reference"}), ("lopt", {"step_mode": "reference"}),
    # general LAgg-A choosing each particle's local lr (a controller that moves it)
    ("lagg", {"step_mode": "general", "learned_local_lr": True, "local_lr_gain": 0.3}),
    # task augmentation: each run's workers' lr times its own factor
    ("lopt", {"step_mode": "general", "lr_augment": 3.0}),
], ids=["lagg", "lopt", "general-lagg-local-lr", "general-lopt-lr-augment"])
def test_vmapped_pes_step_equals_looped(digits, kind, options):
    cfg = tiny_config(kind=kind, **options)
    trainer = PES(cfg, digits)
    n = trainer.phi.dim
    phi = trainer.phi.init(0)
    accum = torch.zeros(cfg.pairs, n)
    inner_v = inner_l = trainer.fresh_inner(range(cfg.pairs))
    assert len(set(inner_v.seed.tolist())) == cfg.pairs  # every pair its own problem
    for k in range(2):  # the second truncation starts mid-run, with accumulated ε
        eps = antithetic_noise(cfg.pairs, n, cfg.sigma, torch.Generator().manual_seed(k))
        got = pes_step(trainer.unroll, phi, accum, inner_v, eps, sigma=cfg.sigma)
        want = pes_step(lambda b, i: looped_unroll(trainer, b, i), phi, accum, inner_l, eps,
                        sigma=cfg.sigma)
        torch.testing.assert_close(got.loss_pos, want.loss_pos, rtol=0, atol=2e-6)
        torch.testing.assert_close(got.loss_neg, want.loss_neg, rtol=0, atol=2e-6)
        torch.testing.assert_close(got.inner.theta, want.inner.theta, rtol=1e-4, atol=1e-6)
        assert cosine(got.grad, want.grad) > 0.999
        assert torch.equal(got.inner.round, want.inner.round)
        accum, inner_v, inner_l = got.accum, got.inner, want.inner
    # the pairs' antithetic twins really differ
    assert not torch.equal(got.loss_pos, got.loss_neg)


# --------------------------------------------------------------------------- the trainer


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "step_s")} for r in rows]


def _rows(path):
    return [json.loads(line) for line in (path / "meta_train.jsonl").read_text().splitlines()]


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, digits, monkeypatch):
    cfg = tiny_config()
    straight = meta_train_pes(cfg, tmp_path / "a", progress=False, data=digits)
    assert straight.summary["steps_done"] == 6
    rows = _rows(tmp_path / "a")
    assert sum(r.get("resets", 0) for r in rows) >= 2  # inner runs of 6-9 rounds did reset
    assert [r["step"] for r in rows if "validation_score" in r] == [0, 3, 6]

    calls = {"n": 0}
    real = mp.pes_step

    def dies_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed mid-step; the last checkpoint is step 4
        return real(*args, **kwargs)

    monkeypatch.setattr(mp, "pes_step", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        meta_train_pes(cfg, tmp_path / "b", progress=False, data=digits)
    _, meta = load_checkpoint(tmp_path / "b" / "meta_state")
    assert meta["step"] == 4
    monkeypatch.setattr(mp, "pes_step", real)
    resumed = meta_train_pes(cfg, tmp_path / "b", progress=False, resume=True, data=digits)

    ta, _ = load_checkpoint(tmp_path / "a" / "meta_state")
    tb, _ = load_checkpoint(tmp_path / "b" / "meta_state")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert _strip(_rows(tmp_path / "b")) == _strip(rows)
    assert resumed.best_step == straight.best_step
    assert resumed.best_score == straight.best_score


def test_outputs_load_as_aggregator_and_match_validation(tmp_path, digits):
    """lagg:OUT loads the best φ; run through the simulator-style loop it gives the
    recorded validation losses; the untrained residual-momentum φ is SlowMo."""
    cfg = tiny_config(steps=3)
    summary = meta_train_pes(cfg, tmp_path, progress=False, data=digits, stop_at=3).summary
    agg = build_aggregator(f"lagg:{tmp_path}")
    assert agg.config == lagg_config(cfg)
    trainer = PES(cfg, digits)
    res = evaluate_aggregator(agg, trainer.env, trainer.seeds, cfg.validation_rounds)
    best = summary["best_validation"]
    for h in cfg.validation_rounds:
        assert res[f"mean_loss@{h}"] == pytest.approx(best[f"mean_loss@{h}"], rel=1e-4)
    first = _rows(tmp_path)[0]
    slowmo = summary["baselines"]["slowmo"]
    for h in cfg.validation_rounds:
        assert first[f"mean_loss@{h}"] == pytest.approx(slowmo[f"mean_loss@{h}"], rel=1e-4)
    info = json.loads((tmp_path / "aggregator.json").read_text())
    assert info["trained_on"]["meta_gradient"] == "truncated_pes"
    assert "fedavg" in info["validation"]["baselines"]
    assert json.loads((tmp_path / "summary.json").read_text())["steps_done"] == 3


def test_resume_rejects_another_config(tmp_path, digits):
    meta_train_pes(tiny_config(steps=2, validate_every=2), tmp_path, progress=False,
                   data=digits)
    with pytest.raises(CheckpointError, match="sigma"):
        meta_train_pes(tiny_config(steps=2, validate_every=2, sigma=0.1), tmp_path,
                       progress=False, resume=True, data=digits)


def test_cli_pair(tmp_path, capsys):
    common = ["--task", "digits-mlp", "--workers", "3", "--local-steps", "2", "--steps", "2",
              "--set", "batch_size=8", "--set", "pairs=1", "--set", "unroll=2",
              "--set", "validation_rounds=[3]", "--set", "validate_every=2",
              "--set", "model=mlp:4:relu", "--no-compile", "--out", str(tmp_path)]
    assert cli_main(["meta-train", "lopt", *common]) == 0
    out = capsys.readouterr().out
    assert "lopt:" in out and json.loads(out[: out.rindex("}") + 1])["steps_done"] == 2
    assert build_aggregator(f"lopt:{tmp_path}").config.kind == "lopt"
    assert cli_main(["meta-train", "lopt", *common, "--set", "nope=1"]) == 2
    assert "unknown key nope" in capsys.readouterr().err


def test_max_grad_norm_clips_the_estimate_before_adamw(tmp_path, digits, monkeypatch):
    """With a tiny max_grad_norm every step is clipped, and AdamW sees the clipped vector."""
    seen = []
    real = lp._adamw
    monkeypatch.setattr(lp, "_adamw", lambda s, run, grad, lr: (seen.append(grad.clone()),
                                                               real(s, run, grad, lr)))
    meta_train_pes(tiny_config(steps=3, max_grad_norm=1e-3), tmp_path, progress=False,
                   data=digits)
    rows = [r for r in _rows(tmp_path) if "grad_norm" in r]
    assert len(seen) == len(rows) == 3
    for row, grad in zip(rows, seen, strict=True):
        assert row["clipped"] and row["grad_norm"] > 1e-3
        assert float(grad.norm()) == pytest.approx(1e-3, rel=1e-4)
    seen.clear()  # off (the default): the raw estimate, never marked clipped
    meta_train_pes(tiny_config(steps=3), tmp_path / "off", progress=False, data=digits)
    rows = [r for r in _rows(tmp_path / "off") if "grad_norm" in r]
    assert not any(r["clipped"] for r in rows)
    assert [float(g.norm()) for g in seen] == pytest.approx([r["grad_norm"] for r in rows])
    with pytest.raises(ValueError, match="max_grad_norm"):
        tiny_config(max_grad_norm=-1.0)


def test_init_from_starts_at_saved_weights(tmp_path, digits):
    first = tiny_config(steps=2, validate_every=2)
    meta_train_pes(first, tmp_path / "a", progress=False, data=digits)
    saved = build_aggregator(f"lagg:{tmp_path / 'a'}")
    cfg = tiny_config(steps=1, init_from=str(tmp_path / "a"), seed=3)
    trainer = PES(cfg, digits)
    assert torch.equal(trainer.phi_of(load_lagg(tmp_path / "a")), trainer.phi.of(saved.net))
    meta_train_pes(cfg, tmp_path / "b", progress=False, data=digits, stop_at=0)
    start = build_aggregator(f"lagg:{tmp_path / 'b'}")  # step 0's validation keeps φ₀
    for k, v in saved.net.state_dict().items():
        assert torch.equal(start.net.state_dict()[k], v), k
    with pytest.raises(ValueError, match="trains"):  # another architecture
        meta_train_pes(tiny_config(init_from=str(tmp_path / "a"), hidden=4), tmp_path / "c",
                       progress=False, data=digits)
    with pytest.raises(CheckpointError):
        meta_train_pes(tiny_config(init_from=str(tmp_path / "nothing")), tmp_path / "d",
                       progress=False, data=digits)


def test_init_from_uncapped_general_weights_with_a_correction_cap(tmp_path, digits):
    """correction_cap changes no tensor of φ: capped meta-training starts from them."""
    from metagg.learned.lagg import LAggA, save_lagg

    general = dict(step_mode="general", residual_base="prodigy", correction_scale=0.1)
    saved = LAggA(config=mp.lagg_config(tiny_config(**general)), seed=4)
    save_lagg(tmp_path / "g", saved)
    trainer = PES(tiny_config(init_from=str(tmp_path / "g"), correction_cap=1.0, **general),
                  digits)
    assert trainer.phi.config.correction_cap == 1.0
    assert torch.equal(trainer.phi_of(load_lagg(tmp_path / "g")), trainer.phi.of(saved.net))
    with pytest.raises(ValueError, match="correction_cap"):
        mp.lagg_config(tiny_config(correction_cap=1.0))  # residual mode: nothing to cap


def test_init_from_the_shipped_general_weights(tmp_path, digits):
    """`--set init_from=pretrained/general` fine-tunes the zoo's general weights of the
    run's kind (here general-lagg, whose architecture the config repeats)."""
    from metagg.aggregators.registry import build_aggregator

    cfg = tiny_config(step_mode="general", residual_base="prodigy", residual_scale=1.0,
                      correction_scale=0.1, correction_cap=1.0, hidden=8,
                      init_from="pretrained/general", steps=1)
    meta_train_pes(cfg, tmp_path / "ft", progress=False, data=digits, stop_at=0)
    start, shipped = build_aggregator(f"lagg:{tmp_path / 'ft'}"), build_aggregator(
        "lagg:pretrained/general")
    for k, v in shipped.net.state_dict().items():
        assert torch.equal(start.net.state_dict()[k], v), k


def test_resume_of_a_checkpoint_written_before_a_config_key_existed(tmp_path, digits,
                                                                    rewrite_meta):
    cfg = tiny_config(steps=2, validate_every=2)
    meta_train_pes(cfg, tmp_path, progress=False, data=digits)

    def older(meta: dict) -> None:  # as an older metagg wrote it
        for key in ("max_grad_norm", "init_from"):
            del meta["config"][key]

    rewrite_meta(tmp_path / "meta_state", older)
    done = meta_train_pes(tiny_config(steps=3, validate_every=2), tmp_path, progress=False,
                          resume=True, data=digits)
    assert done.summary["steps_done"] == 3


def test_resume_does_not_need_init_from_any_more(tmp_path, digits):
    """φ comes from the checkpoint: the weights it started from may be gone."""
    import shutil

    meta_train_pes(tiny_config(steps=2, validate_every=2), tmp_path / "a", progress=False,
                   data=digits)
    cfg = tiny_config(steps=2, validate_every=2, init_from=str(tmp_path / "a"))
    meta_train_pes(cfg, tmp_path / "b", progress=False, data=digits, stop_at=1)
    shutil.rmtree(tmp_path / "a")
    assert meta_train_pes(cfg, tmp_path / "b", progress=False, resume=True,
                          data=digits).summary["steps_done"] == 2


def test_lr_augmentation_factors_are_per_run_deterministic_and_in_range(digits):
    trainer = PES(tiny_config(step_mode="general", lr_augment=4.0), digits)
    seeds = list(range(200))
    c = trainer.lr_factors(seeds)
    assert torch.equal(c, trainer.lr_factors(seeds))  # a function of the run's seed
    assert float(c.min()) >= 0.25 and float(c.max()) <= 4.0
    assert float(c.min()) < 0.35 and float(c.max()) > 3.0  # the range is used
    assert abs(float(c.log().mean())) < 0.2  # log-uniform around 1
    with pytest.raises(ValueError, match="lr_augment"):
        tiny_config(lr_augment=0.5)


def test_trainable_subset_moves_only_those_entries(tmp_path, digits):
    cfg = tiny_config(step_mode="general", learned_local_lr=True, weight_decay=0.0,
                      trainable="schedule,lr_control", steps=3, validate_every=3)
    trainer = PES(cfg, digits)
    mask = mp.trainable_mask(trainer.phi, cfg.trainable)
    assert int(mask.sum()) == 2 * 3 + 4  # schedule [2, 3], lr_control [4]
    eps = trainer.perturbations(0)
    assert torch.equal(eps * (1 - mask), torch.zeros_like(eps)) and bool((eps * mask).any())
    start = trainer.phi.init(cfg.seed)
    meta_train_pes(cfg, tmp_path / "run", progress=False, data=digits)
    phi = trainer.phi.of(load_lagg(tmp_path / "run").net)
    frozen = mask == 0
    assert torch.equal(phi[frozen], start[frozen]) and not torch.equal(phi, start)
    with pytest.raises(ValueError, match="weight_decay=0"):
        tiny_config(trainable="schedule")
    with pytest.raises(ValueError, match=r"trainable: \['nope'\] are not in φ"):
        PES(tiny_config(trainable="nope", weight_decay=0.0), digits)
