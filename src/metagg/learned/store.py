"""Where learned aggregators live on disk: the shipped zoo, path resolution, and the
checked file pair every learned aggregator is saved as (safetensors + JSON, never pickle).

    resolve_path("runs/rnn-digits")                # DIR -> DIR/aggregator (the file stem)
    resolve_path("pretrained/digits-mlp20-lstm")   # the copy shipped in the package
    tensors, meta, where = load_learned_files(path, fmt=..., version=..., what=...)

A saved aggregator is `aggregator.safetensors` (φ, float32) beside `aggregator.json`
({"format", "format_version", "kind", "config", "feature_names", "trained_on",
"validation", "metagg_version", "sha256"}). Both files are written atomically by
`metagg.checkpoint`; the JSON records the tensor file's sha256, so a corrupt or swapped
file is caught on load, and each kind's loader (`metagg.learned.rnn.io`,
`metagg.learned.lagg.io`) checks every tensor's name and shape against the config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from metagg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "PRETRAINED_PREFIX",
    "STEM",
    "ZOO_DIR",
    "builder_options",
    "load_learned_files",
    "pretrained_for",
    "pretrained_names",
    "read_aggregator_info",
    "resolve_path",
    "save_learned_files",
    "weights_sha256",
]

STEM = "aggregator"
ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"
PRETRAINED_PREFIX = "pretrained/"
LEARNED_KINDS = ("rnn", "arnn", "lagg", "lopt", "trust")  # aggregators named KIND:PATH


def pretrained_names() -> list[str]:
    """Names of the aggregators shipped in the package (`rnn:pretrained/NAME`)."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / f"{STEM}.json").exists())


def pretrained_for(kind: str, arg: str) -> str:
    """The path a `KIND:ARG` aggregator loads: `pretrained/general` names each kind's
    general-purpose weights, shipped as `pretrained/general-KIND` (one name for every
    kind, one folder each); any other ARG is itself."""
    return f"{PRETRAINED_PREFIX}general-{kind}" if arg == f"{PRETRAINED_PREFIX}general" else arg


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


def save_learned_files(path: str | Path, tensors: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> Path:
    """Write `tensors` (float32) and `meta` as DIR/aggregator.safetensors + .json (or the
    stem a `path` ending in .safetensors / .json names); returns the stem written."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path / STEM
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(stem, {k: v.detach().float().contiguous() for k, v in tensors.items()}, meta)
    return stem


def read_aggregator_info(path: str | Path) -> dict[str, Any]:
    """The JSON description of any saved learned aggregator (checked against its weights'
    hash; the weights are not built)."""
    stem = resolve_path(path)
    if not stem.with_suffix(".json").exists():
        raise CheckpointError(f"learned aggregator {path}: no {stem.with_suffix('.json')}")
    try:
        return load_checkpoint(stem)[1]
    except CheckpointError as exc:
        raise CheckpointError(f"learned aggregator {path}: {exc}") from None


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


def builder_options(kind: str, arg: str | None, options: dict[str, Any]) -> tuple[bool, dict]:
    """(init, the other options) of a learned aggregator's registry builder: `kind:PATH`
    loads saved weights and takes no options; `kind` with {init: true, ...} builds an
    untrained one from the rest."""
    options = dict(options)
    init = bool(options.pop("init", False))
    if arg and (init or options):
        raise ValueError(f"aggregator {kind!r}: a saved one ({kind}:{arg}) takes no options, "
                         f"got {sorted(['init', *options] if init else options)}")
    return init, options


def weights_sha256(aggregator: str) -> str | None:
    """The sha256 recorded with the weights of a saved learned aggregator named
    "KIND:PATH" (None for any other name, or where the files cannot be read), so that a
    resumed run can tell that the weights behind the same name have changed."""
    kind, _, arg = aggregator.partition(":")
    if kind not in LEARNED_KINDS or not arg:
        return None
    arg = pretrained_for(kind, arg)
    try:
        meta = json.loads(resolve_path(arg).with_suffix(".json").read_text())
    except (OSError, ValueError, CheckpointError):
        return None
    return meta.get("sha256") if isinstance(meta, dict) else None
