"""The coordinatewise RNN / ARNN aggregator of Ji et al. (2019).

    from metagg.learned import load_aggregator
    agg = load_aggregator("runs/rnn-digits")          # or aggregator "rnn:PATH" in a config
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
    output="prodigy":     step_i = D · (u_i + scale · o_i), D and u_i from mean aggregation
                          + Prodigy (`metagg.aggregators.prodigy`; u_i is an input
                          instead of log A_i)

`normalized` is the stronger variant: with ×A_i the step is proportional to the
gradient spread, so the aggregator behaves like SGD and cannot normalise step
sizes per coordinate (see /work/shared/specs/rnn-aggregator.md).

Sign: o_i points like a gradient, as metagg updates do; the server applies
θ ← θ − step. L2L writes θ ← θ + out, i.e. out = −scale·o (the same family of
functions with the head negated).

References: Ji, Chen, Wang, Yu, Li, "Learning to Learn Gradient Aggregation by
Gradient Descent", IJCAI 2019. Andrychowicz et al., "Learning to learn by
gradient descent by gradient descent", NeurIPS 2016 (L2L; where Ji is silent).

The server's step (`RNNAggregator.step` under no_grad) runs in place, chunk by chunk,
into preallocated buffers (1.3-3× faster than out of place, measured at d = 1e5-1e6);
meta-training's step (`differentiable=True` with autograd on) builds the graph. Both
share the input features (`metagg.learned.features`) and the cells (`.cells`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from metagg.aggregators.base import Aggregator, RoundContext, worker_slots
from metagg.aggregators.prodigy import ProdigyState, init_prodigy, prodigy_update
from metagg.layout import ParamLayout
from metagg.learned.features import (
    gradient_features,
    graph_of,
    log_norm_feature,
    loss_features,
)
from metagg.learned.rnn.cells import CoordinateRNN, RNNConfig, gru_cell, lstm_cell

__all__ = ["DEFAULT_CHUNK", "RNNAggregator", "RNNState"]

DEFAULT_CHUNK = 32768  # coordinates per chunk: ~10 MB of gate activations, fast on 2 cores


class RNNState(NamedTuple):
    """Per-run state: one hidden (and, for LSTM, cell) vector per layer and coordinate."""

    h: torch.Tensor  # [layers, d, hidden]
    c: torch.Tensor | None  # [layers, d, hidden] for LSTM; None for GRU
    base: ProdigyState | None = None  # output "prodigy": the base step's state

    def detach(self) -> RNNState:
        """Cut the graph (truncated BPTT)."""
        base = None if self.base is None else ProdigyState(*(t.detach() for t in self.base))
        return RNNState(self.h.detach(), None if self.c is None else self.c.detach(), base)



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
        return RNNState(torch.zeros(shape), torch.zeros(shape) if cfg.cell == "lstm" else None,
                        init_prodigy(layout.size) if cfg.output == "prodigy" else None)

    def step(
        self, state: RNNState, updates: torch.Tensor, ctx: RoundContext
    ) -> tuple[torch.Tensor, RNNState]:
        """Return (step [d], new state); the server applies θ ← θ − step."""
        cfg = self.config
        self._check(state, updates, ctx)
        updates = updates.detach()  # dashed edges: no meta-gradient through the workers
        slots, present = worker_slots(updates, ctx.worker_ids, cfg.num_workers)
        loss_feat = None
        if cfg.arnn:
            loss_feat = loss_features(ctx.trusted, ctx.params, slots, present,
                                      probe_lr=cfg.probe_lr, loss_scale=cfg.loss_scale)
        base = self._base(state, slots, present, ctx)
        if self.differentiable and torch.is_grad_enabled():
            step, new_state = self._run_differentiable(state, slots, present, loss_feat, base)
        else:
            with torch.no_grad():
                step, new_state = self._run_inplace(state, slots, present, loss_feat, base)
        return step.to(updates.dtype), new_state._replace(base=base[2] if base else None)

    def _base(self, state: RNNState, slots: torch.Tensor, present: torch.Tensor | None,
              ctx: RoundContext) -> tuple[torch.Tensor, torch.Tensor, ProdigyState] | None:
        """Output "prodigy": (u [d], D, new base state) from the mean of the present
        workers' updates at θ; None for the other rules."""
        if self.config.output != "prodigy":
            return None
        if state.base is None:
            raise ValueError(f"{self.name}: output 'prodigy' needs a state from init()")
        if ctx.params is None:
            raise ValueError(f"{self.name}: output 'prodigy' needs the round's params (θ)")
        n = slots.shape[0] if present is None else int(present.sum())
        mean = slots.sum(0) / max(n, 1)  # constant but in the white-box attack
        params = ctx.params if self.differentiable and torch.is_grad_enabled() \
            else ctx.params.detach()
        return prodigy_update(state.base, mean, params, self.config.prodigy_coef)

    def differentiable_step(self, state: RNNState, updates: torch.Tensor,
                            ctx: RoundContext) -> torch.Tensor:
        """The step in the autograd graph of `updates` (φ fixed), for the white-box
        attack: the features are built out of place, with finite gradients."""
        cfg = self.config
        self._check(state, updates, ctx)
        with torch.enable_grad():
            slots, present = worker_slots(updates, ctx.worker_ids, cfg.num_workers)
            loss_feat = None
            if cfg.arnn:
                loss_feat = loss_features(ctx.trusted, ctx.params, slots, present,
                                          probe_lr=cfg.probe_lr, loss_scale=cfg.loss_scale)
            base = self._base(state, slots, present, ctx)
            step, _ = self._run_differentiable(state, slots, present, loss_feat, base,
                                               detach_phi=True)
        return step.to(updates.dtype)

    def _check(self, state: RNNState, updates: torch.Tensor, ctx: RoundContext) -> None:
        self.check_updates(updates, ctx)
        if ctx.num_workers != self.config.num_workers:
            raise ValueError(f"{self.name}: trained for {self.config.num_workers} workers, "
                             f"the round has num_workers={ctx.num_workers}")
        d = updates.shape[1]
        if state.h.shape[1] != d:
            raise ValueError(f"{self.name}: state is for d={state.h.shape[1]}, updates have d={d}")

    def _inputs(self, chunk: torch.Tensor, present: torch.Tensor | None,
                loss_feat: torch.Tensor | None, buf: torch.Tensor | None,
                direction: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RNN inputs [B, input_size] for worker slots [M, B] (and, output "prodigy", the
        base direction u [B]), and A [B]."""
        cfg, m = self.config, self.config.num_workers
        if graph_of(chunk) or (loss_feat is not None and graph_of(loss_feat)):
            return self._inputs_graph(chunk, present, loss_feat, direction)
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
            if direction is not None:  # an input: a constant of the meta-gradient
                x[:, col] = direction
            if loss_feat is not None and not bool(a.all()):
                x.masked_fill_((a == 0)[:, None], 0.0)  # no signal at all: zero input
        return x, a

    def _inputs_graph(self, chunk: torch.Tensor, present: torch.Tensor | None,
                      loss_feat: torch.Tensor | None, direction: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_inputs` out of place, in the autograd graph of the slots (same values)."""
        cfg = self.config
        x, a = gradient_features(chunk, present, p=cfg.p, clamp_sign=cfg.clamp_sign)
        parts = [x]
        if loss_feat is not None:
            parts.append(loss_feat.to(torch.float32).expand(x.shape[0], -1))
        if cfg.output == "normalized":
            parts.append(log_norm_feature(a, cfg.p)[:, None])
        if direction is not None:
            parts.append(direction[:, None])
        x = torch.cat(parts, 1)
        if loss_feat is not None:
            x = x.masked_fill((a == 0)[:, None], 0.0)  # no signal at all: zero input
        return x, a

    def _head(self, x: torch.Tensor, a: torch.Tensor, detach_phi: bool = False,
              direction: torch.Tensor | None = None, d: torch.Tensor | float = 0.0
              ) -> torch.Tensor:
        """The step of a chunk from the top layer's hidden state x [B, H] and A [B] (output
        "prodigy": and the base direction u [B] and step size D)."""
        cfg, net = self.config, self.net
        b_out, w_out = (net.b_out.detach(), net.w_out.detach()) if detach_phi \
            else (net.b_out, net.w_out)
        o = torch.addmm(b_out, x, w_out).squeeze(1)  # (B,)
        if cfg.output == "paper":
            o = o * a  # Ji §4.2 postprocessing: θ_i update × A_i
        o = cfg.scale * torch.where(a > 0, o, torch.zeros_like(o))  # A_i = 0 → no step
        return o if direction is None else d * (direction + o)

    def _run_inplace(self, state: RNNState, slots: torch.Tensor, present: torch.Tensor | None,
                     loss_feat: torch.Tensor | None, base: tuple | None
                     ) -> tuple[torch.Tensor, RNNState]:
        """The server's step: chunk by chunk into preallocated buffers (no autograd)."""
        cfg, d = self.config, slots.shape[1]
        weights = self.net.fused_weights()
        new_h = torch.empty_like(state.h)
        new_c = torch.empty_like(state.c) if state.c is not None else None
        step = torch.empty(d, dtype=torch.float32)
        buf = torch.empty(min(self.chunk_size, d), cfg.input_size, dtype=torch.float32)
        for s in range(0, d, self.chunk_size):
            e = min(s + self.chunk_size, d)
            u = base[0][s:e] if base else None
            x, a = self._inputs(slots[:, s:e], present, loss_feat, buf[: e - s], u)
            for layer in range(cfg.layers):
                h = state.h[layer, s:e]
                if new_c is not None:
                    x, _ = lstm_cell(x, h, state.c[layer, s:e], weights[layer],
                                     (new_h[layer, s:e], new_c[layer, s:e]))
                else:
                    x = gru_cell(x, h, weights[layer], new_h[layer, s:e])
            step[s:e] = self._head(x, a, direction=u, d=base[1] if base else 0.0)
        return step, RNNState(new_h, new_c)

    def _run_differentiable(self, state: RNNState, slots: torch.Tensor,
                            present: torch.Tensor | None, loss_feat: torch.Tensor | None,
                            base: tuple | None = None, *, detach_phi: bool = False
                            ) -> tuple[torch.Tensor, RNNState]:
        """Meta-training's step: the same computation, out of place, in the autograd graph
        of φ (unless `detach_phi`) and the incoming state."""
        cfg, d = self.config, slots.shape[1]
        weights = self.net.fused_weights()
        if detach_phi:
            weights = [tuple(w.detach() for w in layer) for layer in weights]
        steps: list[torch.Tensor] = []
        hs: list[list[torch.Tensor]] = [[] for _ in range(cfg.layers)]
        cs: list[list[torch.Tensor]] = [[] for _ in range(cfg.layers)]
        for s in range(0, d, self.chunk_size):
            e = min(s + self.chunk_size, d)
            u = base[0][s:e] if base else None
            x, a = self._inputs(slots[:, s:e], present, loss_feat, None, u)
            for layer in range(cfg.layers):
                h = state.h[layer, s:e]
                if state.c is not None:
                    x, c = lstm_cell(x, h, state.c[layer, s:e], weights[layer])
                    cs[layer].append(c)
                else:
                    x = gru_cell(x, h, weights[layer])
                hs[layer].append(x)
            steps.append(self._head(x, a, detach_phi, u, base[1] if base else 0.0))
        h_all = torch.stack([torch.cat(h) for h in hs])
        c_all = torch.stack([torch.cat(c) for c in cs]) if state.c is not None else None
        return torch.cat(steps), RNNState(h_all, c_all)

    def __repr__(self) -> str:
        c = self.config
        return (f"RNNAggregator({c.kind}, cell={c.cell}, hidden={c.hidden}, layers={c.layers}, "
                f"M={c.num_workers}, output={c.output})")
