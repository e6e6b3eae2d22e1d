"""Running a frozen aggregator on a meta-training env, and the one validation score.

    res = evaluate_aggregator(agg, env, seeds=[101, 102], horizons=(100, 400))
    res["loss@100"], res["mean_acc@400"]          # per-seed lists and their means
    score(res, (100, 400))                         # mean log train loss; lower is better

Any aggregator runs (a learned one, or mean + a server optimizer as a baseline), from
each model seed for max(horizons) rounds; `loss@T` is the training loss on the whole
training split and `acc@T` the test accuracy. A non-finite θ, or a round whose every row
the server dropped as non-finite, marks the run diverged: its later losses are inf and
accuracies 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from metagg.aggregators.base import Aggregator, RoundContext, chosen_local_lr
from metagg.data import Dataset
from metagg.learned.meta.envs import LocalSGDEnv, MetaEnv
from metagg.tasks import Task

__all__ = ["SCORE_DEFINITION", "evaluate_aggregator", "score", "validate"]

SCORE_DEFINITION = "mean over seeds and horizons of log(train loss)"


def score(result: dict[str, Any], horizons: Sequence[int], floor: float = 0.0) -> float:
    """Mean over seeds and horizons of log(train loss + floor); inf if any run diverged."""
    logs = [math.log(max(v + floor, 1e-30)) for h in horizons for v in result[f"loss@{h}"]]
    return sum(logs) / len(logs) if all(math.isfinite(v) for v in logs) else math.inf


def evaluate_aggregator(agg: Aggregator, env: MetaEnv, seeds: Sequence[int],
                        horizons: Sequence[int]) -> dict[str, Any]:
    """Per-seed `loss@T` / `acc@T` for T in `horizons`, and their `mean_` (no gradients)."""
    out: dict[str, Any] = {f"{k}@{h}": [] for h in horizons for k in ("loss", "acc")}
    with torch.no_grad():
        if isinstance(env, LocalSGDEnv):
            _local_sgd_runs(agg, env, seeds, horizons, out)
        else:
            for seed in seeds:
                _one_run(agg, env, seed, horizons, out)
    return _with_means(out)


def _one_run(agg: Aggregator, env: Any, seed: int, horizons: Sequence[int],
             out: dict[str, Any]) -> None:
    """A gradient-mode env's run from one model seed, one round at a time."""
    theta = env.task.init_params(seed)
    run = env.inner(seed, agg)
    state = agg.init(env.task.layout, env.num_workers)
    diverged = False
    for t in range(max(horizons)):
        if not diverged:
            rows, ctx = env.round_inputs(run, theta, t, state)
            # the server drops non-finite rows: none left means the workers' losses blew up
            diverged = len(rows) == 0
        if not diverged:
            step, state = agg.step(state, rows, ctx)
            theta = theta - step
            diverged = not bool(torch.isfinite(theta).all())
        if t + 1 in horizons:
            record(out, t + 1, env.task, env.data, theta, diverged)


def _local_sgd_runs(agg: Aggregator, env: LocalSGDEnv, seeds: Sequence[int],
                    horizons: Sequence[int], out: dict[str, Any]) -> None:
    """The local-SGD env's runs: the workers of every seed as one batch, the aggregator
    one seed at a time through its ordinary `step`, as in the simulator."""
    task, k = env.task, env.num_workers
    ids = torch.arange(k)
    theta = torch.stack([task.init_params(s) for s in seeds])
    states = [agg.init(task.layout, k) for _ in seeds]
    diverged = [False] * len(seeds)
    for t in range(max(horizons)):
        xb, yb = env.batches(seeds, [t] * len(seeds))
        ctxs = [RoundContext(round=t, params=theta[i], layout=task.layout, num_workers=k,
                             worker_ids=ids, mode="local_sgd", local_lr=env.cfg.local_lr,
                             local_steps=env.cfg.local_steps) for i in range(len(seeds))]
        # the workers' lr: the aggregator's choice per seed, checked as the server does
        lrs = [chosen_local_lr(agg, st, c) for st, c in zip(states, ctxs, strict=True)]
        for c, lr in zip(ctxs, lrs, strict=True):
            c.local_lr = c.local_lr if lr is None else lr
        chosen = (None if all(lr is None for lr in lrs)
                  else torch.tensor([c.local_lr for c in ctxs]))
        updates, _ = env.local_sgd(theta, xb, yb, chosen)
        steps = []
        for i in range(len(seeds)):
            if diverged[i]:
                steps.append(torch.zeros_like(theta[i]))
                continue
            ctx = ctxs[i]
            step, states[i] = agg.step(states[i], updates[i], ctx)
            steps.append(step)
        theta = theta - torch.stack(steps)
        diverged = [d or not bool(torch.isfinite(th).all())
                    for d, th in zip(diverged, theta, strict=True)]
        if t + 1 in horizons:
            for i in range(len(seeds)):
                record(out, t + 1, task, env.data, theta[i], diverged[i])


def record(out: dict[str, Any], t: int, task: Task, data: Dataset, theta: torch.Tensor,
           diverged: bool) -> None:
    """Append one seed's training loss and test accuracy at round t to `out`."""
    if diverged or not bool(torch.isfinite(theta).all()):
        out[f"loss@{t}"].append(math.inf)
        out[f"acc@{t}"].append(0.0)
        return
    loss = task.evaluate(theta, data.x_train, data.y_train)["loss"]
    out[f"loss@{t}"].append(loss if math.isfinite(loss) else math.inf)
    out[f"acc@{t}"].append(task.evaluate(theta, data.x_test, data.y_test)["accuracy"])


def _with_means(out: dict[str, Any]) -> dict[str, Any]:
    for key in [k for k in out if not k.startswith("mean_")]:
        out[f"mean_{key}"] = sum(out[key]) / len(out[key])
    return out


def validate(agg: Aggregator, envs: Sequence[MetaEnv], seeds: Sequence[int],
             horizons: Sequence[int], floor: float = 0.0) -> tuple[float, dict[str, Any]]:
    """(score, means) over every env (e.g. each attack of a mixture): the score is the
    mean of each env's score; with several envs the means are keyed `LABEL/mean_loss@T`.

    `floor` × ln C (C: the env's classes) is added to every loss before the log, so that
    a task learned to ~0 loss does not decide the score by how many more zeros it gets."""
    scores, means = [], {}
    for env in envs:
        res = evaluate_aggregator(agg, env, seeds, horizons)
        scores.append(score(res, horizons, floor * math.log(env.task.num_classes)))
        prefix = f"{env.label}/" if len(envs) > 1 else ""
        means.update({prefix + k: v for k, v in res.items() if k.startswith("mean_")})
    return sum(scores) / len(scores), means
