"""Saving and loading LOpt-A / LAgg-A (safetensors + JSON, never pickle).

    save_lagg("runs/lagg", agg, trained_on={...}, validation={...})
    agg = load_lagg("runs/lagg")                  # or "pretrained/NAME", or the file stem

Format {"format": "metagg.lagg_aggregator", "format_version": 1, "kind", "config",
"feature_names", "trained_on", "validation", "metagg_version", "sha256"} beside the
weights (`AdaMLP`'s state dict, float32); files are checked as `metagg.learned.store`
describes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from metagg.checkpoint import CheckpointError
from metagg.learned.lagg.aggregator import LAggA, LearnedAdaAggregator, LOptA, learned_ada
from metagg.learned.lagg.model import AdaMLP, LAggConfig
from metagg.learned.store import (
    builder_options,
    load_learned_files,
    pretrained_for,
    save_learned_files,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "build_lagg", "build_lopt", "load_lagg", "save_lagg"]

FORMAT = "metagg.lagg_aggregator"
FORMAT_VERSION = 1


def save_lagg(path: str | Path, agg: LearnedAdaAggregator, *,
              trained_on: dict[str, Any] | None = None,
              validation: dict[str, Any] | None = None) -> Path:
    """Write φ and its description to `path`/aggregator.safetensors + .json (or the stem
    `path` names with a .safetensors / .json suffix); returns the stem. Format
    {"format": "metagg.lagg_aggregator", "format_version": 1, "kind", "config",
    "feature_names", "trained_on", "validation", "metagg_version", "sha256"}."""
    if agg.net is None:
        raise ValueError("lagg: nothing to save before init() fixed num_workers")
    path = Path(path)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": agg.config.kind,
        "config": agg.config.to_dict(), "feature_names": list(agg.config.feature_names()),
        "trained_on": trained_on or {}, "validation": validation or {},
    }
    return save_learned_files(path, dict(agg.net.state_dict()), meta)


def load_lagg(path: str | Path) -> LearnedAdaAggregator:
    """Load a saved LOpt-A / LAgg-A; raises CheckpointError with the reason."""
    tensors, meta, where = load_learned_files(path, fmt=FORMAT, version=FORMAT_VERSION,
                                              what="LOpt-A/LAgg-A")
    raw = meta.get("config")
    allowed = [f.name for f in dataclasses.fields(LAggConfig)]
    if not isinstance(raw, dict) or set(raw) - set(allowed):
        raise CheckpointError(f"{where}: 'config' must be a mapping with keys from {allowed}")
    try:
        config = LAggConfig(**raw)
        net = AdaMLP(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad config ({exc})") from None
    expected = net.state_dict()
    problems = [f"missing tensor {k}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in expected]
    problems += [f"tensor {k} has shape {tuple(tensors[k].shape)}, the config needs "
                 f"{tuple(v.shape)}" for k, v in expected.items()
                 if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{where}: weights do not match aggregator.json "
                              f"({'; '.join(problems)})")
    net.load_state_dict(tensors)
    return learned_ada(config, net)


def _build(kind: str, arg: str | None, options: dict[str, Any]) -> LearnedAdaAggregator:
    init, options = builder_options(kind, arg, options)
    if arg:
        agg = load_lagg(pretrained_for(kind, arg))
        if agg.config.kind != kind:
            raise ValueError(f"{arg} holds a {agg.config.kind!r} aggregator, not {kind!r}; "
                             f"use '{agg.config.kind}:{arg}'")
        return agg
    if not init:
        raise ValueError(f"aggregator {kind!r} needs meta-trained weights: give '{kind}:PATH' "
                         f"(a directory with aggregator.safetensors + aggregator.json), or "
                         f"options {{init: true}} for an untrained, reference-initialised one")
    seed = int(options.pop("init_seed", 0))
    config = LAggConfig(kind=kind, **options)
    return (LOptA if kind == "lopt" else LAggA)(config=config, seed=seed)


def build_lopt(arg: str | None, options: dict) -> LOptA:
    """Registry builder: `lopt:PATH`, or `lopt` with options {init: true, init_seed,
    step_mode, ...}: LOpt-A (the MLP produces the step; no server optimizer)."""
    return _build("lopt", arg, options)


def build_lagg(arg: str | None, options: dict) -> LAggA:
    """Registry builder: `lagg:PATH`, or `lagg` with options {init: true, num_workers
    (default: the run's), init_seed, step_mode, ...}: LAgg-A."""
    return _build("lagg", arg, options)
