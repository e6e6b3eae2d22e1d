"""The "Ada features" of LAgg-A / LOpt-A (Joseph et al. 2025), built in one place.

    plan = FeaturePlan.from_layout(layout)
    acc = init_ada_state(plan)                                   # zeros, t = 0
    acc = update_ada_state(acc, gbar, plan, nominal_decays())    # once per round, with ḡ
    feats = build_features(acc, gbar, params, gbar[None], plan, round_index=t)
    x = feats.matrix()                                           # [d, C] = [d, F + 27 + 11]

Every round the accumulators are updated with ḡ = mean_k u_k, the mean of the
round's updates (metagg updates point like gradients: u_k = θ − θ_k = −Δ_k):

    m_β   ← β m_β + (1 − β) ḡ             β ∈ {0.9, 0.99, 0.999}
    r     ← 0.999 r + 0.001 ḡ²
    2-D tensors (a conv kernel [out, in, kh, kw] is seen as [out, in·kh·kw]):
      v_row,β ← β v_row,β + (1 − β) mean_cols(ḡ² + 1e-30)        [rows]
      v_col,β ← β v_col,β + (1 − β) mean_rows(ḡ² + 1e-30)        [cols]
    1-D tensors (and scalars): v_β ← β v_β + (1 − β)(ḡ² + 1e-30)  (unfactored)

The decays can be meta-learned as β = 1 − (1 − β₀)·exp(10·o) (`decays_from_offsets`).
Then, per element and in this fixed order (`FEATURE_NAMES`, `feature_names`):

    first[F]            LOpt-A: ḡ (F = 1); LAgg-A: u_1 … u_K (F = K), one per worker
    p                   the current parameter value θ
    m_β ×3, r
    m_β·rsqrt(r + 1e-6) ×3, rsqrt(r + 1e-6)
    fac_g_β ×3          ḡ · row_β · col_β
    v_row_β ×3, v_col_β ×3                  (broadcast to the tensor's shape)
    rsqrt(v_row_β + 1e-8) ×3, rsqrt(v_col_β + 1e-8) ×3
    fac_m_β ×3          m_β · row_β · col_β

with the Adafactor factors of learned_optimization's `adafac_mlp_lopt` (our choice
where the spec is silent; safe_rsqrt(x) = rsqrt(max(x, 1e-9))):

    row_β = safe_rsqrt(v_row,β / (mean(v_row,β) + 1e-9)),  col_β = safe_rsqrt(v_col,β)
    i.e. ḡ² is estimated as v_row[i]·v_col[j] / mean(v_row), and row = mean over the
    columns (dim 1 of the 2-D view), col = mean over the rows (dim 0). learned_optimization
    factors the two largest dims of a tensor; we factor [out, rest] for every ≥2-D
    tensor (conv kernels included), as our spec asks.
    1-D: v_row = v_col = v; fac_g = ḡ·safe_rsqrt(v + 1e-9); fac_m = m·rsqrt(v + 1e-6).

Each of these F + 27 channels is normalised per tensor, x / sqrt(1e-5 + mean(x²)) over
the tensor's elements; then 11 unnormalised time features tanh(t/τ − 1),
τ ∈ {1, 3, …, 1e5}, t = rounds seen before this one, are the same for every element.
Accumulators are updated *before* the features are built (as learned_optimization does).

The normalised channels are kept channel-major, [F + 27, d] (each tensor's block of a
channel is contiguous), and the 11 time features as one [11] vector, so the MLP can
fold them into its first bias; `Features.matrix()` gives the full [d, C] matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from metagg.layout import ParamLayout

__all__ = [
    "ADA_FEATURE_NAMES",
    "DECAYS",
    "FEATURE_NAMES",
    "NUM_ADA_FEATURES",
    "NUM_TIME_FEATURES",
    "TIMESCALES",
    "TIME_FEATURE_NAMES",
    "AdaState",
    "FeaturePlan",
    "Features",
    "TensorPlan",
    "build_features",
    "decays_from_offsets",
    "feature_names",
    "init_ada_state",
    "nominal_decays",
    "normalize_per_tensor",
    "time_features",
    "update_ada_state",
]

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAY = 0.999
FACTORED_DECAYS = (0.9, 0.99, 0.999)
#: β₀ in the order of `decays_from_offsets`: 3 momentum, 1 second moment, 3 factored.
DECAYS = (*MOMENTUM_DECAYS, RMS_DECAY, *FACTORED_DECAYS)
TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
NORM_EPS = 1e-5  # x / sqrt(NORM_EPS + mean(x²))
SAFE_MIN = 1e-9  # safe_rsqrt floor (learned_optimization.common.safe_rsqrt)


def _b(beta: float) -> str:
    return f"{beta:g}"


ADA_FEATURE_NAMES: tuple[str, ...] = (
    "p",
    *(f"m_{_b(b)}" for b in MOMENTUM_DECAYS),
    f"r_{_b(RMS_DECAY)}",
    *(f"m_rsqrt_r_{_b(b)}" for b in MOMENTUM_DECAYS),
    "rsqrt_r",
    *(f"fac_g_{_b(b)}" for b in FACTORED_DECAYS),
    *(f"v_row_{_b(b)}" for b in FACTORED_DECAYS),
    *(f"v_col_{_b(b)}" for b in FACTORED_DECAYS),
    *(f"rsqrt_v_row_{_b(b)}" for b in FACTORED_DECAYS),
    *(f"rsqrt_v_col_{_b(b)}" for b in FACTORED_DECAYS),
    *(f"fac_m_{_b(b)}" for b in FACTORED_DECAYS),
)
TIME_FEATURE_NAMES: tuple[str, ...] = tuple(f"time_{_b(t)}" for t in TIMESCALES)
NUM_ADA_FEATURES = len(ADA_FEATURE_NAMES)  # 27
NUM_TIME_FEATURES = len(TIME_FEATURE_NAMES)  # 11
#: LOpt-A's input channels, in order (39).
FEATURE_NAMES: tuple[str, ...] = ("g", *ADA_FEATURE_NAMES, *TIME_FEATURE_NAMES)

# channel offsets after the F "first" channels
_P, _M, _R, _MR, _RS, _FG, _VR, _VC, _RVR, _RVC, _FM = 0, 1, 4, 5, 8, 9, 12, 15, 18, 21, 24


def feature_names(num_workers: int | None = None) -> tuple[str, ...]:
    """Input channel names: LOpt-A (`num_workers` None) or LAgg-A (`delta_0 … delta_{K-1}`)."""
    if num_workers is None:
        return FEATURE_NAMES
    return (*(f"delta_{k}" for k in range(num_workers)), *ADA_FEATURE_NAMES, *TIME_FEATURE_NAMES)


# --------------------------------------------------------------------------- layout plan


@dataclass(frozen=True)
class TensorPlan:
    """Where one tensor's elements and accumulators live.

    `rows`/`cols` are the 2-D view [shape[0], numel / shape[0]] (None for 1-D and
    scalars); `acc` is its slice of v_row / v_col (2-D: (row slice, col slice)) or of
    the unfactored v (1-D: (vec slice, None)).
    """

    name: str
    elems: slice
    rows: int | None
    cols: int | None
    acc: tuple[slice, slice | None]

    @property
    def factored(self) -> bool:
        return self.rows is not None


@dataclass(frozen=True)
class FeaturePlan:
    """Per-tensor slices of a layout, and the sizes of the factored accumulators."""

    tensors: tuple[TensorPlan, ...]
    size: int
    num_rows: int
    num_cols: int
    num_vec: int

    @classmethod
    def from_layout(cls, layout: ParamLayout) -> FeaturePlan:
        plans, nr, nc, nv = [], 0, 0, 0
        for spec in layout:
            n = spec.numel
            if len(spec.shape) >= 2 and n > 0:
                rows, cols = spec.shape[0], n // spec.shape[0]
                acc = (slice(nr, nr + rows), slice(nc, nc + cols))
                nr, nc = nr + rows, nc + cols
                plans.append(TensorPlan(spec.name, spec.slice, rows, cols, acc))
            else:
                plans.append(TensorPlan(spec.name, spec.slice, None, None,
                                        (slice(nv, nv + n), None)))
                nv += n
        return cls(tuple(plans), layout.size, nr, nc, nv)


# --------------------------------------------------------------------------- accumulators


class AdaState(NamedTuple):
    """Accumulators of ḡ, flat over all tensors (float32)."""

    m: torch.Tensor  # [3, d]        momentum, β ∈ {0.9, 0.99, 0.999}
    r: torch.Tensor  # [d]           second moment, β = 0.999
    v_row: torch.Tensor  # [3, Σ rows]   factored row accumulators of ≥2-D tensors
    v_col: torch.Tensor  # [3, Σ cols]   factored column accumulators
    v: torch.Tensor  # [3, Σ numel of 1-D tensors]  unfactored accumulators
    t: torch.Tensor  # [] int64, rounds accumulated so far


def init_ada_state(plan: FeaturePlan) -> AdaState:
    """Zero accumulators, t = 0."""
    z = torch.zeros
    return AdaState(z(3, plan.size), z(plan.size), z(3, plan.num_rows), z(3, plan.num_cols),
                    z(3, plan.num_vec), torch.zeros((), dtype=torch.int64))


def nominal_decays() -> torch.Tensor:
    """β₀ as a [7] tensor (3 momentum, 1 second moment, 3 factored)."""
    return torch.tensor(DECAYS, dtype=torch.float32)


def decays_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """Meta-learned decays β = 1 − (1 − β₀)·exp(10·o); o [7] = 0 gives β₀."""
    return 1.0 - (1.0 - nominal_decays().to(offsets)) * torch.exp(10.0 * offsets)


def update_ada_state(state: AdaState, g: torch.Tensor, plan: FeaturePlan,
                     decays: torch.Tensor) -> AdaState:
    """New accumulators after one round with mean update ḡ [d] (formulas in the module
    docstring). Returns new tensors; `state` is not modified."""
    bm, br, bf = decays[:3, None], decays[3], decays[4:, None]
    m = torch.addcmul(state.m * bm, 1.0 - bm, g)
    g2 = g.square()
    r = state.r * br + (1.0 - br) * g2
    g2 = g2 + 1e-30
    row_parts, col_parts, vec_parts = [], [], []
    for tp in plan.tensors:
        x = g2[tp.elems]
        if tp.factored:
            x = x.view(tp.rows, tp.cols)
            row_parts.append(x.mean(1))
            col_parts.append(x.mean(0))
        else:
            vec_parts.append(x)

    def ema(old: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        if not parts:
            return old.clone()
        return torch.addcmul(old * bf, 1.0 - bf, torch.cat(parts))

    return AdaState(m, r, ema(state.v_row, row_parts), ema(state.v_col, col_parts),
                    ema(state.v, vec_parts), state.t + 1)


# --------------------------------------------------------------------------- features


class Features(NamedTuple):
    """One round's MLP inputs: normalised channels [F + 27, d] and time features [11]."""

    normalized: torch.Tensor  # [F + 27, d], channel-major
    time: torch.Tensor  # [11]

    def matrix(self) -> torch.Tensor:
        """The full input matrix [d, F + 38] (normalised channels, then time)."""
        d = self.normalized.shape[1]
        return torch.cat([self.normalized.T, self.time.expand(d, -1)], dim=1)


def time_features(t: int) -> torch.Tensor:
    """tanh(t/τ − 1) for the 11 τ in `TIMESCALES`, [11]."""
    return torch.tensor([math.tanh(t / tau - 1.0) for tau in TIMESCALES], dtype=torch.float32)


def normalize_per_tensor(x: torch.Tensor, plan: FeaturePlan) -> torch.Tensor:
    """In place: every row c of x [C, d], per tensor slice, ← x / sqrt(1e-5 + mean(x²))."""
    for tp in plan.tensors:
        blk = x[:, tp.elems]
        n = blk.shape[1]
        if n == 0:
            continue
        ms = torch.einsum("cn,cn->c", blk, blk).div_(n)
        blk.mul_(torch.rsqrt(ms.add_(NORM_EPS))[:, None])
    return x


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(x.clamp_min(SAFE_MIN))


def build_features(state: AdaState, g: torch.Tensor, params: torch.Tensor,
                   first: torch.Tensor, plan: FeaturePlan, *, round_index: int) -> Features:
    """All per-element inputs of the learned optimizer, in `feature_names` order.

    Args:
        state: accumulators already updated with this round's ḡ.
        g: ḡ [d], the mean update.
        params: θ [d], the current parameters.
        first: the leading channels [F, d]: ḡ[None] (LOpt-A) or the K worker slots
            (LAgg-A; missing workers' rows zero).
        plan: per-tensor slices (`FeaturePlan.from_layout`).
        round_index: t for the time features (rounds seen before this one).
    """
    f = first.shape[0]
    x = torch.empty(f + NUM_ADA_FEATURES, plan.size, dtype=torch.float32)
    x[:f] = first
    a = x[f:]  # the 27 Ada channels
    a[_P] = params
    a[_M:_M + 3] = state.m
    a[_R] = state.r
    rs = torch.rsqrt(state.r + 1e-6)
    torch.mul(state.m, rs, out=a[_MR:_MR + 3])
    a[_RS] = rs
    for tp in plan.tensors:
        e = tp.elems
        if tp.factored:
            rows, cols = tp.rows, tp.cols

            def blk(c: int, e: slice = e, rows: int = rows, cols: int = cols) -> torch.Tensor:
                return a[c:c + 3, e].view(3, rows, cols)

            vr, vc = state.v_row[:, tp.acc[0]], state.v_col[:, tp.acc[1]]  # [3, R], [3, C]
            row_f = _safe_rsqrt(vr / (vr.mean(1, keepdim=True) + 1e-9))[:, :, None]
            col_f = _safe_rsqrt(vc)[:, None, :]
            torch.mul(g[e].view(1, rows, cols), row_f, out=blk(_FG)).mul_(col_f)
            blk(_VR).copy_(vr[:, :, None].expand(3, rows, cols))
            blk(_VC).copy_(vc[:, None, :].expand(3, rows, cols))
            blk(_RVR).copy_(torch.rsqrt(vr + 1e-8)[:, :, None].expand(3, rows, cols))
            blk(_RVC).copy_(torch.rsqrt(vc + 1e-8)[:, None, :].expand(3, rows, cols))
            torch.mul(state.m[:, e].view(3, rows, cols), row_f, out=blk(_FM)).mul_(col_f)
        else:  # unfactored: v_row = v_col = v (learned_optimization's RMSProp-like case)
            v = state.v[:, tp.acc[0]]  # [3, n]
            a[_FG:_FG + 3, e] = g[e] * _safe_rsqrt(v + 1e-9)
            a[_VR:_VR + 3, e] = v
            a[_VC:_VC + 3, e] = v
            rv = torch.rsqrt(v + 1e-8)
            a[_RVR:_RVR + 3, e] = rv
            a[_RVC:_RVC + 3, e] = rv
            a[_FM:_FM + 3, e] = state.m[:, e] * torch.rsqrt(v + 1e-6)
    normalize_per_tensor(x, plan)
    return Features(x, time_features(round_index))
