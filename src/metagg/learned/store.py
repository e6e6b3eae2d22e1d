"""Saving and loading learned RNN / ARNN aggregators (safetensors + JSON, never pickle).

    save_aggregator("runs/rnn-digits", agg, trained_on={...}, validation={...})
    agg = load_aggregator("runs/rnn-digits")           # a directory ...
    agg = load_aggregator("runs/rnn-digits/aggregator")  # ... or the file stem

A saved aggregator is `aggregator.safetensors` (φ, float32) beside
`aggregator.json`:

    {"format": "metagg.rnn_aggregator", "format_version": 1, "kind": "rnn",
     "config": {num_workers, cell, hidden, layers, output, arnn, p, scale, clamp_sign,
                probe_lr, loss_scale},
     "trained_on": {...}, "validation": {...}, "metagg_version": ..., "sha256": ...}

Both files are written atomically by `metagg.checkpoint`; the JSON records the
tensor file's sha256, so a corrupt or swapped file is caught on load, and every
tensor's name and shape is checked against the architecture the JSON describes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from metagg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metagg.learned.rnn import DEFAULT_CHUNK, CoordinateRNN, RNNAggregator, RNNConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "build_arnn",
    "build_rnn",
    "load_aggregator",
    "pretrained_names",
    "read_aggregator_info",
    "resolve_path",
    "save_aggregator",
]

FORMAT = "metagg.rnn_aggregator"
FORMAT_VERSION = 1
STEM = "aggregator"


ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"
PRETRAINED_PREFIX = "pretrained/"


def pretrained_names() -> list[str]:
    """Names of the aggregators shipped in the package (`rnn:pretrained/NAME`)."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / f"{STEM}.json").exists())


def resolve_path(path: str | Path) -> Path:
    """The file stem for `path`: DIR → DIR/aggregator; X.safetensors / X.json → X;
    pretrained/NAME → the copy shipped in the package."""
    text = str(path)
    if text.startswith(PRETRAINED_PREFIX):
        name = text[len(PRETRAINED_PREFIX):]
        if name not in pretrained_names():
            raise CheckpointError(f"no pretrained aggregator {name!r}; shipped: "
                                  f"{', '.join(pretrained_names()) or 'none'}")
        return ZOO_DIR / name / STEM
    path = Path(path)
    if path.is_dir():
        return path / STEM
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix("")
    return path


def save_aggregator(
    path: str | Path,
    agg: RNNAggregator,
    *,
    trained_on: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
) -> Path:
    """Write `agg`'s φ and description into the directory `path` (created if needed)
    as aggregator.safetensors + aggregator.json; a `path` ending in .safetensors or
    .json names the files instead. Returns the file stem written."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path / STEM
    tensors = {k: v.detach().float().contiguous() for k, v in agg.net.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": agg.config.kind,
        "config": agg.config.to_dict(),
        "feature_names": agg.config.feature_names(),
        "trained_on": trained_on or {},
        "validation": validation or {},
    }
    save_checkpoint(stem, tensors, meta)
    return stem


def read_aggregator_info(path: str | Path) -> dict[str, Any]:
    """The JSON description of a saved aggregator (checked, weights not loaded)."""
    return _load(path)[1]


def load_aggregator(path: str | Path, *, chunk_size: int = DEFAULT_CHUNK) -> RNNAggregator:
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


def load_learned_files(
    path: str | Path, *, fmt: str, version: int, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(tensors, meta, description) of a learned-aggregator file pair, checked to be
    readable, uncorrupted and of format `fmt` / `version`; `what` names the kind in
    errors. Shared by every learned aggregator's loader."""
    stem = resolve_path(path)
    where = f"learned aggregator {path}"
    json_file = stem.with_suffix(".json")
    if not json_file.exists():
        raise CheckpointError(f"{where}: no {json_file} (expected a directory holding "
                              f"aggregator.safetensors + aggregator.json, or their stem)")
    try:
        tensors, meta = load_checkpoint(stem)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    got = meta.get("format") if isinstance(meta, dict) else None
    if got != fmt:
        raise CheckpointError(f"{where}: {json_file} is not a {what} file "
                              f"(format {got!r}, expected {fmt!r})")
    if meta.get("format_version") != version:
        raise CheckpointError(f"{where}: format_version {meta.get('format_version')!r} "
                              f"is not supported (this metagg reads {version})")
    return tensors, meta, where


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
    agg = load_aggregator(arg, **options)
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
