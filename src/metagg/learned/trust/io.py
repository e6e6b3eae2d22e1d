"""Saving and loading the learned trust-weighted rule (`metagg.learned.trust.model`).

    save_trust("runs/trust", config, phi, trained_on={...}, validation={...})
    rule = load_trust("pretrained/robust")          # a TrustRule

Format {"format": "metagg.trust_aggregator", "format_version": 1, "kind": "trust",
"config": {hidden, probe}, "feature_names", "trained_on", "validation"} beside the
weights (φ's named parts, `TrustConfig.layout`); files are checked as
`metagg.learned.store` describes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from metagg.checkpoint import CheckpointError
from metagg.learned.store import builder_options, load_learned_files, save_learned_files
from metagg.learned.trust.model import FEATURE_NAMES, TrustConfig, TrustRule, initial_phi

__all__ = ["FORMAT", "FORMAT_VERSION", "build_trust_rule", "load_trust", "save_trust"]

FORMAT = "metagg.trust_aggregator"
FORMAT_VERSION = 1


def save_trust(path: str | Path, config: TrustConfig, phi: torch.Tensor, *,
               trained_on: dict[str, Any] | None = None,
               validation: dict[str, Any] | None = None) -> Path:
    """Write φ and its description into the directory `path` (or the file stem a path
    ending in .safetensors / .json names); returns the stem written."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "trust",
            "config": config.to_dict(), "feature_names": list(FEATURE_NAMES),
            "trained_on": trained_on or {}, "validation": validation or {}}
    parts = {k: v.clone() for k, v in config.layout.unflatten(phi.detach().float()).items()}
    return save_learned_files(path, parts, meta)


def load_trust(path: str | Path, f: int = 0) -> TrustRule:
    """Load a saved trust rule that assumes `f` Byzantine workers.

    Raises:
        CheckpointError: a missing, corrupt or mismatched file, with the reason.
    """
    tensors, meta, where = load_learned_files(path, fmt=FORMAT, version=FORMAT_VERSION,
                                              what="metagg trust aggregator")
    raw = meta.get("config")
    allowed = [f.name for f in dataclasses.fields(TrustConfig)]
    if not isinstance(raw, dict) or set(raw) - set(allowed):
        raise CheckpointError(f"{where}: 'config' must be a mapping with keys {allowed}, "
                              f"got {raw!r}")
    try:
        config = TrustConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad config ({exc})") from None
    layout = config.layout
    problems = [f"missing tensor {s.name}" for s in layout if s.name not in tensors]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in layout]
    problems += [f"tensor {s.name} has shape {tuple(tensors[s.name].shape)}, the config "
                 f"needs {s.shape}" for s in layout
                 if s.name in tensors and tuple(tensors[s.name].shape) != s.shape]
    if problems:
        raise CheckpointError(f"{where}: weights do not match aggregator.json "
                              f"({'; '.join(problems)})")
    phi = layout.flatten({k: v.float() for k, v in tensors.items()})
    if not bool(torch.isfinite(phi).all()):
        raise CheckpointError(f"{where}: the weights hold NaN or Inf")
    return TrustRule(config, phi, f)


def build_trust_rule(arg: str | None, options: dict[str, Any], f: int = 0) -> TrustRule:
    """Registry builder of `trust:PATH` (a saved rule; no options), or `trust` with
    options {init: true, init_seed, hidden, probe, budget, reference_share,
    reference_workers, peer_weight}: the untrained soft-Zeno start;
    `f` Byzantine workers assumed."""
    init, options = builder_options("trust", arg, options)
    if arg:
        return load_trust(arg, f)
    if not init:
        raise ValueError("aggregator 'trust' needs meta-trained weights: give 'trust:PATH' "
                         "(e.g. trust:pretrained/robust), or options {init: true} for the "
                         "untrained soft-Zeno start")
    seed = int(options.pop("init_seed", 0))
    try:
        config = TrustConfig(**options)
    except TypeError as exc:
        raise ValueError(f"aggregator 'trust': bad options {options} ({exc})") from None
    return TrustRule(config, initial_phi(config, seed), f)
