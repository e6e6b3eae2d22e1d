"""A task is a model + loss + data, written as pure functions of a flat parameter vector.

Pure functions of flat parameters are what `torch.func.vmap` / `grad` need to
compute every worker at once, and what aggregators see (flat [M, d] updates).

    task = Task(model, dataset)
    theta = task.init_params(seed=0)               # [d] float32
    task.loss(theta, x, y)                         # scalar, differentiable in theta
    task.evaluate(theta, dataset.x_test, dataset.y_test)   # {"loss": .., "accuracy": ..}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metagg.layout import ParamLayout
from metagg.models import reset_parameters

__all__ = ["Task", "TrustedData"]


class Task:
    """Classification with cross-entropy for any `nn.Module` without buffers that change."""

    def __init__(self, model: nn.Module, *, num_classes: int):
        self.model = model
        self.layout = ParamLayout.from_module(model)
        self.num_classes = num_classes
        # Parameters are supplied per call; keep the module's own copies out of autograd.
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.layout.size

    def logits(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.layout.unflatten(params), (x,))

    def loss(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the model at flat `params` on a batch."""
        return F.cross_entropy(self.logits(params, x), y)

    def init_params(self, seed: int) -> torch.Tensor:
        """PyTorch's default initialisation, seeded, as a flat float32 vector."""
        reset_parameters(self.model, seed)
        return self.layout.from_module_params(self.model)

    @torch.no_grad()
    def evaluate(
        self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 4096
    ) -> dict[str, float]:
        """Mean loss and accuracy over (x, y), in chunks to bound memory."""
        total_loss, correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            logits = self.logits(params, x[start : start + batch_size])
            yb = y[start : start + batch_size]
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
        n = max(len(x), 1)
        return {"loss": total_loss / n, "accuracy": correct / n}


@dataclass
class TrustedData:
    """A small labelled sample held by the server (Zeno, FLTrust and ARNN use it).

    `loss` accepts one parameter vector [d] or a stack [k, d] (evaluated together
    with vmap), so scoring every worker's candidate model is one call.
    """

    task: Task
    x: torch.Tensor
    y: torch.Tensor

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        if params.dim() == 1:
            return self.task.loss(params, self.x, self.y)
        return vmap(self.task.loss, in_dims=(0, None, None))(params, self.x, self.y)

    def grad(self, params: torch.Tensor) -> torch.Tensor:
        return grad(self.task.loss)(params, self.x, self.y)

    def __len__(self) -> int:
        return len(self.y)
