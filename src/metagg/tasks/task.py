"""A task is a model + loss + data, written as pure functions of a flat parameter vector.

Pure functions of flat parameters are what `torch.func.vmap` / `grad` need to
compute every worker at once, and what aggregators see (flat [M, d] updates).

    task = Task(model, dataset)
    theta = task.init_params(seed=0)               # [d] float32
    task.loss(theta, x, y)                         # scalar, differentiable in theta
    task.evaluate(theta, dataset.x_test, dataset.y_test)   # {"loss": .., "accuracy": ..}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metagg.layout import ParamLayout
from metagg.models import MLP, reset_parameters

__all__ = ["Task", "TrustedData", "mlp_grad_fn"]


class Task:
    """Classification with cross-entropy for any `nn.Module` without buffers that change.

    A language model is the same thing one position at a time: logits ``[B, T, V]``
    against next-token targets ``[B, T]``; loss and accuracy are per token.
    """

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
        """Mean cross-entropy of the model at flat `params` on a batch (per token for an LM)."""
        logits = self.logits(params, x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def init_params(self, seed: int) -> torch.Tensor:
        """PyTorch's default initialisation, seeded, as a flat float32 vector."""
        reset_parameters(self.model, seed)
        return self.layout.from_module_params(self.model)

    @torch.no_grad()
    def evaluate(
        self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 4096
    ) -> dict[str, float]:
        """Mean loss and accuracy over (x, y) (per token for an LM), in chunks to bound memory."""
        total_loss, correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            logits = self.logits(params, x[start : start + batch_size])
            logits = logits.reshape(-1, logits.shape[-1])
            yb = y[start : start + batch_size].reshape(-1)
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
        n = max(y.numel(), 1)
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


def mlp_grad_fn(task: Task) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                       tuple[torch.Tensor, torch.Tensor]] | None:
    """A hand-written batched forward/backward for a metagg `MLP` task, or None for other
    models: `fn(params [N, d], x [N, B, ...], y [N, B]) -> (grads [N, d], losses [N])`,
    equal (to float rounding) to `vmap(grad_and_value(task.loss))`.

    Why: the workers' local SGD is most of a PES step, and on a CPU thread vmapped
    autograd spends ~2× the matmul time on its own bookkeeping; this is three `bmm`s
    per layer and nothing else.
    """
    model = task.model
    if not isinstance(model, MLP):
        return None
    names = [f"hidden{i}" for i in range(model.num_hidden)] + ["output"]
    expected = tuple(f"{n}.{w}" for n in names for w in ("weight", "bias"))
    if task.layout.names != expected:
        return None
    act = type(model.act).__name__

    def backprop_activation(dh: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if act == "ReLU":
            return dh.masked_fill_(z <= 0, 0.0)
        if act == "Sigmoid":
            return dh.mul_(h * (1.0 - h))
        return dh.mul_(1.0 - h * h)  # Tanh

    def fn(params: torch.Tensor, x: torch.Tensor,
           y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = task.layout.unflatten(params)
        n, b = y.shape
        h = x.reshape(n, b, -1)
        hs, zs = [h], []
        for i, name in enumerate(names):
            z = torch.baddbmm(p[f"{name}.bias"][:, None, :], h,
                              p[f"{name}.weight"].transpose(1, 2))
            zs.append(z)
            if i < len(names) - 1:
                h = model.act(z)
                hs.append(h)
        logp = torch.log_softmax(zs[-1], dim=-1)
        losses = -logp.gather(-1, y[..., None]).squeeze(-1).mean(1)
        dz = logp.exp().scatter_add(-1, y[..., None], -torch.ones_like(y[..., None],
                                                                       dtype=logp.dtype)) / b
        grads: dict[str, torch.Tensor] = {}
        for i in range(len(names) - 1, -1, -1):
            grads[f"{names[i]}.weight"] = torch.bmm(dz.transpose(1, 2), hs[i])
            grads[f"{names[i]}.bias"] = dz.sum(1)
            if i > 0:
                dz = backprop_activation(torch.bmm(dz, p[f"{names[i]}.weight"]), zs[i - 1],
                                         hs[i])
        return task.layout.flatten(grads), losses

    return fn
