"""The RNN aggregator's meta-parameters: a stacked LSTM/GRU shared by every coordinate.

    config = RNNConfig(num_workers=10, cell="lstm")
    net = CoordinateRNN(config, seed=0)
    h, c = lstm_cell(x, h, c, net.fused_weights()[0])     # one layer, a batch of coordinates

Coordinates are the batch dimension, so a step over d coordinates is a few batched
matmuls per layer (Ji et al. 2019 §4.1: 2 layers of 20 units, LSTM or GRU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from metagg.aggregators.prodigy import DEFAULT_COEF
from metagg.config.engine import Section, option
from metagg.config.meta import CELLS, OUTPUT_RULES

__all__ = ["CELLS", "OUTPUT_RULES", "CoordinateRNN", "RNNConfig", "gru_cell", "lstm_cell"]


@dataclass(frozen=True)
class RNNConfig(Section):
    """What defines a learned RNN aggregator (saved beside its weights).

    Attributes:
        num_workers: M; the input has one slot per worker (missing workers → zeros).
        cell: "lstm" or "gru" (Ji §4.1 uses both; 2 layers, 20 units).
        hidden: hidden units per layer.
        layers: stacked recurrent layers.
        output: "normalized" (default, no ×A_i, log A_i fed as an input),
            "paper" (Ji §4.2: step = scale·o·A_i) or "prodigy" (step = D·(u + scale·o):
            a learned correction on mean aggregation + Prodigy, whose direction u is fed
            as an input; no input depends on the gradients' scale. See
            `metagg.aggregators.prodigy`).
        arnn: feed the M trusted-sample loss features (Ji §4.3).
        p: clamp threshold e^{-p} on |g/A| and floor of the log-norm feature (L2L: 10).
        scale: output scale (L2L: 0.1).
        clamp_sign: True → |g| < e^{-p} becomes sign(g)·e^{-p}; False → +e^{-p} as Ji writes.
        probe_lr: ARNN probe step: worker m is scored by the loss of θ − probe_lr·g_m.
        loss_scale: ARNN feature asinh(relative loss change / loss_scale).
        prodigy_coef: output "prodigy": Prodigy's d_coef (its distance estimate × coef).
    """

    num_workers: int = option(ge=1)
    cell: str = option("lstm", choices=CELLS)
    hidden: int = option(20, ge=1)
    layers: int = option(2, ge=1)
    output: str = option("normalized", choices=OUTPUT_RULES)
    arnn: bool = False
    p: float = option(10.0, gt=0)
    scale: float = option(0.1, gt=0)
    clamp_sign: bool = True
    probe_lr: float = option(1.0, gt=0)
    loss_scale: float = option(0.1, gt=0)
    prodigy_coef: float = option(DEFAULT_COEF, gt=0)

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
        if self.output == "prodigy":
            names.append("prodigy_dir")
        return names

    def to_dict(self) -> dict:
        return asdict(self)



class CoordinateRNN(nn.Module):
    """The meta-parameters φ: a stacked LSTM/GRU and a linear head, shared by coordinates.

    Weights are stored input-major so a chunk is `x @ w`: layer l has
    `w_ih[l]` [in_l, G·H], `w_hh[l]` [H, G·H], `b_ih[l]`, `b_hh[l]` [G·H] with
    PyTorch's gate order (LSTM i, f, g, o with G=4; GRU r, z, n with G=3), i.e. the
    transposes of `nn.LSTMCell` / `nn.GRUCell` weights. Head: `w_out` [H, 1], `b_out` [1].
    Initialisation: U(−1/√H, 1/√H) for everything, as PyTorch's RNN cells, seeded (the
    head zero under output "prodigy", so that the untrained aggregator is mean + Prodigy).
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
        if config.output == "prodigy":  # start as mean aggregation + Prodigy exactly
            with torch.no_grad():
                self.w_out.zero_()
                self.b_out.zero_()

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
