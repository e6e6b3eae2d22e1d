"""The coordinatewise RNN / ARNN aggregator of Ji et al. (2019).

    from metagg.learned import load_aggregator
    agg = load_aggregator("runs/rnn-digits")          # or Simulation with aggregator "rnn:PATH"
    state = agg.init(layout, num_workers=10)
    step, state = agg.step(state, updates, ctx)       # the server applies θ ← θ − step

One small 2-layer LSTM or GRU (20 hidden units) is shared by every coordinate i
of θ: coordinates are the batch dimension, so a step over d coordinates is a few
batched matmuls per layer, done in chunks of `chunk_size` coordinates to bound
memory. Per coordinate the input is, in this fixed order (see `RNNConfig.feature_names`):

    grad[m]   the M workers' updates g_{m,i} / A_i, A_i = ‖(g_{1,i} … g_{M,i})‖₂ (Ji §4.2),
              magnitudes below e^{-p} clamped to sign(g)·e^{-p};
    loss[m]   ARNN only (Ji §4.3): the same M numbers for every coordinate, the
              trusted-sample loss of θ − probe_lr·g_m (see `loss_features`);
    log_norm  output="normalized" only: max(log A_i, −p) / p (L2L's log-magnitude feature).

The head maps the top layer's hidden state h_i to a scalar o_i and the step is

    output="paper":       step_i = scale · o_i · A_i   (Ji §4.2 postprocessing)
    output="normalized":  step_i = scale · o_i         (default; no ×A_i, log A_i is an input)

`normalized` is the stronger variant: with ×A_i the step is proportional to the
gradient spread, so the aggregator behaves like SGD and cannot normalise step
sizes per coordinate (see /work/shared/specs/rnn-aggregator.md).

Sign: o_i points like a gradient, as metagg updates do; the server applies
θ ← θ − step. L2L writes θ ← θ + out, i.e. out = −scale·o (the same family of
functions with the head negated).

References: Ji, Chen, Wang, Yu, Li, "Learning to Learn Gradient Aggregation by
Gradient Descent", IJCAI 2019. Andrychowicz et al., "Learning to learn by
gradient descent by gradient descent", NeurIPS 2016 (L2L; where Ji is silent).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from metagg.aggregators.base import Aggregator, RoundContext, worker_slots
from metagg.layout import ParamLayout
from metagg.tasks import TrustedData

__all__ = [
    "CELLS",
    "OUTPUT_RULES",
    "CoordinateRNN",
    "RNNAggregator",
    "RNNConfig",
    "RNNState",
    "gradient_features",
    "log_norm_feature",
    "loss_features",
]

CELLS = ("lstm", "gru")
OUTPUT_RULES = ("normalized", "paper")
DEFAULT_CHUNK = 32768  # coordinates per chunk: ~10 MB of gate activations, fast on 2 cores


@dataclass(frozen=True)
class RNNConfig:
    """What defines a learned RNN aggregator (saved beside its weights).

    Attributes:
        num_workers: M; the input has one slot per worker (missing workers → zeros).
        cell: "lstm" or "gru" (Ji §4.1 uses both; 2 layers, 20 units).
        hidden: hidden units per layer.
        layers: stacked recurrent layers.
        output: "normalized" (default, no ×A_i, log A_i fed as an input) or
            "paper" (Ji §4.2: step = scale·o·A_i).
        arnn: feed the M trusted-sample loss features (Ji §4.3).
        p: clamp threshold e^{-p} on |g/A| and floor of the log-norm feature (L2L: 10).
        scale: output scale (L2L: 0.1).
        clamp_sign: True → |g| < e^{-p} becomes sign(g)·e^{-p}; False → +e^{-p} as Ji writes.
        probe_lr: ARNN probe step: worker m is scored by the loss of θ − probe_lr·g_m.
        loss_scale: ARNN feature asinh(relative loss change / loss_scale).
    """

    num_workers: int
    cell: str = "lstm"
    hidden: int = 20
    layers: int = 2
    output: str = "normalized"
    arnn: bool = False
    p: float = 10.0
    scale: float = 0.1
    clamp_sign: bool = True
    probe_lr: float = 1.0
    loss_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if self.output not in OUTPUT_RULES:
            raise ValueError(f"output must be one of {', '.join(OUTPUT_RULES)}, "
                             f"got {self.output!r}")
        for key in ("num_workers", "hidden", "layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        for key in ("p", "scale", "probe_lr", "loss_scale"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{key} must be a number > 0, got {value!r}")

    @property
    def kind(self) -> str:
        """'arnn' or 'rnn' (the registry name)."""
        return "arnn" if self.arnn else "rnn"

    @property
    def input_size(self) -> int:
        return len(self.feature_names())

    def feature_names(self) -> list[str]:
        """Names of the RNN's input channels, in order."""
        m = self.num_workers
        names = [f"grad[{k}]" for k in range(m)]
        if self.arnn:
            names += [f"loss[{k}]" for k in range(m)]
        if self.output == "normalized":
            names.append("log_norm")
        return names

    def to_dict(self) -> dict:
        return asdict(self)


class RNNState(NamedTuple):
    """Per-run state: one hidden (and, for LSTM, cell) vector per layer and coordinate."""

    h: torch.Tensor  # [layers, d, hidden]
    c: torch.Tensor | None  # [layers, d, hidden] for LSTM; None for GRU

    def detach(self) -> RNNState:
        """Cut the graph (truncated BPTT)."""
        return RNNState(self.h.detach(), None if self.c is None else self.c.detach())


class CoordinateRNN(nn.Module):
    """The meta-parameters φ: a stacked LSTM/GRU and a linear head, shared by coordinates.

    Weights are stored input-major so a chunk is `x @ w`: layer l has
    `w_ih[l]` [in_l, G·H], `w_hh[l]` [H, G·H], `b_ih[l]`, `b_hh[l]` [G·H] with
    PyTorch's gate order (LSTM i, f, g, o with G=4; GRU r, z, n with G=3), i.e. the
    transposes of `nn.LSTMCell` / `nn.GRUCell` weights. Head: `w_out` [H, 1], `b_out` [1].
    Initialisation: U(−1/√H, 1/√H) for everything, as PyTorch's RNN cells, seeded.
    """

    def __init__(self, config: RNNConfig, *, seed: int = 0):
        super().__init__()
        self.config = config
        H, gates = config.hidden, 4 if config.cell == "lstm" else 3
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(H)

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1) * bound)

        sizes = [config.input_size] + [H] * (config.layers - 1)
        self.w_ih = nn.ParameterList([uniform(n, gates * H) for n in sizes])
        self.w_hh = nn.ParameterList([uniform(H, gates * H) for _ in sizes])
        self.b_ih = nn.ParameterList([uniform(gates * H) for _ in sizes])
        self.b_hh = nn.ParameterList([uniform(gates * H) for _ in sizes])
        self.w_out = uniform(H, 1)
        self.b_out = uniform(1)

    def fused_weights(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer, the weights `lstm_cell` / `gru_cell` take (see there)."""
        H = self.config.hidden
        out = []
        for w_ih, w_hh, b_ih, b_hh in zip(self.w_ih, self.w_hh, self.b_ih, self.b_hh,
                                          strict=True):
            if self.config.cell == "lstm":
                # tanh(a) = 2σ(2a) − 1: doubling the g-gate columns lets one sigmoid
                # cover all four gates (tanh is ~3.5× slower than sigmoid on CPU).
                s = torch.ones(4 * H, dtype=w_ih.dtype)
                s[2 * H : 3 * H] = 2.0
                out.append((w_ih * s, w_hh * s, (b_ih + b_hh) * s))
            else:
                rz = slice(0, 2 * H)
                n = slice(2 * H, 3 * H)
                out.append((w_ih[:, rz].contiguous(), w_hh[:, rz].contiguous(),
                            b_ih[rz] + b_hh[rz], 2 * w_ih[:, n], 2 * b_ih[n],
                            2 * w_hh[:, n], 2 * b_hh[n]))
        return out


def lstm_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w: tuple[torch.Tensor, ...],
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step for a batch of coordinates; equals `nn.LSTMCell` (up to rounding).

    `w = (w_x [in, 4H], w_h [H, 4H], b [4H])` from `CoordinateRNN.fused_weights`
    (g-gate columns doubled). With `out=(h_new, c_new)` buffers the step runs in
    place (no autograd, no allocations beyond the gates); without, it is differentiable.
    """
    w_x, w_h, b = w
    gates = torch.addmm(b, x, w_x).addmm_(h, w_h).sigmoid_()  # (B, 4H): σ(i), σ(f), σ(2g), σ(o)
    i, f, g, o = gates.chunk(4, 1)
    if out is None:
        c_new = f * c + i * (2 * g - 1)
        return o * (2 * torch.sigmoid(2 * c_new) - 1), c_new
    h_new, c_new = out
    torch.mul(f, c, out=c_new)
    c_new.add_(g.mul_(2).sub_(1).mul_(i))
    torch.mul(c_new, 2, out=h_new).sigmoid_().mul_(2).sub_(1).mul_(o)
    return h_new, c_new


def gru_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    w: tuple[torch.Tensor, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One GRU step for a batch of coordinates; equals `nn.GRUCell` (up to rounding).

    r, z = σ(W_r,z·[x, h] + b); n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn));
    h' = (1 − z) ⊙ n + z ⊙ h. The n-gate weights arrive doubled (tanh via sigmoid).
    With `out` the step runs in place (no autograd).
    """
    w_x_rz, w_h_rz, b_rz, w_x_n, b_x_n, w_h_n, b_h_n = w
    rz = torch.addmm(b_rz, x, w_x_rz).addmm_(h, w_h_rz).sigmoid_()  # (B, 2H)
    r, z = rz.chunk(2, 1)
    hn = torch.addmm(b_h_n, h, w_h_n)  # (B, H)
    if out is None:
        n = 2 * torch.sigmoid(torch.addmm(b_x_n, x, w_x_n) + r * hn) - 1
        return n + z * (h - n)
    n = torch.addmm(b_x_n, x, w_x_n).addcmul_(r, hn).sigmoid_().mul_(2).sub_(1)
    return torch.sub(h, n, out=out).mul_(z).add_(n)


# --------------------------------------------------------------------------- features


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


def log_norm_feature(a: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """max(log A_i, −p) / p: L2L's log-magnitude input (Andrychowicz et al. 2016, App. A)
    applied to the worker spread A_i; 0 where A_i = 0 (no signal)."""
    f = a.clamp_min(math.exp(-p)).log_().div_(p)
    return f.masked_fill_(a == 0, 0.0)


@torch.no_grad()
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
    count as a huge increase. Missing slots get 0. Computed without gradient:
    like the workers' own gradients, this is an input, not part of the meta-graph.
    """
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
    out = feat.new_zeros(slots.shape[0])
    out[present] = feat
    return out


# --------------------------------------------------------------------------- aggregator


class RNNAggregator(Aggregator):
    """Ji et al. 2019 RNN (`arnn=False`) or ARNN (`arnn=True`) aggregator.

    Args:
        config: the architecture and feature settings (`RNNConfig`).
        net: meta-parameters φ; a fresh seeded `CoordinateRNN(config)` if None.
        seed: initialisation seed when `net` is None.
        chunk_size: coordinates per batched RNN step (bounds memory; results do
            not depend on it).
        differentiable: make `step` differentiable in φ and in the incoming state
            (meta-training). Default False: the server's path, in place under
            `torch.no_grad()`, several times faster and without a graph.

    The updates are always treated as constants (Ji Fig. 2's dashed edges). The
    server's optimizer is not used: the RNN produces the step itself.
    """

    def __init__(self, config: RNNConfig, net: CoordinateRNN | None = None, *, seed: int = 0,
                 chunk_size: int = DEFAULT_CHUNK, differentiable: bool = False):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        if net is not None and net.config != config:
            raise ValueError(f"net was built for {net.config}, not {config}")
        self.config = config
        self.net = net if net is not None else CoordinateRNN(config, seed=seed)
        self.chunk_size = chunk_size
        self.differentiable = differentiable
        self.name = config.kind
        self.uses_trusted_data = config.arnn

    def init(self, layout: ParamLayout, num_workers: int) -> RNNState:
        """Zero hidden (and cell) states for d = layout.size coordinates."""
        cfg = self.config
        if num_workers != cfg.num_workers:
            raise ValueError(f"{self.name}: this aggregator was trained for "
                             f"{cfg.num_workers} workers (its input width), got {num_workers}")
        shape = (cfg.layers, layout.size, cfg.hidden)
        return RNNState(torch.zeros(shape), torch.zeros(shape) if cfg.cell == "lstm" else None)

    def step(
        self, state: RNNState, updates: torch.Tensor, ctx: RoundContext
    ) -> tuple[torch.Tensor, RNNState]:
        """Return (step [d], new state); the server applies θ ← θ − step."""
        cfg = self.config
        self.check_updates(updates, ctx)
        if ctx.num_workers != cfg.num_workers:
            raise ValueError(f"{self.name}: trained for {cfg.num_workers} workers, "
                             f"the round has num_workers={ctx.num_workers}")
        d = updates.shape[1]
        if state.h.shape[1] != d:
            raise ValueError(f"{self.name}: state is for d={state.h.shape[1]}, updates have d={d}")
        updates = updates.detach()  # dashed edges: no meta-gradient through the workers
        slots, present = worker_slots(updates, ctx.worker_ids, cfg.num_workers)
        loss_feat = None
        if cfg.arnn:
            loss_feat = loss_features(ctx.trusted, ctx.params, slots, present,
                                      probe_lr=cfg.probe_lr, loss_scale=cfg.loss_scale)
        if self.differentiable and torch.is_grad_enabled():
            step, new_state = self._run(state, slots, present, loss_feat, inplace=False)
        else:
            with torch.no_grad():
                step, new_state = self._run(state, slots, present, loss_feat, inplace=True)
        return step.to(updates.dtype), new_state

    def _inputs(self, chunk: torch.Tensor, present: torch.Tensor | None,
                loss_feat: torch.Tensor | None, buf: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """RNN inputs [B, input_size] for worker slots [M, B], and A [B]."""
        cfg, m = self.config, self.config.num_workers
        with torch.no_grad():
            x = buf if buf is not None else chunk.new_empty(chunk.shape[1], cfg.input_size,
                                                            dtype=torch.float32)
            _, a = gradient_features(chunk, present, p=cfg.p, clamp_sign=cfg.clamp_sign, out=x)
            col = m
            if loss_feat is not None:
                x[:, m : 2 * m] = loss_feat
                col = 2 * m
            if cfg.output == "normalized":
                x[:, col] = log_norm_feature(a, cfg.p)
            if loss_feat is not None and not bool(a.all()):
                x.masked_fill_((a == 0)[:, None], 0.0)  # no signal at all: zero input
        return x, a

    def _run(self, state: RNNState, slots: torch.Tensor, present: torch.Tensor | None,
             loss_feat: torch.Tensor | None, *, inplace: bool) -> tuple[torch.Tensor, RNNState]:
        cfg, net = self.config, self.net
        d, lstm = slots.shape[1], cfg.cell == "lstm"
        weights = net.fused_weights()
        if inplace:
            new_h = torch.empty_like(state.h)
            new_c = torch.empty_like(state.c) if lstm else None
            step = torch.empty(d, dtype=torch.float32)
            buf = torch.empty(min(self.chunk_size, d), cfg.input_size, dtype=torch.float32)
        else:
            steps: list[torch.Tensor] = []
            hs: list[list[torch.Tensor]] = [[] for _ in range(cfg.layers)]
            cs: list[list[torch.Tensor]] = [[] for _ in range(cfg.layers)]
        for s in range(0, d, self.chunk_size):
            e = min(s + self.chunk_size, d)
            x, a = self._inputs(slots[:, s:e], present, loss_feat,
                                buf[: e - s] if inplace else None)
            for layer in range(cfg.layers):
                h = state.h[layer, s:e]
                if lstm:
                    out = (new_h[layer, s:e], new_c[layer, s:e]) if inplace else None
                    x, c = lstm_cell(x, h, state.c[layer, s:e], weights[layer], out)
                    if not inplace:
                        cs[layer].append(c)
                else:
                    x = gru_cell(x, h, weights[layer], new_h[layer, s:e] if inplace else None)
                if not inplace:
                    hs[layer].append(x)
            o = torch.addmm(net.b_out, x, net.w_out).squeeze(1)  # (B,)
            if cfg.output == "paper":
                o = o * a  # Ji §4.2 postprocessing: θ_i update × A_i
            o = cfg.scale * torch.where(a > 0, o, torch.zeros_like(o))  # A_i = 0 → no step
            if inplace:
                step[s:e] = o
            else:
                steps.append(o)
        if inplace:
            return step, RNNState(new_h, new_c)
        h_all = torch.stack([torch.cat(c) for c in hs])
        c_all = torch.stack([torch.cat(c) for c in cs]) if lstm else None
        return torch.cat(steps), RNNState(h_all, c_all)

    def __repr__(self) -> str:
        c = self.config
        return (f"RNNAggregator({c.kind}, cell={c.cell}, hidden={c.hidden}, layers={c.layers}, "
                f"M={c.num_workers}, output={c.output})")
