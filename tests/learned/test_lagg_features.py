"""Ada features of LAgg-A / LOpt-A against a slow per-element reference written from the spec."""

from __future__ import annotations

import math

import pytest
import torch

from metagg.layout import ParamLayout
from metagg.learned.features import (
    ADA_FEATURE_NAMES,
    FEATURE_NAMES,
    TIMESCALES,
    FeaturePlan,
    build_features,
    decays_from_offsets,
    feature_names,
    init_ada_state,
    nominal_decays,
    time_features,
    update_ada_state,
)

# conv kernel (seen as [4, 12]), bias, matrix, scalar
SHAPES = {"conv": (4, 3, 2, 2), "bias": (4,), "lin": (5, 7), "scale": ()}
MOM, FAC = (0.9, 0.99, 0.999), (0.9, 0.99, 0.999)


def reference_features(shapes: dict, gs: list[torch.Tensor], params: torch.Tensor,
                       normalize: bool = True) -> torch.Tensor:
    """The spec's table, element by element in float64 Python: returns [d, 27] normalised
    Ada channels after accumulating every ḡ in `gs` (the last is this round's)."""
    rows_out, offset = [], 0
    for shape in shapes.values():
        n = math.prod(shape)
        fac = len(shape) >= 2
        nr, nc = (shape[0], n // shape[0]) if fac else (None, None)
        m = [[0.0] * n for _ in MOM]
        r = [0.0] * n
        vr = [[0.0] * nr for _ in FAC] if fac else None
        vc = [[0.0] * nc for _ in FAC] if fac else None
        v = [[0.0] * n for _ in FAC]
        for g_all in gs:
            g = g_all[offset:offset + n].double().tolist()
            for j, b in enumerate(MOM):
                for i in range(n):
                    m[j][i] = b * m[j][i] + (1 - b) * g[i]
            for i in range(n):
                r[i] = 0.999 * r[i] + 0.001 * g[i] ** 2
            for j, b in enumerate(FAC):
                if fac:
                    for a in range(nr):
                        mean = sum(g[a * nc + c] ** 2 + 1e-30 for c in range(nc)) / nc
                        vr[j][a] = b * vr[j][a] + (1 - b) * mean
                    for c in range(nc):
                        mean = sum(g[a * nc + c] ** 2 + 1e-30 for a in range(nr)) / nr
                        vc[j][c] = b * vc[j][c] + (1 - b) * mean
                else:
                    for i in range(n):
                        v[j][i] = b * v[j][i] + (1 - b) * (g[i] ** 2 + 1e-30)
        p = params[offset:offset + n].double().tolist()
        table = []
        for i in range(n):
            rs = 1 / math.sqrt(r[i] + 1e-6)
            if fac:
                a, c = divmod(i, nc)
                row = [vr[j][a] for j in range(3)]
                col = [vc[j][c] for j in range(3)]
                rf = [1 / math.sqrt(max(vr[j][a] / (sum(vr[j]) / nr + 1e-9), 1e-9))
                      for j in range(3)]
                cf = [1 / math.sqrt(max(vc[j][c], 1e-9)) for j in range(3)]
                fac_g = [g[i] * rf[j] * cf[j] for j in range(3)]
                fac_m = [m[j][i] * rf[j] * cf[j] for j in range(3)]
            else:
                row = col = [v[j][i] for j in range(3)]
                fac_g = [g[i] / math.sqrt(max(v[j][i] + 1e-9, 1e-9)) for j in range(3)]
                fac_m = [m[j][i] / math.sqrt(v[j][i] + 1e-6) for j in range(3)]
            table.append([
                p[i], *(m[j][i] for j in range(3)), r[i],
                *(m[j][i] * rs for j in range(3)), rs, *fac_g, *row, *col,
                *(1 / math.sqrt(x + 1e-8) for x in row), *(1 / math.sqrt(x + 1e-8) for x in col),
                *fac_m,
            ])
        t = torch.tensor(table, dtype=torch.float64).reshape(n, 27)
        if normalize:  # per tensor, per channel
            t = t / torch.sqrt(1e-5 + t.square().mean(0, keepdim=True))
        rows_out.append(t)
        offset += n
    return torch.cat(rows_out)


def run_rounds(shapes: dict, rounds: int, scale: float = 1.0, seed: int = 0):
    layout = ParamLayout.from_shapes(shapes)
    plan = FeaturePlan.from_layout(layout)
    gen = torch.Generator().manual_seed(seed)
    # different scales per tensor, so per-tensor normalisation matters
    tensor_scale = torch.cat([torch.full((s.numel,), 10.0 ** (i - 1)) for i, s in
                              enumerate(layout)])
    state, gs = init_ada_state(plan), []
    for _ in range(rounds):
        g = scale * tensor_scale * torch.randn(layout.size, generator=gen)
        gs.append(g)
        state = update_ada_state(state, g, plan, nominal_decays())
    params = torch.randn(layout.size, generator=gen)
    feats = build_features(state, gs[-1], params, gs[-1][None], plan, round_index=rounds - 1)
    return layout, plan, state, gs, params, feats


@pytest.mark.parametrize("rounds", [1, 4])
def test_features_match_per_element_reference(rounds):
    layout, _, state, gs, params, feats = run_rounds(SHAPES, rounds)
    x = feats.matrix()
    assert x.shape == (layout.size, 39)
    want = reference_features(SHAPES, gs, params)
    torch.testing.assert_close(x[:, 1:28].double(), want, rtol=2e-4, atol=2e-5)
    g = gs[-1].double()  # channel 0: ḡ, normalised per tensor
    for spec in layout:
        gt = g[spec.slice]
        torch.testing.assert_close(x[spec.slice, 0].double(),
                                   gt / torch.sqrt(1e-5 + gt.square().mean()),
                                   rtol=1e-5, atol=1e-6)
    assert int(state.t) == rounds


@pytest.mark.parametrize("shapes", [{"v": (9,)}, {"w": (6, 5)}, {"k": (3, 2, 3, 3)}])
def test_each_kind_of_tensor_alone(shapes):
    _, _, _, gs, params, feats = run_rounds(shapes, 3, seed=1)
    torch.testing.assert_close(feats.matrix()[:, 1:28].double(),
                               reference_features(shapes, gs, params), rtol=2e-4, atol=2e-5)


def test_factored_accumulator_shapes():
    layout = ParamLayout.from_shapes(SHAPES)
    plan = FeaturePlan.from_layout(layout)
    state = init_ada_state(plan)
    assert state.m.shape == (3, layout.size) and state.r.shape == (layout.size,)
    assert state.v_row.shape == (3, 4 + 5)  # conv rows (out channels) + lin rows
    assert state.v_col.shape == (3, 12 + 7)  # conv: in·kh·kw
    assert state.v.shape == (3, 4 + 1)  # bias + scalar, unfactored


def test_normalised_channels_have_unit_mean_square_per_tensor():
    """mean(x̂²) = mean(x²) / (1e-5 + mean(x²)) per tensor and channel: ≈ 1 unless the raw
    channel is tiny (e.g. rsqrt(r) when ḡ is large)."""
    layout, _, _, gs, params, feats = run_rounds(SHAPES, 3)
    raw = reference_features(SHAPES, gs, params, normalize=False)  # [d, 27]
    x = feats.normalized[1:]  # [27, d], the Ada channels
    big = 0
    for spec in layout:
        ms = x[:, spec.slice].double().square().mean(1)
        raw_ms = raw[spec.slice].square().mean(0)
        torch.testing.assert_close(ms, raw_ms / (1e-5 + raw_ms), rtol=1e-4, atol=1e-6)
        ok = raw_ms > 1e-2
        big += int(ok.sum())
        torch.testing.assert_close(ms[ok], torch.ones_like(ms[ok]), rtol=0, atol=1e-3)
    assert big > 60  # most channels are well above the epsilon


def test_time_features_are_unnormalised_and_equal_everywhere():
    want0 = torch.tensor([math.tanh(-1.0)] * 11)
    torch.testing.assert_close(time_features(0), want0)
    t = 37
    want = torch.tensor([math.tanh(t / tau - 1) for tau in TIMESCALES])
    torch.testing.assert_close(time_features(t), want)
    _, _, _, _, _, feats = run_rounds(SHAPES, 4)
    x = feats.matrix()
    assert torch.equal(x[:, 28:], time_features(3).expand(x.shape[0], -1))


def test_feature_names_fixed_order_and_width():
    assert len(ADA_FEATURE_NAMES) == 27 and len(FEATURE_NAMES) == 39
    assert FEATURE_NAMES[:3] == ("g", "p", "m_0.9")
    assert FEATURE_NAMES[-1] == "time_100000"
    names8 = feature_names(8)
    assert len(names8) == 46 and names8[:2] == ("delta_0", "delta_1")
    assert len(set(names8)) == 46 and len(set(FEATURE_NAMES)) == 39


def test_meta_learned_decays_start_at_nominal():
    torch.testing.assert_close(decays_from_offsets(torch.zeros(7)), nominal_decays())
    b = decays_from_offsets(torch.full((7,), 0.1))
    assert bool((b < nominal_decays()).all())


def test_update_does_not_modify_old_state():
    plan = FeaturePlan.from_layout(ParamLayout.from_shapes(SHAPES))
    s0 = init_ada_state(plan)
    s1 = update_ada_state(s0, torch.ones(plan.size), plan, nominal_decays())
    assert float(s0.m.abs().sum()) == 0 and float(s1.m.abs().sum()) > 0
    assert int(s0.t) == 0 and int(s1.t) == 1
