"""The learned aggregators' input features, built in one place: the "Ada features" of
LAgg-A / LOpt-A (Joseph et al. 2025) and, at the end, the RNN aggregator's preprocessing
(Ji et al. 2019 §4.2-4.3: `gradient_features`, `log_norm_feature`, `loss_features`).

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

Everything here is pure and out of place (no tensor is written after it is made), so
the same functions run under `torch.no_grad` on the server and under `torch.func.vmap`
over PES particles. The channels are built one tensor at a time (`tensor_inputs`, raw
[F + 27, n], with `channel_scale` the per-tensor normalisation): the learned step
folds the scale into its first layer instead of writing a normalised copy
(`metagg.learned.lagg.model`). `build_features` assembles the normalised channels of
every tensor, channel-major [F + 27, d], with the 11 time features as one [11] vector;
`Features.matrix()` gives the full [d, C] matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from metagg.layout import ParamLayout
from metagg.tasks import TrustedData

__all__ = [
    "ADA_FEATURE_NAMES",
    "DECAYS",
    "FEATURE_NAMES",
    "NORM_EPS",
    "NUM_ADA_FEATURES",
    "NUM_TIME_FEATURES",
    "TIMESCALES",
    "TIME_FEATURE_NAMES",
    "AdaState",
    "FeaturePlan",
    "Features",
    "TensorPlan",
    "build_features",
    "channel_scale",
    "decays_from_offsets",
    "feature_names",
    "gradient_features",
    "graph_of",
    "init_ada_state",
    "log_norm_feature",
    "loss_features",
    "nominal_decays",
    "safe_sqrt",
    "tensor_inputs",
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

    @property
    def nonempty(self) -> tuple[TensorPlan, ...]:
        """The tensors with at least one element (scalars included), in layout order."""
        return tuple(tp for tp in self.tensors if tp.elems.stop > tp.elems.start)

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


def time_features(t: int | torch.Tensor) -> torch.Tensor:
    """tanh(t/τ − 1) for the 11 τ in `TIMESCALES`, [11], computed in float64. `t` may be
    a 0-d integer tensor (batched under vmap)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.tanh(t / torch.tensor(TIMESCALES, dtype=torch.float64) - 1.0).to(torch.float32)


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(x.clamp_min(SAFE_MIN))


def tensor_inputs(state: AdaState, g: torch.Tensor, params: torch.Tensor,
                  first: torch.Tensor, tp: TensorPlan) -> torch.Tensor:
    """The raw (unnormalised) F + 27 channels of one tensor's elements, [F + 27, n].

    Arguments as `build_features`. Row- and column-wise channels of a factored tensor
    are broadcast views until the final concatenation writes them out.
    """
    e = tp.elems
    m, r = state.m[:, e], state.r[e]  # [3, n], [n]
    rs = torch.rsqrt(r + 1e-6)
    if tp.factored:
        rows, cols = tp.rows, tp.cols

        def grid(x: torch.Tensor) -> torch.Tensor:  # [k, n] -> [k, rows, cols]
            return x.reshape(-1, rows, cols)

        vr, vc = state.v_row[:, tp.acc[0]], state.v_col[:, tp.acc[1]]  # [3, R], [3, C]
        row_f = _safe_rsqrt(vr / (vr.mean(1, keepdim=True) + 1e-9))[:, :, None]
        col_f = _safe_rsqrt(vc)[:, None, :]
        shape = (3, rows, cols)
        x = torch.cat([
            grid(first[:, e]), grid(params[e]), grid(m), grid(r), grid(m * rs), grid(rs),
            grid(g[e]) * row_f * col_f,
            vr[:, :, None].expand(shape), vc[:, None, :].expand(shape),
            torch.rsqrt(vr + 1e-8)[:, :, None].expand(shape),
            torch.rsqrt(vc + 1e-8)[:, None, :].expand(shape),
            grid(m) * row_f * col_f,
        ])
        return x.reshape(x.shape[0], rows * cols)
    # unfactored (learned_optimization's RMSProp-like case): v_row = v_col = v
    v = state.v[:, tp.acc[0]]  # [3, n]
    rv = torch.rsqrt(v + 1e-8)
    return torch.cat([first[:, e], params[e][None], m, r[None], m * rs, rs[None],
                      g[e] * _safe_rsqrt(v + 1e-9), v, v, rv, rv, m * torch.rsqrt(v + 1e-6)])


def channel_scale(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Per-channel normalisation of one tensor's channels x [C, n]: 1 / sqrt(eps + mean(x²)),
    [C] (eps 1e-5 as in the reference)."""
    # vector_norm: ~10x faster than einsum("cn,cn->c") on CPU
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=1).square() / x.shape[1] + eps)


def build_features(state: AdaState, g: torch.Tensor, params: torch.Tensor,
                   first: torch.Tensor, plan: FeaturePlan, *,
                   round_index: int | torch.Tensor) -> Features:
    """All per-element inputs of the learned optimizer, normalised, in `feature_names`
    order (for inspection and tests; the learned step uses `tensor_inputs` directly).

    Args:
        state: accumulators already updated with this round's ḡ.
        g: ḡ [d], the mean update.
        params: θ [d], the current parameters.
        first: the leading channels [F, d]: ḡ[None] (LOpt-A) or the K worker slots
            (LAgg-A; missing workers' rows zero).
        plan: per-tensor slices (`FeaturePlan.from_layout`).
        round_index: t for the time features (rounds seen before this one).
    """
    blocks = []
    for tp in plan.nonempty:
        x = tensor_inputs(state, g, params, first, tp)
        blocks.append(x * channel_scale(x)[:, None])
    return Features(torch.cat(blocks, dim=1), time_features(round_index))


# --------------------------------------------------------------------------- RNN aggregator


def gradient_features(
    slots: torch.Tensor,
    present: torch.Tensor | None = None,
    *,
    p: float = 10.0,
    clamp_sign: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ji §4.2 preprocessing of worker slots [M, B] → (inputs [B, M], A [B]).

        A_i = ‖(g_{1,i} … g_{M,i})‖₂,   ĝ_{m,i} = g_{m,i} / A_i,
        |ĝ| < e^{-p}  →  sign(ĝ)·e^{-p}   (clamp_sign=True; exact zeros stay 0)
                      →  +e^{-p}          (clamp_sign=False: Ji's literal rule, which
                                           drops the sign of small entries)

    Coordinates with A_i = 0 (every worker sent 0) get an all-zero row, and slots
    of missing workers (`present` False) are zero whatever the clamp rule.
    `out` [B, ≥M] receives the inputs in its first M columns.
    """
    g = slots.to(torch.float32)
    if graph_of(g):  # the same values, out of place, differentiable in the slots
        a = safe_sqrt(torch.einsum("mb,mb->b", g, g))
        inv = torch.where(a > 0, 1.0 / torch.where(a > 0, a, 1.0), 0.0)
        x = g.T * inv[:, None]
        tiny = math.exp(-p)
        small = x.abs() < tiny
        if clamp_sign:
            x = torch.where(small, torch.sign(x) * tiny, x)
        else:
            x = x.masked_fill(small, tiny).masked_fill((a == 0)[:, None], 0.0)
        if present is not None:
            x = x.masked_fill(~present[None, :], 0.0)
        return x, a
    a = torch.einsum("mb,mb->b", g, g).sqrt_()  # einsum: ~15× faster than vector_norm(dim=0)
    inv = torch.where(a > 0, a.reciprocal(), torch.zeros_like(a))
    x = torch.mul(g.T, inv[:, None], out=None if out is None else out[:, : g.shape[0]])
    tiny = math.exp(-p)
    small = x.abs() < tiny
    if clamp_sign:
        x = torch.where(small, torch.sign(x) * tiny, x, out=x)
    else:  # Ji §4.2 as written: small magnitudes become +e^{-p} (sign lost)
        x = x.masked_fill_(small, tiny)
        x.masked_fill_((a == 0)[:, None], 0.0)
    if present is not None:
        x.masked_fill_(~present[None, :], 0.0)
    return x, a


def graph_of(x: torch.Tensor) -> bool:
    """Whether autograd records ops on x: then features are built out of place (the
    white-box attack differentiates the RNN's step in the workers' updates)."""
    return x.requires_grad and torch.is_grad_enabled()


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(max(x, 0)) with a finite gradient (0) where x <= 0: sqrt's is infinite at 0,
    and inf·0 would turn a whole gradient into NaN."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def log_norm_feature(a: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """max(log A_i, −p) / p: L2L's log-magnitude input (Andrychowicz et al. 2016, App. A)
    applied to the worker spread A_i; 0 where A_i = 0 (no signal)."""
    if graph_of(a):
        return (a.clamp_min(math.exp(-p)).log() / p).masked_fill(a == 0, 0.0)
    f = a.clamp_min(math.exp(-p)).log_().div_(p)
    return f.masked_fill_(a == 0, 0.0)


def loss_features(
    trusted: TrustedData,
    params: torch.Tensor,
    slots: torch.Tensor,
    present: torch.Tensor | None = None,
    *,
    probe_lr: float = 1.0,
    loss_scale: float = 0.1,
) -> torch.Tensor:
    """ARNN loss information (Ji §4.3), one number per worker slot, [M].

        f_0 = L_r(θ),   f_m = L_r(θ − probe_lr·g_m)     (L_r: loss on the trusted sample)
        feature_m = asinh( (f_m − f_0) / (|f_0| + 1e-8) / loss_scale )

    i.e. the relative change of the trusted loss that worker m's update alone
    would cause; asinh keeps it linear near 0 (honest workers: a few % of f_0)
    and logarithmic for forged updates whose loss explodes. Non-finite losses
    count as a huge increase. Missing slots get 0. Computed without gradient (like the
    workers' own gradients, an input, not part of the meta-graph) unless the slots are
    in an autograd graph (the white-box attack).
    """
    if not graph_of(slots):
        with torch.no_grad():
            return _loss_features(trusted, params, slots, present, probe_lr, loss_scale)
    return _loss_features(trusted, params, slots, present, probe_lr, loss_scale)


def _loss_features(trusted: TrustedData, params: torch.Tensor, slots: torch.Tensor,
                   present: torch.Tensor | None, probe_lr: float,
                   loss_scale: float) -> torch.Tensor:
    theta = params.detach().to(torch.float32)
    rows = slots if present is None else slots[present]
    cands = torch.cat([theta[None], theta[None] - probe_lr * rows.to(torch.float32)])
    losses = trusted.loss(cands).to(torch.float32)
    f0, fm = losses[0], losses[1:]
    rel = (fm - f0) / (f0.abs() + 1e-8)
    rel = torch.nan_to_num(rel, nan=1e12, posinf=1e12, neginf=-1e12)
    feat = torch.asinh(rel / loss_scale)
    if present is None:
        return feat
    return feat.new_zeros(slots.shape[0]).index_put((present.nonzero().squeeze(1),), feat)
