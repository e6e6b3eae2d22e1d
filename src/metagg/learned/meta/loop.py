"""The outer loop of meta-training, for any estimator (BPTT, PES).

    result = run_outer_loop(estimator, settings, "runs/x", config=cfg.to_dict(), ...)
    result.aggregator, result.best_score, result.history, result.summary

φ is one flat float32 vector. Each outer step asks the estimator for a gradient
estimate, clips its global L2 norm (computed in float64: a float32 norm of finite
entries can overflow), and applies AdamW (decoupled weight decay; learning rate with a
linear warm-up, then cosine decay to `final_lr`; a constant rate when both are off). A
non-finite estimate is skipped: it would poison φ and AdamW's moments.

Every `validate_every` steps (and at the last) the estimator validates φ on held-out
model seeds; the best φ (lowest score; the first validation is always kept, so the
output holds a loadable aggregator even if every validation diverged) is written as
`aggregator.safetensors` + `.json`. With `patience` the run stops after that many
validations without improvement.

Files in the output directory: `meta_state.safetensors` + `.json` (the checkpoint: φ,
AdamW's moments, the best φ, the estimator's state, counters; written atomically),
`meta_train.jsonl` (one row per step and validation), `summary.json`. All randomness is
derived from (seed, stream, step), so a run killed and resumed from its checkpoint
(same config; `steps` may grow) reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metagg.aggregators.base import Aggregator
from metagg.checkpoint import (
    CheckpointError,
    atomic_write_text,
    flatten_state,
    json_safe,
    json_text,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from metagg.learned.meta.estimators import Estimator
from metagg.learned.meta.evaluate import SCORE_DEFINITION

__all__ = ["LoopSettings", "MetaTrainResult", "lr_at", "run_outer_loop"]

log = logging.getLogger("metagg")

CHECKPOINT = "meta_state"
HISTORY = "meta_train.jsonl"
SUMMARY = "summary.json"
FORMAT = "metagg.meta_checkpoint"


@dataclass(frozen=True)
class LoopSettings:
    """The outer optimisation, in outer steps (one estimate each)."""

    steps: int
    lr: float
    final_lr: float  # = lr (with warmup 0): a constant rate
    warmup: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 0.0  # clip the estimate's global L2 norm (0 = off)
    validate_every: int = 1
    checkpoint_every: int = 1
    patience: int = 0  # validations without improvement before stopping (0 = never)


def lr_at(s: LoopSettings, step: int) -> float:
    """Outer lr at (0-based) step: linear warm-up to `lr`, then cosine decay to `final_lr`."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(s.steps - s.warmup, 1)
    progress = min((step - s.warmup) / span, 1.0)
    return s.final_lr + (s.lr - s.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class _Outer:
    """Everything the loop carries from step to step (what a checkpoint holds)."""

    step: int
    phi: torch.Tensor
    adam_m: torch.Tensor
    adam_v: torch.Tensor
    adam_t: int  # AdamW updates applied (skipped steps do not count)
    inner: Any  # the estimator's state
    best_phi: torch.Tensor
    best_score: float = math.inf
    best_step: int = 0
    best_validation: dict[str, Any] = field(default_factory=dict)
    stale: int = 0  # validations since the best
    baselines: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # e.g. compile, as run so far


@dataclass
class MetaTrainResult:
    """What a meta-training run returns (also written to its output directory)."""

    aggregator: Aggregator  # the best φ on validation (frozen)
    best_score: float  # mean log train loss over validation seeds and horizons
    best_step: int  # outer steps done when it was found (0 = the initial φ)
    history: list[dict[str, Any]]
    path: Path  # the output directory
    summary: dict[str, Any]

    @property
    def best_iteration(self) -> int | None:
        """BPTT: the meta-iteration of the best φ."""
        return self.summary.get("best_validation", {}).get("iteration")


def _adamw(s: LoopSettings, run: _Outer, grad: torch.Tensor, lr: float) -> None:
    """torch.optim.AdamW's update (decoupled weight decay), in place on `run`."""
    run.adam_t += 1
    t = run.adam_t
    run.adam_m = run.adam_m * s.beta1 + (1 - s.beta1) * grad
    run.adam_v = run.adam_v * s.beta2 + (1 - s.beta2) * grad.square()
    phi = run.phi * (1 - lr * s.weight_decay)
    denom = run.adam_v.sqrt() / math.sqrt(1 - s.beta2 ** t) + s.eps
    run.phi = phi - (lr / (1 - s.beta1 ** t)) * run.adam_m / denom


def _json_row(row: Mapping[str, Any]) -> str:
    return json_text(dict(row))


def run_outer_loop(
    est: Estimator,
    s: LoopSettings,
    out_dir: str | Path,
    *,
    config: dict[str, Any],
    defaults: dict[str, Any],
    trained_on: dict[str, Any],
    may_change: Sequence[str] = ("steps",),
    seed: int = 0,
    init_phi: torch.Tensor | None = None,
    options: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool | None = None,
    stop_at: int | None = None,
    label: str = "meta-train",
) -> MetaTrainResult:
    """Meta-train with `est` (see the module docstring).

    Args:
        est: the meta-gradient estimator.
        s: the outer loop's settings.
        out_dir: output directory (created).
        config: the run's configuration as plain data (saved in the checkpoint; a resume
            must have the same, except the keys in `may_change`); `defaults` are its
            defaults (keys added since a checkpoint was written take them).
        trained_on: what the saved aggregator records about its meta-training.
        seed: φ's initialisation seed (when `init_phi` is None).
        init_phi: φ to start from (e.g. saved weights); a resume takes the checkpoint's.
        options: run options kept in the checkpoint (e.g. {"compile": True}); a resume
            with other values warns (results then differ by float rounding).
        resume: continue from `out_dir`'s checkpoint (CheckpointError if there is none).
        progress: tqdm bar with the meta-loss (default: when stderr is a terminal).
        stop_at: return once this many steps are done (rounded up to a step the
            estimator can resume from), after checkpointing; a resume then continues
            exactly as if the run had not stopped.
        label: the progress bar's text.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(options or {})
    history: list[dict[str, Any]] = []
    if resume:
        run = _load(out, est, config, defaults, may_change)
        history = _read_history(out / HISTORY, run.step)
        log.info("resuming meta-training at outer step %d", run.step)
        if run.options != options:
            log.warning("the run so far used %s, this resume %s: it will differ from an "
                        "uninterrupted run by float rounding", run.options, options)
            run.options = options
    else:
        phi0 = est.init_phi(seed) if init_phi is None else init_phi.clone()
        run = _Outer(step=0, phi=phi0, adam_m=torch.zeros(est.dim), adam_v=torch.zeros(est.dim),
                     adam_t=0, inner=est.init_state(), best_phi=phi0.clone(), options=options)
    target = s.steps if stop_at is None else min(s.steps, stop_at)
    while target < s.steps and not est.resumable(target):
        target += 1
    wall0 = time.perf_counter() - run.wall_s

    def wall() -> float:
        return round(time.perf_counter() - wall0, 3)

    def checkpoint() -> None:
        run.wall_s = wall()
        # history first: a checkpoint never refers to rows that are not on disk
        atomic_write_text(out / HISTORY, "".join(_json_row(r) + "\n" for r in history))
        _save(out, est, run, config)

    def validate() -> None:
        value, means = est.validate(run.phi)
        row = {"step": run.step, **est.progress(run.step), "validation_score": value,
               **means, "wall_s": wall()}
        history.append(row)
        if value < run.best_score or not run.best_validation:
            run.best_score, run.best_step, run.stale = value, run.step, 0
            run.best_phi, run.best_validation = run.phi.clone(), row
            validation = {"best_step": run.best_step, "score": run.best_score,
                          "score_definition": getattr(est, "score_definition",
                                                      SCORE_DEFINITION), **row,
                          "baselines": run.baselines}
            est.save(out, run.best_phi, trained_on, validation)
        else:
            run.stale += 1
        log.info("outer step %d: validation score %.4f (best %.4f at %d)", run.step, value,
                 run.best_score, run.best_step)

    if not run.baselines:
        run.baselines = est.baselines()
    if run.step == 0 and not any("validation_score" in r for r in history):
        validate()
        checkpoint()
    stopped_early = bool(s.patience) and run.stale >= s.patience
    if stopped_early:
        log.warning("the run in %s had stopped early (patience %d): nothing to do", out,
                    s.patience)
    bar = _progress_bar(progress, run.step, target, label)
    try:
        while run.step < target and not stopped_early:
            t0 = time.perf_counter()
            lr = lr_at(s, run.step)
            res = est.estimate(run.phi, run.inner, run.step)
            grad_norm = float(res.grad.double().norm())
            finite = math.isfinite(grad_norm)
            clipped = finite and 0 < s.max_grad_norm < grad_norm
            if finite:
                _adamw(s, run, res.grad * (s.max_grad_norm / grad_norm) if clipped
                       else res.grad, lr)
            run.inner = res.state
            run.step += 1
            history.append({"step": run.step, **res.metrics, "lr": lr, "grad_norm": grad_norm,
                            "clipped": clipped, "skipped": not finite,
                            "step_s": round(time.perf_counter() - t0, 3), "wall_s": wall()})
            if bar is not None:
                bar.update(1)
                loss = res.metrics.get("meta_loss")
                bar.set_postfix(meta_loss=f"{loss:.4f}" if loss is not None else "-",
                                best=f"{run.best_score:.3f}")
            validated = run.step % s.validate_every == 0 or run.step == s.steps
            if validated:
                validate()
                stopped_early = bool(s.patience) and run.stale >= s.patience
                if stopped_early:
                    log.info("early stop after %d outer steps (patience %d)", run.step,
                             s.patience)
            if est.resumable(run.step) and (validated or run.step % s.checkpoint_every == 0
                                            or run.step == target):
                checkpoint()
    finally:
        if bar is not None:
            bar.close()
    steps = [r["step_s"] for r in history if "step_s" in r]
    summary = {
        "meta_gradient": est.name, "steps_done": run.step, "steps": s.steps,
        **est.progress(run.step), "best_step": run.best_step, "best_score": run.best_score,
        "best_validation": run.best_validation, "baselines": run.baselines,
        "stopped_early": stopped_early,
        "seconds_per_step": statistics.median(steps) if steps else None,
        "wall_s": run.wall_s, "path": str(out / "aggregator"),
        "use": f"aggregator {est.kind}:{out}",
    }
    atomic_write_text(out / SUMMARY, json_text(summary, indent=2))
    return MetaTrainResult(est.aggregator(run.best_phi), run.best_score, run.best_step,
                           history, out, summary)


def _progress_bar(progress: bool | None, start: int, total: int, label: str) -> Any:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress or start >= total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=label, unit="step", leave=False)


def _save(out: Path, est: Estimator, run: _Outer, config: dict[str, Any]) -> None:
    tensors = {"phi": run.phi, "adam_m": run.adam_m, "adam_v": run.adam_v,
               "best_phi": run.best_phi,
               **flatten_state(est.checkpoint_state(run.inner), prefix="estimator")}
    meta = {"format": FORMAT, "meta_gradient": est.name, "config": config, "step": run.step,
            **est.progress(run.step), "adam_t": run.adam_t,
            "best_score": run.best_score if math.isfinite(run.best_score) else None,
            "best_step": run.best_step, "best_validation": run.best_validation,
            "stale": run.stale, "baselines": run.baselines, "wall_s": run.wall_s,
            "options": run.options}
    save_checkpoint(out / CHECKPOINT, tensors, json_safe(meta))


def _load(out: Path, est: Estimator, config: dict[str, Any], defaults: dict[str, Any],
          may_change: Sequence[str]) -> _Outer:
    path = out / CHECKPOINT
    if not path.with_suffix(".json").exists():
        raise CheckpointError(f"nothing to resume in {out}: no {CHECKPOINT}.json")
    tensors, meta = load_checkpoint(path)
    if meta.get("format") != FORMAT or meta.get("meta_gradient") != est.name:
        raise CheckpointError(f"{path}.json is not a {est.name} meta-training checkpoint")
    saved = {**defaults, **dict(meta.get("config") or {})}
    diff = sorted(k for k in set(saved) | set(config)
                  if k not in may_change and saved.get(k) != config.get(k))
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} → {config.get(k)!r}" for k in diff)
        raise CheckpointError(f"{out}: the checkpoint was written with a different config "
                              f"({changes})")
    for k in ("phi", "adam_m", "adam_v", "best_phi"):
        if k not in tensors or tensors[k].shape != (est.dim,):
            raise CheckpointError(f"{path}: tensor {k} missing or of the wrong shape")
    # an estimator whose state's shapes vary (one task per group) builds the template
    # from the checkpoint itself
    maker = getattr(est, "state_template", None)
    template = est.checkpoint_state(maker(tensors) if maker else est.init_state())
    inner = est.restore_state(unflatten_state(template, tensors, prefix="estimator"))
    best = meta.get("best_score")
    return _Outer(step=int(meta["step"]), phi=tensors["phi"], adam_m=tensors["adam_m"],
                  adam_v=tensors["adam_v"], adam_t=int(meta["adam_t"]), inner=inner,
                  best_phi=tensors["best_phi"],
                  best_score=math.inf if best is None else float(best),
                  best_step=int(meta["best_step"]),
                  best_validation=dict(meta.get("best_validation") or {}),
                  stale=int(meta.get("stale", 0)), baselines=dict(meta.get("baselines") or {}),
                  wall_s=float(meta.get("wall_s", 0.0)), options=dict(meta.get("options") or {}))


def _read_history(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= upto]
