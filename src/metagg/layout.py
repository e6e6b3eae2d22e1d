"""ParamLayout: a model's named parameters <-> one flat float32 vector.

Workers send flat vectors and the server aggregates an [M, d] matrix; the
layout remembers which slice of the flat vector is which tensor, so per-tensor
code (LAgg-A features, heterogeneous workers) can get views back.

    layout = ParamLayout.from_module(model)
    flat = layout.flatten(dict(model.named_parameters()))   # [d]
    params = layout.unflatten(flat)                         # {name: view}
    layout.unflatten(stacked)                               # [M, d] -> {name: [M, *shape]}
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ParamLayout", "TensorSpec"]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's place in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


class ParamLayout:
    """Names, shapes and offsets of a parameter dict laid out in one flat vector."""

    def __init__(self, specs: list[TensorSpec] | tuple[TensorSpec, ...]):
        self.specs: tuple[TensorSpec, ...] = tuple(specs)
        offset = 0
        for spec in self.specs:
            if spec.offset != offset:
                raise ValueError(
                    f"tensor {spec.name!r} starts at offset {spec.offset}, expected {offset} "
                    "(specs must be contiguous and in order)"
                )
            offset += spec.numel
        self.size = offset
        self._by_name = {s.name: s for s in self.specs}
        if len(self._by_name) != len(self.specs):
            raise ValueError("duplicate tensor names in layout")

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...] | torch.Size]) -> ParamLayout:
        """Layout for named shapes, in the mapping's order."""
        specs, offset = [], 0
        for name, shape in shapes.items():
            spec = TensorSpec(name, tuple(int(s) for s in shape), offset)
            specs.append(spec)
            offset += spec.numel
        return cls(specs)

    @classmethod
    def from_params(cls, params: Mapping[str, torch.Tensor]) -> ParamLayout:
        return cls.from_shapes({k: tuple(v.shape) for k, v in params.items()})

    @classmethod
    def from_module(cls, module: nn.Module) -> ParamLayout:
        """Layout of a module's trainable parameters, in `named_parameters()` order."""
        return cls.from_params({k: p for k, p in module.named_parameters() if p.requires_grad})

    # -- conversion -----------------------------------------------------------
    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate a parameter dict into a flat [..., d] vector (leading batch dims kept)."""
        missing = [s.name for s in self.specs if s.name not in params]
        if missing:
            raise KeyError(f"parameters missing from dict: {missing}")
        parts = []
        batch_shape = None
        for spec in self.specs:
            t = params[spec.name]
            lead = tuple(t.shape[: t.dim() - len(spec.shape)])
            if tuple(t.shape[len(lead):]) != spec.shape:
                raise ValueError(
                    f"tensor {spec.name!r} has shape {tuple(t.shape)}, layout expects "
                    f"(..., {', '.join(map(str, spec.shape))})"
                )
            if batch_shape is None:
                batch_shape = lead
            elif lead != batch_shape:
                raise ValueError(f"inconsistent batch shapes {batch_shape} and {lead}")
            parts.append(t.reshape(*lead, spec.numel))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat [..., d] vector as {name: [..., *shape]} (no copy)."""
        if flat.shape[-1] != self.size:
            raise ValueError(f"flat vector has {flat.shape[-1]} entries, layout has {self.size}")
        lead = flat.shape[:-1]
        return {s.name: flat[..., s.slice].view((*lead, *s.shape)) for s in self.specs}

    def from_module_params(self, module: nn.Module) -> torch.Tensor:
        """The module's current parameters as one flat float32 vector (a copy)."""
        params = dict(module.named_parameters())
        return self.flatten({k: params[k].detach() for k in self.names}).float()

    # -- inspection -----------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def __getitem__(self, name: str) -> TensorSpec:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamLayout) and self.specs == other.specs

    def __hash__(self) -> int:
        return hash(self.specs)

    def __repr__(self) -> str:
        return f"ParamLayout(d={self.size}, tensors={[(s.name, s.shape) for s in self.specs]})"

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "shape": list(s.shape)} for s in self.specs]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> ParamLayout:
        return cls.from_shapes({d["name"]: tuple(d["shape"]) for d in data})
