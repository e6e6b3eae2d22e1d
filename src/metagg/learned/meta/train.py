"""Meta-training entry points: a config (and optionally the envs) in, a trained aggregator out.

    result = meta_train(MetaTrainConfig(iterations=300), out_dir="runs/rnn")   # BPTT
    result = meta_train(MetaTrainPESConfig(kind="lagg"), out_dir="runs/lagg")  # PES
    result = meta_train(cfg, [HeteroEnv(load_dataset("digits"))], out_dir="runs/h")
    result = meta_train_rnn(iterations=300, out_dir="runs/rnn-digits")        # keywords

The config's type picks the estimator (`BPTT` or `PES`); both run in the same outer loop
(`metagg.learned.meta.loop`), so checkpoints, resume, validation, the best φ and the
output files are the same for every learned aggregator. Without `envs`, a BPTT run
builds a `GradientEnv` per attack of `cfg.attack` (one without a mixture) and a PES run
a `LocalSGDEnv` — or, with `cfg.tasks` (task families), a `MultiTaskPES` over tasks drawn
from them.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from metagg.compiling import compiling_during
from metagg.config.engine import parse
from metagg.config.meta import MetaTrainConfig, MetaTrainPESConfig, MetaTrainTrustConfig
from metagg.data import Dataset
from metagg.learned.lagg import load_lagg
from metagg.learned.meta.envs import GradientEnv, MetaEnv, load_task_data, task_envs
from metagg.learned.meta.estimators import BPTT
from metagg.learned.meta.loop import LoopSettings, MetaTrainResult, run_outer_loop
from metagg.learned.meta.multitask import MultiTaskPES
from metagg.learned.meta.pes import PES
from metagg.learned.meta.robust import TrustES
from metagg.learned.store import pretrained_for
from metagg.threads import threads_during

__all__ = ["meta_train", "meta_train_pes", "meta_train_rnn", "meta_train_trust", "torch_threads"]


@contextlib.contextmanager
def torch_threads(threads: int | str | None) -> Iterator[None]:
    """torch's threads set to `threads` inside the block: an int >= 1, "auto" (the cores
    other processes leave free, chosen once at the start here: the outer loop does not
    re-check) or None (unchanged); restored after. See `metagg.threads`."""
    with threads_during(threads):
        yield


def meta_train(
    cfg: MetaTrainConfig | MetaTrainPESConfig | MetaTrainTrustConfig,
    envs: Sequence[MetaEnv] | None = None,
    *,
    out_dir: str | Path | None = None,
    data: Dataset | None = None,
    resume: bool = False,
    progress: bool | None = None,
    stop_at: int | None = None,
    compile: bool = False,
    threads: int | str | None = None,
) -> MetaTrainResult:
    """Meta-train the learned aggregator `cfg` describes (see the module docstring).

    Args:
        cfg: `MetaTrainConfig` (RNN / ARNN, BPTT) or `MetaTrainPESConfig` (LAgg-A /
            LOpt-A, PES).
        envs: BPTT only: the envs to train on (e.g. a `HeteroEnv`); default from `cfg`.
        out_dir: where the aggregator, checkpoint, history and summary go (default: BPTT's
            `cfg.out_dir`; neither: a temporary directory, the result kept in memory).
        data: a `Dataset` to use instead of loading `cfg.dataset`.
        resume: continue from `out_dir`'s checkpoint (same config; `iterations` / `steps`
            may grow): the same result as an uninterrupted run.
        progress: a progress bar (default: when stderr is a terminal).
        stop_at: return after this many outer steps (checkpointed); for tests.
        compile: PES only: `torch.compile` the inner training and the learned step.
        threads: torch threads during the run: an int, "auto" (see `torch_threads`) or
            None (unchanged). A bit-exact resume needs the same fixed count.
    """
    if out_dir is None and isinstance(cfg, MetaTrainConfig):
        out_dir = cfg.out_dir
    if out_dir is None:
        if resume:
            raise ValueError("resume needs out_dir (the directory holding meta_state.*)")
        with tempfile.TemporaryDirectory(prefix="metagg-meta-") as tmp:
            return meta_train(cfg, envs, out_dir=tmp, data=data, progress=progress,
                              stop_at=stop_at, compile=compile, threads=threads)
    # `compile` covers PES's own inner loops; any simulator workers inside (BPTT's
    # envs, validation) stay eager whatever the process default, so that a meta-training
    # run and its resume give the same result everywhere
    with torch_threads(threads), compiling_during(False):
        if isinstance(cfg, MetaTrainPESConfig):
            if envs is not None:
                raise ValueError("a PES run builds its own LocalSGDEnv: pass data, not envs")
            return _pes(cfg, Path(out_dir), data, resume, progress, stop_at, compile)
        if isinstance(cfg, MetaTrainTrustConfig):
            if envs is not None:
                raise ValueError("a trust run builds its own simulations: pass data, not envs")
            return _trust(cfg, Path(out_dir), data, resume, progress, stop_at)
        return _bptt(cfg, envs, Path(out_dir), data, resume, progress, stop_at)


def _bptt(cfg: MetaTrainConfig, envs: Sequence[MetaEnv] | None, out: Path,
          data: Dataset | None, resume: bool, progress: bool | None,
          stop_at: int | None) -> MetaTrainResult:
    validation = None
    if cfg.tasks is not None:
        if envs is not None or data is not None:
            raise ValueError("a multi-task run draws its own tasks: pass neither envs nor data")
        envs, validation = task_envs(cfg)
        # under keys of their own: "tasks" / "validation_tasks" are config fields
        described = {"training_task_names": envs.names, "validation_task_names": validation.names}
    else:
        if envs is None:
            data = data if data is not None else load_task_data(cfg.dataset, cfg.data_dir)
            envs = [GradientEnv(cfg, data, attack=a, attack_options=o, num_byzantine=b)
                    for a, o, b in cfg.attack_settings()]
        described = envs[0].describe()
    est = BPTT(cfg, envs, validation)
    n = est.truncations
    settings = LoopSettings(steps=cfg.iterations * n, lr=cfg.lr, final_lr=cfg.lr,
                            max_grad_norm=cfg.clip, validate_every=cfg.validate_every * n,
                            checkpoint_every=cfg.validate_every * n, patience=cfg.patience)
    trained_on = {**cfg.to_dict(), **described, "meta_gradient": est.name}
    return run_outer_loop(est, settings, out, config=cfg.to_dict(),
                          defaults=MetaTrainConfig().to_dict(), trained_on=trained_on,
                          may_change=("iterations", "out_dir"), seed=cfg.seed, resume=resume,
                          progress=progress, stop_at=None if stop_at is None else stop_at * n,
                          label=f"meta-train {est.kind}-{cfg.cell}")


def _pes(cfg: MetaTrainPESConfig, out: Path, data: Dataset | None, resume: bool,
         progress: bool | None, stop_at: int | None, compile: bool) -> MetaTrainResult:
    if cfg.tasks is not None:
        if data is not None:
            raise ValueError("a multi-task run draws its own tasks: pass no data")
        est: PES | MultiTaskPES = MultiTaskPES(cfg)
        compile = False  # a compile per task would cost more than it saves
    else:
        est = PES(cfg, data, compile=compile)
    settings = LoopSettings(steps=cfg.steps, lr=cfg.lr, final_lr=cfg.final_lr,
                            warmup=cfg.warmup, weight_decay=cfg.weight_decay, beta1=cfg.beta1,
                            beta2=cfg.beta2, eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm,
                            validate_every=cfg.validate_every,
                            checkpoint_every=cfg.checkpoint_every)
    # a resume takes φ from the checkpoint: init_from need not exist any more
    init_phi = None
    if cfg.init_from is not None and not resume:
        init_phi = est.phi_of(load_lagg(pretrained_for(cfg.kind, cfg.init_from)))
    described = est.describe() if isinstance(est, MultiTaskPES) else est.env.describe()
    trained_on = {**cfg.to_dict(), **described, "meta_gradient": est.name}
    return run_outer_loop(est, settings, out, config=cfg.to_dict(),
                          defaults=MetaTrainPESConfig().to_dict(), trained_on=trained_on,
                          may_change=("steps",), seed=cfg.seed, init_phi=init_phi,
                          options={"compile": compile}, resume=resume, progress=progress,
                          stop_at=stop_at, label=f"meta-train {cfg.kind} (PES)")


def _trust(cfg: MetaTrainTrustConfig, out: Path, data: Dataset | None, resume: bool,
           progress: bool | None, stop_at: int | None) -> MetaTrainResult:
    est = TrustES(cfg, data)
    settings = LoopSettings(steps=cfg.steps, lr=cfg.lr, final_lr=cfg.lr,
                            validate_every=cfg.validate_every,
                            checkpoint_every=cfg.checkpoint_every)
    init_phi = None
    if cfg.init_from is not None and not resume:
        from metagg.learned.trust import load_trust

        init_phi = est.phi_of(load_trust(cfg.init_from))
    trained_on = {**cfg.to_dict(), "meta_gradient": est.name}
    return run_outer_loop(est, settings, out, config=cfg.to_dict(),
                          defaults=MetaTrainTrustConfig().to_dict(), trained_on=trained_on,
                          may_change=("steps",), seed=cfg.seed, init_phi=init_phi,
                          resume=resume, progress=progress, stop_at=stop_at,
                          label="meta-train trust (ES)")


def meta_train_trust(out_dir: str | Path, *, data: Dataset | None = None,
                     progress: bool | None = None, resume: bool = False,
                     threads: int | str | None = None, **options: Any) -> MetaTrainResult:
    """Meta-train the learned trust rule over an attack mixture; keyword options are
    `MetaTrainTrustConfig` fields, e.g. ``meta_train_trust("runs/trust", steps=300)``."""
    cfg = parse(MetaTrainTrustConfig, options)
    return meta_train(cfg, out_dir=out_dir, data=data, progress=progress, resume=resume,
                      threads=threads)


def meta_train_rnn(*, data: Dataset | None = None, progress: bool | None = None,
                   threads: int | str | None = None, resume: bool = False,
                   **options: Any) -> MetaTrainResult:
    """Meta-train an RNN / ARNN aggregator; keyword options are `MetaTrainConfig` fields.

    Example (Ji §5.2 on the built-in digits; ARNN under 7 of 10 IPM attackers)::

        meta_train_rnn(iterations=300, out_dir="runs/rnn-digits")
        meta_train_rnn(arnn=True, attack="ipm", num_byzantine=7, out_dir="runs/arnn-ipm7")

    Raises:
        ConfigError: an unknown option (listing the allowed ones) or a bad value.
    """
    cfg = parse(MetaTrainConfig, options)
    return meta_train(cfg, data=data, progress=progress, threads=threads, resume=resume)


def meta_train_pes(cfg: MetaTrainPESConfig, out_dir: str | Path, progress: bool | None = None,
                   resume: bool = False, *, data: Dataset | None = None,
                   stop_at: int | None = None, compile: bool = False) -> MetaTrainResult:
    """Meta-train LAgg-A / LOpt-A by truncated PES into `out_dir` (see `meta_train`)."""
    return meta_train(cfg, out_dir=out_dir, data=data, resume=resume, progress=progress,
                      stop_at=stop_at, compile=compile)
