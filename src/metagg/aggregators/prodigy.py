"""Prodigy (Mishchenko & Defazio, ICML 2024): Adam's direction with a step size D that
the rule estimates itself — the distance ‖x_0 − x*‖, from the gradients and the distance
travelled — so it needs no learning rate. Three users:

- the server optimizer `optimizers.prodigy` (mean aggregation + Prodigy: step = lr·D·u);
- the RNN aggregator's `output="prodigy"` rule, step_i = D·(u_i + scale·o_i): a learned
  correction o on this base, whose size then follows the task (a learned step fixed in
  parameter units, `output="normalized"`, cannot transfer between tasks that want steps
  10× apart). With a zero RNN head it *is* mean aggregation + Prodigy;
- general LAgg-A / LOpt-A with `residual_base="prodigy"`: the same on the local-SGD mean
  update, the learned correction in units of D (zero output layer: local SGD + Prodigy).

With the direction ḡ (the mean worker gradient) and no bias correction, β = 0.9, 0.999:

    u = m / (√v + D·ε),  m ← β₁ m + (1−β₁)·D·ḡ,  v ← β₂ v + (1−β₂)·D²·ḡ²,
    r ← √β₂ r + (D/D₀)·D·⟨ḡ, x_0 − x⟩,   s ← √β₂ s + (D/D₀)·D·ḡ,
    D ← max(D, coef · r / ‖s‖₁)            (coef: Prodigy's d_coef; D₀ = 1e-6).

Meta-training differentiates through D's dependence on θ (`prodigy_update` keeps the
graph of `params`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DEFAULT_COEF", "ProdigyState", "init_prodigy", "prodigy_update"]

BETA1, BETA2, EPS, D0 = 0.9, 0.999, 1e-8, 1e-6
# d_coef, chosen on the RNN meta-training's validation draws (image-mlp + synthetic, 2
# seeds, 100 / 400 rounds): 0.25 / 0.5 / 1 scored −2.918 / −2.990 / −2.718 (lower: better)
DEFAULT_COEF = 0.5


class ProdigyState(NamedTuple):
    """Per run: Prodigy's vectors [d] and scalars (0-d tensors, so checkpoints hold them)."""

    x0: torch.Tensor  # θ at the first step
    s: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    r: torch.Tensor  # float64: a running sum of products that can be large
    d: torch.Tensor  # the distance estimate D (float64)
    count: torch.Tensor  # int64: steps taken


def init_prodigy(dim: int) -> ProdigyState:
    """The state before the first step (x0 is set then)."""
    zeros = torch.zeros(dim)
    return ProdigyState(zeros, zeros.clone(), zeros.clone(), zeros.clone(),
                        torch.zeros((), dtype=torch.float64),
                        torch.full((), D0, dtype=torch.float64),
                        torch.zeros((), dtype=torch.int64))


def prodigy_update(state: ProdigyState, grad: torch.Tensor, params: torch.Tensor,
                   coef: float) -> tuple[torch.Tensor, torch.Tensor, ProdigyState]:
    """One step on the mean gradient `grad` [d] at `params` [d]: (u [d], D used for this
    step, new state). The caller steps by D·(u + correction).

    `params` may carry a graph (meta-training), and then D, u and the state do too: a
    larger learned step now moves x further, which raises D later, and the meta-gradient
    sees that. So may `grad` (the white-box attack differentiates through the rule)."""
    grad = grad.float()
    # no Python branch on a tensor: the update runs under torch.func.vmap too (particles)
    x0 = torch.where(state.count == 0, params.detach(), state.x0)
    d = state.d
    beta3 = BETA2 ** 0.5
    weight = (d / D0) * d
    r = state.r * beta3 + weight * torch.dot(grad.double(), (x0 - params).double())
    m = state.m * BETA1 + grad * (d * (1 - BETA1)).float()
    v = state.v * BETA2 + grad.square() * (d * d * (1 - BETA2)).float()
    s = state.s * beta3 + grad * weight.float()
    norm = s.abs().sum().double()
    estimate = torch.where(norm > 0, coef * r / norm.clamp_min(1e-300), torch.zeros_like(r))
    d_new = torch.maximum(d, estimate)
    # clamped: where v = 0 (so m = 0), √v's derivative would be infinite
    u = m / (v.clamp_min(1e-30).sqrt() + d.float() * EPS)
    return u, d, ProdigyState(x0, s, m, v, r, d_new, state.count + 1)
