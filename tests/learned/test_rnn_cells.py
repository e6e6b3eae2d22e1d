"""The fused cells against torch.nn's, on both the autograd and the in-place path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metagg.learned.rnn import CoordinateRNN, RNNAggregator, RNNConfig, gru_cell, lstm_cell


def copy_cell(net: CoordinateRNN, layer: int, cell: nn.Module) -> None:
    with torch.no_grad():
        net.w_ih[layer].copy_(cell.weight_ih.T)
        net.w_hh[layer].copy_(cell.weight_hh.T)
        net.b_ih[layer].copy_(cell.bias_ih)
        net.b_hh[layer].copy_(cell.bias_hh)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_cell_equals_torch_cell(cell):
    torch.manual_seed(0)
    cfg = RNNConfig(num_workers=4, cell=cell, layers=1)
    net = CoordinateRNN(cfg, seed=1)
    ref = (nn.LSTMCell if cell == "lstm" else nn.GRUCell)(cfg.input_size, cfg.hidden)
    copy_cell(net, 0, ref)
    x = torch.randn(64, cfg.input_size) * 3
    h, c = torch.randn(64, cfg.hidden), torch.randn(64, cfg.hidden)
    w = net.fused_weights()[0]
    with torch.no_grad():
        wd = tuple(t.detach() for t in w)
        if cell == "lstm":
            want_h, want_c = ref(x, (h, c))
            got_h, got_c = lstm_cell(x, h, c, w)
            ip_h, ip_c = torch.empty_like(h), torch.empty_like(c)
            lstm_cell(x, h, c, wd, (ip_h, ip_c))
            for got in (got_c, ip_c):
                torch.testing.assert_close(got, want_c, atol=1e-6, rtol=1e-5)
        else:
            want_h = ref(x, h)
            got_h = gru_cell(x, h, w)
            ip_h = torch.empty_like(h)
            gru_cell(x, h, wd, ip_h)
    for got in (got_h, ip_h):
        torch.testing.assert_close(got, want_h, atol=1e-6, rtol=1e-5)


def test_autograd_through_fused_lstm_matches_torch():
    torch.manual_seed(0)
    cfg = RNNConfig(num_workers=2, layers=1)
    net = CoordinateRNN(cfg)
    ref = nn.LSTMCell(cfg.input_size, cfg.hidden)
    copy_cell(net, 0, ref)
    x, h, c = torch.randn(8, cfg.input_size), torch.randn(8, 20), torch.randn(8, 20)
    hn, cn = lstm_cell(x, h, c, net.fused_weights()[0])
    (hn.sum() + cn.square().sum()).backward()
    rh, rc = ref(x, (h, c))
    (rh.sum() + rc.square().sum()).backward()
    torch.testing.assert_close(net.w_ih[0].grad, ref.weight_ih.grad.T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(net.b_hh[0].grad, ref.bias_hh.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_whole_step_equals_stack_of_torch_cells(cell, make_ctx):
    """Two layers + head + normalized output rule, against nn cells and the formulas."""
    torch.manual_seed(0)
    m, d = 3, 11
    cfg = RNNConfig(num_workers=m, cell=cell)
    agg = RNNAggregator(cfg, seed=2, chunk_size=4)
    kind = nn.LSTMCell if cell == "lstm" else nn.GRUCell
    cells = [kind(cfg.input_size, 20), kind(20, 20)]
    for i, c in enumerate(cells):
        copy_cell(agg.net, i, c)
    u = torch.randn(m, d)
    state = agg.init(make_ctx(d, m).layout, m)
    step, state = agg.step(state, u, make_ctx(d, m))
    step2, _ = agg.step(state, u, make_ctx(d, m))
    a = u.norm(dim=0)
    x = torch.cat([(u / a).T, (a.log() / 10)[:, None]], 1)
    with torch.no_grad():
        hs = [(torch.zeros(d, 20), torch.zeros(d, 20)) for _ in cells]
        for want in (step, step2):
            inp = x
            for i, c in enumerate(cells):
                hs[i] = c(inp, hs[i]) if cell == "lstm" else (c(inp, hs[i][0]), None)
                inp = hs[i][0]
            out = 0.1 * (inp @ agg.net.w_out + agg.net.b_out).squeeze(1)
            torch.testing.assert_close(want, out, atol=1e-6, rtol=1e-5)
