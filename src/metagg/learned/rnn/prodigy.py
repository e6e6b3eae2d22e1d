"""The parameter-free base step of the RNN aggregator's `output="prodigy"` rule.

A learned step whose size is fixed in parameter units (`output="normalized"`: scale·o_i)
cannot transfer between tasks that want step sizes 10× apart, and a user cannot tune it.
Prodigy (Mishchenko & Defazio, ICML 2024) estimates the distance D = ‖x_0 − x*‖ from the
gradients and the distance travelled, and takes Adam's direction with step size D, so it
needs no learning rate. The RNN then learns a correction on top:

    step_i = D_t · (u_i + scale · o_i),   u_i = m_i / (√v_i + D_t·ε)

with Prodigy's moments of the mean worker gradient ḡ (no bias correction, β = 0.9,
0.999) and its estimate

    r ← √β₂ r + (D/D₀)·D·⟨ḡ, x_0 − x⟩,   s ← √β₂ s + (D/D₀)·D·ḡ,
    D ← max(D, coef · r / ‖s‖₁).

With a zero RNN head (its initialisation under this rule) the aggregator *is* mean
aggregation + Prodigy. D, u and the moments depend on the workers' gradients and θ only;
they are treated as constants in meta-training (the RNN learns o).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ProdigyState", "init_prodigy", "prodigy_update"]

BETA1, BETA2, EPS, D0 = 0.9, 0.999, 1e-8, 1e-6


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


@torch.no_grad()
def prodigy_update(state: ProdigyState, grad: torch.Tensor, params: torch.Tensor,
                   coef: float) -> tuple[torch.Tensor, float, ProdigyState]:
    """One step on the mean gradient `grad` [d] at `params` [d]: (u [d], D used for this
    step, new state). The caller steps by D·(u + correction)."""
    grad, params = grad.detach().float(), params.detach().float()
    x0 = params.clone() if int(state.count) == 0 else state.x0
    d = float(state.d)
    beta3 = BETA2 ** 0.5
    weight = (d / D0) * d
    r = state.r * beta3 + weight * float(torch.dot(grad, x0 - params))
    m = state.m * BETA1 + grad * (d * (1 - BETA1))
    v = state.v * BETA2 + grad.square() * (d * d * (1 - BETA2))
    s = state.s * beta3 + grad * weight
    norm = float(s.abs().sum())
    estimate = coef * float(r) / norm if norm > 0 else 0.0
    d_new = max(d, estimate)
    u = m / (v.sqrt() + d * EPS)
    return u, d, ProdigyState(x0, s, m, v, r, torch.full((), d_new, dtype=torch.float64),
                              state.count + 1)
