"""Checkpoints and weights: safetensors + a JSON sidecar, written atomically.

Never pickle: a checkpoint is `NAME.safetensors` (tensors only) beside
`NAME.json` (config, metagg version, layout, round...). Each file is written to a
temporary name and renamed into place, and the JSON records the tensor file's
sha256, so a half-written or mismatched pair is detected on load instead of
silently resuming from garbage.

Aggregator states are pytrees (NamedTuple / tuple / list / dict of tensors);
`flatten_state` / `unflatten_state` turn them into flat {key: tensor} dicts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from metagg import __version__

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "flatten_state",
    "json_safe",
    "json_text",
    "load_checkpoint",
    "save_checkpoint",
    "unflatten_state",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`.

    The file gets the same mode as any other file the process creates (0666 less the
    umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def json_safe(x: Any) -> Any:
    """`x` with every non-finite float replaced by None: bare NaN/Infinity is not JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def json_text(x: Any, indent: int | None = None) -> str:
    """Strict JSON for files others read (jq, browsers): non-finite floats become null."""
    return json.dumps(json_safe(x), indent=indent, allow_nan=False)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def flatten_state(state: Any, prefix: str = "state") -> dict[str, torch.Tensor]:
    """{dotted path: tensor} for every tensor leaf of a NamedTuple/tuple/list/dict tree."""
    out: dict[str, torch.Tensor] = {}

    def visit(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            out[path] = node.detach().contiguous()
        elif _is_namedtuple(node):
            for name, child in zip(node._fields, node, strict=True):
                visit(child, f"{path}.{name}")
        elif isinstance(node, tuple | list):
            for i, child in enumerate(node):
                visit(child, f"{path}.{i}")
        elif isinstance(node, dict):
            for key, child in node.items():
                visit(child, f"{path}.{key}")
        elif node is not None:
            raise TypeError(f"state leaf at {path} is {type(node).__name__}, not a tensor")

    visit(state, prefix)
    return out


def unflatten_state(template: Any, tensors: dict[str, torch.Tensor], prefix: str = "state") -> Any:
    """Rebuild a state shaped like `template` from `flatten_state` output; checks shapes."""

    def build(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            if path not in tensors:
                raise CheckpointError(f"checkpoint lacks state tensor {path}")
            t = tensors[path]
            if t.shape != node.shape or t.dtype != node.dtype:
                raise CheckpointError(
                    f"state tensor {path}: checkpoint has {tuple(t.shape)} {t.dtype}, "
                    f"run expects {tuple(node.shape)} {node.dtype}"
                )
            return t.to(node.device)
        if _is_namedtuple(node):
            return type(node)(*(build(c, f"{path}.{n}") for n, c in zip(node._fields, node,
                                                                        strict=True)))
        if isinstance(node, tuple | list):
            return type(node)(build(c, f"{path}.{i}") for i, c in enumerate(node))
        if isinstance(node, dict):
            return {k: build(c, f"{path}.{k}") for k, c in node.items()}
        return node

    return build(template, prefix)


def save_checkpoint(
    path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Write `path`.safetensors and `path`.json atomically (tensors first, then JSON).

    The tensor file also carries the metadata and a hash of its tensor data: a
    process killed between the two renames leaves a new tensor file beside the old
    JSON, and `load_checkpoint` then reads the new checkpoint from the tensor file
    alone instead of refusing the pair.
    """
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    sidecar = dict(meta)
    sidecar["metagg_version"] = __version__
    meta_json = json.dumps(sidecar)
    # the hash covers the embedded metadata, the tensor index and the tensor bytes
    content = hashlib.sha256(save(tensors, metadata={"metagg_meta": meta_json})).hexdigest()
    blob = save(tensors, metadata={"metagg_meta": meta_json, "content_sha256": content})
    atomic_write_bytes(path.with_suffix(".safetensors"), blob)
    sidecar["sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2))


def _self_checked(blob: bytes, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The metadata a tensor file carries, if its own content hash proves it intact."""
    from safetensors.torch import save

    embedded = _header_metadata(blob)
    try:
        meta_json, content = embedded["metagg_meta"], embedded["content_sha256"]
        again = hashlib.sha256(save(tensors, metadata={"metagg_meta": meta_json})).hexdigest()
        meta = json.loads(meta_json) if again == content else None
    except (ValueError, KeyError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint pair; raise CheckpointError with the reason if unusable."""
    from safetensors.torch import load

    path = Path(path)
    tfile, jfile = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for f in (tfile, jfile):
        if not f.exists():
            raise CheckpointError(f"checkpoint file missing: {f}")
    try:
        meta = json.loads(jfile.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{jfile}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{jfile}: expected a JSON object")
    blob = tfile.read_bytes()  # hashed and parsed from the same bytes
    digest = hashlib.sha256(blob).hexdigest()
    if "sha256" in meta and meta["sha256"] != digest:
        # The writer may have died between the two renames (see save_checkpoint): an
        # intact newer tensor file beside the old JSON carries its own metadata.
        try:
            tensors = load(blob)
            embedded = _self_checked(blob, tensors)
        except (SafetensorError, ValueError):
            embedded = None
        if embedded is None:
            raise CheckpointError(
                f"{tfile} does not match its sidecar (sha256 {digest[:12]}… vs "
                f"{meta['sha256'][:12]}…): the checkpoint is corrupt or from another run")
        return tensors, {**embedded, "sha256": digest}
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{tfile}: cannot read safetensors ({exc})") from None
    embedded = _embedded_meta(blob)
    sidecar = {k: v for k, v in meta.items() if k != "sha256"}
    if embedded is not None and _canonical(embedded) != _canonical(sidecar):
        # the sha256 covers the tensor file only; its own copy of the metadata catches
        # an edited sidecar (e.g. "round": 40 -> 30 would resume round-40 weights as 30)
        changed = sorted(k for k in embedded.keys() | sidecar.keys()
                         if _canonical(embedded.get(k)) != _canonical(sidecar.get(k)))
        raise CheckpointError(
            f"{jfile} was modified after it was written (keys differ from the copy inside "
            f"{tfile.name}: {', '.join(changed[:8])}); restore it or start the run again")
    return tensors, meta


def _header_metadata(blob: bytes) -> dict[str, Any]:
    """The string metadata in a safetensors header ({} when absent or unreadable)."""
    try:
        header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
        embedded = header.get("__metadata__") or {}
    except (ValueError, AttributeError):
        return {}
    return embedded if isinstance(embedded, dict) else {}


def _embedded_meta(blob: bytes) -> dict[str, Any] | None:
    """The metadata copy in an intact tensor file's header (None for older files)."""
    try:
        meta = json.loads(_header_metadata(blob)["metagg_meta"])
    except (ValueError, KeyError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def _canonical(x: Any) -> str:
    return json.dumps(x, sort_keys=True)


# Re-exported for callers that only need plain safetensors files (aggregator weights).
save_tensors = save_file
