"""Any learned aggregator by path, whatever its kind: load, save, and the shipped zoo.

    agg = load_aggregator("pretrained/fmnist8x8-mlp32-lagg-k8h4")   # or a run directory
    save_aggregator("runs/x", agg, trained_on={...}, validation={...})
    for row in zoo_rows(): ...                                      # `metagg zoo list`

The kind is read from the saved JSON's "format"; each kind's own module does the work
(`metagg.learned.rnn.io`, `metagg.learned.lagg.io`, `metagg.learned.trust.io`). A trust
rule loads as a `RuleAggregator` with SGD at lr 1 after it (what `trust:PATH` gives with
digits.yaml's server optimizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metagg.aggregators.base import Aggregator, RuleAggregator
from metagg.aggregators.optimizers import sgd
from metagg.checkpoint import CheckpointError
from metagg.learned.lagg import io as lagg_io
from metagg.learned.lagg.aggregator import LearnedAdaAggregator
from metagg.learned.rnn import io as rnn_io
from metagg.learned.rnn.aggregator import RNNAggregator
from metagg.learned.store import pretrained_names, read_aggregator_info
from metagg.learned.trust import io as trust_io
from metagg.learned.trust.model import TrustRule

__all__ = ["load_aggregator", "save_aggregator", "zoo_rows"]


def load_aggregator(path: str | Path, **options: Any) -> Aggregator:
    """A saved learned aggregator of any kind (`options` go to its loader, e.g. an RNN's
    chunk_size; a trust rule takes `f`, the Byzantine workers to assume: with a distrust
    budget and f = 0 it is the mean); raises CheckpointError with the reason."""
    fmt = read_aggregator_info(path).get("format")
    if fmt == rnn_io.FORMAT:
        return rnn_io.load_rnn(path, **options)
    if fmt == lagg_io.FORMAT:
        if options:
            raise ValueError(f"a LOpt-A/LAgg-A aggregator takes no options, got {sorted(options)}")
        return lagg_io.load_lagg(path)
    if fmt == trust_io.FORMAT:
        if set(options) - {"f"}:
            raise ValueError(f"a trust aggregator takes only f, got {sorted(options)}")
        return RuleAggregator("trust", trust_io.load_trust(path, int(options.get("f", 0))),
                              sgd(1.0), uses_trusted_data=True)
    raise CheckpointError(f"learned aggregator {path}: unknown format {fmt!r} (expected "
                          f"{rnn_io.FORMAT!r}, {lagg_io.FORMAT!r} or {trust_io.FORMAT!r})")


def save_aggregator(path: str | Path, agg: Aggregator, *,
                    trained_on: dict[str, Any] | None = None,
                    validation: dict[str, Any] | None = None) -> Path:
    """Write a learned aggregator (RNN/ARNN, LOpt-A/LAgg-A, or a trust rule's
    RuleAggregator) to `path`; returns the stem."""
    if isinstance(agg, RuleAggregator) and isinstance(agg.rule, TrustRule):
        return trust_io.save_trust(path, agg.rule.config, agg.rule.phi, trained_on=trained_on,
                                   validation=validation)
    if isinstance(agg, RNNAggregator):
        return rnn_io.save_rnn(path, agg, trained_on=trained_on, validation=validation)
    if isinstance(agg, LearnedAdaAggregator):
        return lagg_io.save_lagg(path, agg, trained_on=trained_on, validation=validation)
    raise TypeError(f"not a learned aggregator: {agg!r}")


def zoo_rows() -> list[dict[str, str]]:
    """One row per shipped aggregator: how to name it, its architecture, what it was
    meta-trained on, against which attack, how long, and its validation result (train
    loss at the validation rounds; for the trust rule, test accuracy over its settings)."""
    rows = []
    for name in pretrained_names():
        info = read_aggregator_info(f"pretrained/{name}")
        cfg, trained = info.get("config", {}), info.get("trained_on", {})
        val = info.get("validation", {})
        kind = info.get("kind", "rnn")
        if kind == "trust":  # the learned robust rule, ES over an attack mixture
            arch = f"trust gates, MLP {cfg.get('hidden')}, probe {cfg.get('probe')}"
            if cfg.get("budget") is not None:
                arch += f", budget {cfg['budget']:g}f"
            workers = f"{trained.get('num_workers')} workers"
            steps = f"{val.get('best_step')} ES steps"
            if trained.get("stages"):
                steps += f" in its last ES stage ({len(trained['stages'])} stages: see its JSON)"
        elif kind in ("lagg", "lopt"):  # Joseph et al. 2025, PES
            arch = f"MLP {cfg.get('hidden')}x2, {cfg.get('step_mode')}"
            workers = f"K={trained.get('num_workers')}, H={trained.get('local_steps')}"
            steps = f"{val.get('best_step')} PES steps"
            if trained.get("meta_training_minutes"):  # a chain of runs (see its JSON)
                steps = f"~{trained['meta_training_minutes']} min of PES (see its JSON)"
        else:  # Ji et al. 2019, BPTT
            arch = f"{cfg.get('cell')}, {cfg.get('output')}"
            workers = ("4 models x 3 workers" if trained.get("setting") == "hetero"
                       else f"{trained.get('num_workers')} workers")
            steps = f"{trained.get('iterations')} iterations"
        attack = trained.get("attack", "none")
        if kind == "trust":
            attack = "mixture: " + ", ".join(dict.fromkeys(
                a.split(":")[0] for a in trained.get("settings", "").split(",") if a))
        elif attack != "none":
            attack = f"{attack} {trained.get('num_byzantine')}/{trained.get('num_workers')}"
        loss = ", ".join(f"train loss @{k.split('@')[1]}: {v:.3g}" for k, v in val.items()
                         if k.startswith("mean_loss@"))
        if not loss and "validation_score" in val:  # multi-task: one score over draws
            draws = len(trained.get("validation_task_names", []))
            loss = (f"mean log(train loss / SlowMo's) over {draws} validation draws: "
                    f"{val['validation_score']:.3f}")
        if kind == "trust":
            loss = (f"test acc @{trained.get('rounds')}: worst {val.get('worst_acc', 0):.3f}, "
                    f"mean {val.get('mean_acc', 0):.3f}")
        where = f"{trained.get('dataset')}, {trained.get('model')}, {workers}"
        families = trained.get("tasks")  # meta-trained on tasks drawn from families
        if families:
            where = "task families " + (families if isinstance(families, str)
                                        else ", ".join(families))
        label = "general" if name == f"general-{kind}" else name  # see pretrained_for
        rows.append({"aggregator": f"{kind}:pretrained/{label}", "architecture": arch,
                     "trained on": where,
                     "attack": attack, "meta-training": steps,
                     "validation": loss})
    return rows
