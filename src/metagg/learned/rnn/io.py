"""Saving and loading RNN / ARNN aggregators (Ji et al. 2019).

    save_rnn("runs/rnn-digits", agg, trained_on={...}, validation={...})
    agg = load_rnn("runs/rnn-digits")            # a directory, a file stem or pretrained/NAME

Format {"format": "metagg.rnn_aggregator", "format_version": 1, "kind": "rnn" | "arnn",
"config": {num_workers, cell, hidden, layers, output, arnn, p, scale, clamp_sign,
probe_lr, loss_scale}, "feature_names", "trained_on", "validation"} beside the weights
(`CoordinateRNN`'s state dict); files are checked as `metagg.learned.store` describes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from metagg.checkpoint import CheckpointError
from metagg.learned.rnn.aggregator import DEFAULT_CHUNK, RNNAggregator
from metagg.learned.rnn.cells import CoordinateRNN, RNNConfig
from metagg.learned.store import load_learned_files, pretrained_for, save_learned_files

__all__ = ["FORMAT", "FORMAT_VERSION", "build_arnn", "build_rnn", "load_rnn", "save_rnn"]

FORMAT = "metagg.rnn_aggregator"
FORMAT_VERSION = 1


def save_rnn(
    path: str | Path,
    agg: RNNAggregator,
    *,
    trained_on: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
) -> Path:
    """Write `agg`'s φ and description into the directory `path` (created if needed)
    as aggregator.safetensors + aggregator.json; a `path` ending in .safetensors or
    .json names the files instead. Returns the file stem written."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": agg.config.kind,
        "config": agg.config.to_dict(),
        "feature_names": agg.config.feature_names(),
        "trained_on": trained_on or {},
        "validation": validation or {},
    }
    return save_learned_files(path, dict(agg.net.state_dict()), meta)


def load_rnn(path: str | Path, *, chunk_size: int = DEFAULT_CHUNK) -> RNNAggregator:
    """Load a saved RNN / ARNN aggregator.

    Raises:
        CheckpointError: a missing, corrupt or mismatched file, with the reason.
    """
    tensors, _, config, where = _load(path)
    net = CoordinateRNN(config)
    expected = net.state_dict()
    problems = [f"missing tensor {k}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in expected]
    problems += [
        f"tensor {k} has shape {tuple(tensors[k].shape)} {tensors[k].dtype}, the config needs "
        f"{tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in tensors and (tensors[k].shape != v.shape or tensors[k].dtype != v.dtype)
    ]
    if problems:
        raise CheckpointError(f"{where}: weights do not match aggregator.json "
                              f"({'; '.join(problems)})")
    net.load_state_dict(tensors)
    return RNNAggregator(config, net, chunk_size=chunk_size)


def _load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], RNNConfig, str]:
    """(tensors, meta, config, description) of a checked aggregator file pair."""
    tensors, meta, where = load_learned_files(path, fmt=FORMAT, version=FORMAT_VERSION,
                                              what="metagg RNN aggregator")
    raw = meta.get("config")
    allowed = [f.name for f in dataclasses.fields(RNNConfig)]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: 'config' must be a mapping with keys {allowed}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise CheckpointError(f"{where}: unknown config keys {unknown}; allowed: {allowed}")
    try:
        config = RNNConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad config ({exc})") from None
    if meta.get("kind") != config.kind:
        raise CheckpointError(f"{where}: kind {meta.get('kind')!r} contradicts config "
                              f"(arnn={config.arnn} means {config.kind!r})")
    return tensors, meta, config, where


def _build(kind: str, arg: str | None, options: dict) -> RNNAggregator:
    if not arg:
        raise ValueError(
            f"aggregator {kind!r} needs trained weights: give '{kind}:PATH' (a directory with "
            f"aggregator.safetensors + aggregator.json, or their file stem) or meta-train one "
            f"(`metagg meta-train rnn ...`, or metagg.learned.meta_train_rnn in Python)")
    agg = load_rnn(pretrained_for(kind, arg), **options)
    if agg.config.kind != kind:
        raise ValueError(f"{arg} holds an {agg.config.kind!r} aggregator, not {kind!r}; "
                         f"use '{agg.config.kind}:{arg}'")
    return agg


def build_rnn(arg: str | None, options: dict) -> RNNAggregator:
    """Registry builder of `rnn:PATH`: a trained RNN aggregator; `options` may set
    chunk_size. It produces the step itself (no server optimizer)."""
    return _build("rnn", arg, options)


def build_arnn(arg: str | None, options: dict) -> RNNAggregator:
    """Registry builder of `arnn:PATH`: a trained ARNN aggregator (needs the server's
    trusted data)."""
    return _build("arnn", arg, options)
