"""Hardening of metagg.robust (issue 16): no kernel writes to its input, finite input
never gives a silently non-finite output, float32 selects what float64 selects at any
power-of-two scale, Bulyan's incremental selection equals the definition, no numpy
RuntimeWarning leaks from the block threads, and a fuzz test over shapes, layouts,
dtypes and extreme values.

Run: PYTHONPATH=src .venv/bin/python -m pytest tests/test_robust_hardening.py -q
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metagg.robust as R
from metagg.robust import _core, distance

DTYPES = [torch.float32, torch.float64]


def centered_clip(x: torch.Tensor) -> torch.Tensor:
    return R.centered_clip(x, torch.zeros(x.shape[1], dtype=x.dtype), tau=1.0, iters=2)


# f = 1 keeps every rule defined down to n = 5 (bulyan: n >= 4f + 1 with allow_unsafe)
KERNELS = {
    "mean": R.mean,
    "coordinate_median": R.coordinate_median,
    "trimmed_mean": lambda x: R.trimmed_mean(x, 1),
    "krum": lambda x: R.krum(x, 1),
    "multi_krum": lambda x: R.multi_krum(x, 1),
    "geometric_median": R.geometric_median,
    "bulyan": lambda x: R.bulyan(x, 1, allow_unsafe=True),
    "centered_clip": centered_clip,
    "nnm": lambda x: R.nnm(x, 1),
    "bucketing": lambda x: R.bucketing(x, 2, generator=torch.Generator().manual_seed(0)),
    "pairwise_sq_distances": R.pairwise_sq_distances,
}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype, strides and bits (NaN equal to NaN)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.stride() == b.stride()
        and torch.equal(a.view(torch.int32 if a.dtype == torch.float32 else torch.int64),
                        b.view(torch.int32 if b.dtype == torch.float32 else torch.int64))
    )


def snapshot(x: torch.Tensor) -> torch.Tensor:
    """A copy with x's strides, to compare bits and layout after a kernel ran."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(x)


def layouts(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen, dtype=dtype)
    wide = torch.randn(n + 3, 2 * d + 1, generator=gen, dtype=dtype)
    return {
        "contiguous": base,
        "column_major": base.t().contiguous().t(),
        "strided_slice": wide[1 : n + 1, ::2],
        "d1": torch.randn(n, 1, generator=gen, dtype=dtype),
        "d1_column_major": torch.randn(1, n, generator=gen, dtype=dtype).t(),
    }


# --------------------------------------------------------------------------- 1. inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_never_write_to_their_input(name, dtype):
    cases = dict(layouts(7, 6, dtype))
    cases["n1"] = torch.randn(1, 5, dtype=dtype)
    cases["n1_column_major"] = torch.randn(5, 1, dtype=dtype).t()
    for layout, x in cases.items():
        for requires_grad in (False, True):  # numpy fast path / torch path
            before = snapshot(x)
            xi = x.detach().requires_grad_(requires_grad) if requires_grad else x
            try:
                KERNELS[name](xi)
            except ValueError:
                assert x.shape[0] < 5, (name, layout)  # only the n = 1 cases may refuse
            assert bitwise_equal(x, before), (name, layout, requires_grad)


def test_median_of_a_column_major_tensor_leaves_it_alone():
    """The reported case: the sort engine sorted the caller's column in place."""
    x = torch.tensor([[3.0], [1.0], [2.0]])
    assert torch.equal(R.coordinate_median(x), torch.tensor([2.0]))
    assert torch.equal(x, torch.tensor([[3.0], [1.0], [2.0]]))
    y = torch.tensor([[3.0, 5.0], [1.0, 4.0], [2.0, 6.0], [0.0, 9.0]]).t().contiguous().t()
    before = y.clone()
    R.trimmed_mean(y, 1)
    assert torch.equal(y, before)


# --------------------------------------------------------------------------- 2. overflow


def test_mean_of_huge_values_is_finite_and_exact():
    assert torch.equal(R.mean(torch.full((2, 3), 3e38)), torch.full((3,), 3e38))
    x = torch.full((2, 3), 1e308, dtype=torch.float64)
    assert torch.equal(R.mean(x), torch.full((3,), 1e308, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sums_that_overflow_are_recomputed(dtype):
    big = 3e38 if dtype == torch.float32 else 1.7e308
    x = torch.full((9, 4), big, dtype=dtype)
    x[:, 1] *= -1
    x[0, 2] = big / 2
    expected = x[1]
    for name in ("mean", "trimmed_mean", "bulyan", "coordinate_median", "krum",
                 "multi_krum", "geometric_median", "nnm"):
        out = KERNELS[name](x)
        assert bool(torch.isfinite(out).all()), name
        if name == "mean":
            torch.testing.assert_close(out, (x / 16).mean(0) * 16, msg=name)
        elif name == "nnm":  # rows 1.. mix 8 copies of themselves
            torch.testing.assert_close(out[1:], x[1:], msg=name)
        else:
            torch.testing.assert_close(out, expected, msg=name)
    buckets = R.bucketing(x, 3, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([(x[perm[i : i + 3]] / 4).mean(0) * 4 for i in (0, 3, 6)])
    torch.testing.assert_close(buckets, expected)


def test_bulyan_window_with_overflowing_differences():
    """Per coordinate the selected values straddle ±3e38: the differences to the median
    and the window's sum overflow float32; float64 has neither problem."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(11, 6, generator=gen, dtype=torch.float64) * 2 - 1) * 3.3e38
    out = R.bulyan(x.float(), 2)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, R.bulyan(x.float().double(), 2).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unrepresentable_results_raise(dtype):
    big = 1e30 if dtype == torch.float32 else 1e200
    x = torch.tensor([[big, 0.0], [-big, 0.0], [0.0, 1.0]], dtype=dtype)
    with pytest.raises(ValueError, match=f"a squared distance overflows {dtype}"):
        R.pairwise_sq_distances(x)


def test_centered_clip_far_from_a_huge_center():
    x = torch.full((4, 3), -3e38)
    center = torch.full((3,), 3e38)
    out = R.centered_clip(x, center, tau=1e38, iters=1)
    expected = 3e38 - 1e38 / math.sqrt(3)  # each row moves v by τ towards it
    torch.testing.assert_close(out, torch.full((3,), expected), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- 3. scale


def test_krum_float32_does_not_lose_tiny_distances():
    """The reported case: squared distances of 1e-30 underflow float32."""
    x = torch.tensor([[5e-30], [0.0], [1e-30], [2e-30], [1.5e-30]])
    assert torch.equal(R.krum(x.double(), 1), x.double()[4])
    assert torch.equal(R.krum(x, 1), x[4])


SCALE_EXPONENTS = {torch.float32: [-110, -70, 70, 120], torch.float64: [-1000, -600, 600, 1000]}


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_commute_with_powers_of_two(dtype):
    """kernel(x · 2**k) = 2**k · kernel(x) for scales where the squares of x · 2**k would
    underflow or overflow (τ, ν and the center scaled along). Krum-type selections are
    the same rows; everything agrees with the unscaled result up to round-off."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(13, 7, generator=gen, dtype=dtype) * 3
    x[:2] += 20  # two outliers
    center = x[5] * 0.5
    rules = {k: v for k, v in KERNELS.items() if k not in ("centered_clip", "geometric_median",
                                                            "pairwise_sq_distances")}
    for k in SCALE_EXPONENTS[dtype]:
        a = 2.0**k
        xs = x * a
        for name, rule in rules.items():
            torch.testing.assert_close(rule(xs), a * rule(x), rtol=1e-6, atol=0, msg=name)
        assert torch.equal(R.krum(xs, 2), a * R.krum(x, 2))
        torch.testing.assert_close(R.geometric_median(xs, nu=0.1 * a), a * R.geometric_median(x),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(R.centered_clip(xs, center * a, tau=2.0 * a, iters=2),
                                   a * R.centered_clip(x, center, tau=2.0, iters=2),
                                   rtol=1e-5, atol=0)


def test_centered_clip_tiny_tau_and_tiny_distances():
    """τ and the distances near 1e-30: float32 squares underflow; float64 ones do not."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=gen, dtype=torch.float64) * 1e-31
    center = torch.zeros(50, dtype=torch.float64)
    expected = R.centered_clip(x, center, tau=2e-31, iters=2)
    out = R.centered_clip(x.float(), center.float(), tau=2e-31, iters=2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- 4. Bulyan


def reference_selection(dist: torch.Tensor, f: int, theta: int) -> list[int]:
    """Repeated Krum as the paper writes it: each round re-scores every remaining row
    (its k smallest distances to the other remaining rows, summed left to right) and
    removes the least score, ties to the lowest index."""
    dist_np = dist.double().numpy()
    n = len(dist_np)
    alive, chosen = list(range(n)), []
    for r in range(theta):
        k = max(n - r - f - 2, 0)
        scores = {}
        for i in alive:
            near = np.sort(dist_np[i, [j for j in alive if j != i]])[:k]
            scores[i] = float(np.cumsum(near)[-1]) if k else 0.0
        best = min(alive, key=lambda i: (scores[i], i))
        chosen.append(best)
        alive.remove(best)
    return chosen


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(5, 40), st.integers(0, 2**32 - 1), st.booleans(), st.data())
def test_bulyan_selection_matches_the_definition(n, seed, ties, data):
    f = data.draw(st.integers(0, (n - 1) // 4))
    rng = np.random.default_rng(seed)
    if ties:  # a few dyadic rows, repeated: tied scores everywhere, exact arithmetic
        pool = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=(rng.integers(1, n + 1), 3))
        x = torch.tensor(pool[rng.integers(0, len(pool), n)])
    else:
        x = torch.tensor(rng.standard_normal((n, 4)) * 10.0 ** rng.integers(-3, 4))
    dist = R.pairwise_sq_distances(x)
    theta = n - 2 * f
    assert distance._bulyan_selection(dist, f, theta) == reference_selection(dist, f, theta)


def test_bulyan_selection_at_n_200_matches_the_definition():
    gen = torch.Generator().manual_seed(5)
    n, f = 200, 49
    x = torch.randn(n, 10, generator=gen, dtype=torch.float64)
    x[:f] = 4 * torch.randn(f, 10, generator=gen, dtype=torch.float64) + 1
    dist = R.pairwise_sq_distances(x)
    expected = reference_selection(dist, f, n - 2 * f)
    assert distance._bulyan_selection(dist, f, n - 2 * f) == expected


# --------------------------------------------------------------------------- 5. warnings


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("two_threads")
def test_no_runtime_warning_escapes_the_block_threads(dtype, blocks, monkeypatch):
    """np.errstate is per thread: the kernels' block threads must set their own. Default
    blocks need d = 300 000 for several Gram blocks at n = 7; small ones cut d = 2 000
    into 8 blocks of 256 columns for every engine."""
    d = 300_000 if blocks == "default" else 2_000
    if blocks == "small":
        monkeypatch.setattr(_core, "_BLOCK_ELEMS", 8)
        monkeypatch.setattr(_core, "_GRAM_BLOCK_ELEMS", 8)
    big = 3e38 if dtype == torch.float32 else 1.7e308
    gen = torch.Generator().manual_seed(0)
    bad = torch.randn(7, d, generator=gen, dtype=dtype)
    bad[1, 5], bad[3, d - 9], bad[0, d - 9] = math.inf, -math.inf, math.inf
    bad[4, d // 3] = math.nan
    huge = torch.randn(7, d, generator=gen, dtype=dtype) * (big / 8)  # squares, sums overflow
    for x, finite in ((bad, False), (huge, True)):
        for name, rule in KERNELS.items():
            with warnings.catch_warnings(), np.errstate(all="raise"):
                warnings.simplefilter("error")
                try:
                    out = rule(x)
                except ValueError as err:
                    if finite and name == "pairwise_sq_distances":
                        continue  # the squared distances themselves do not fit
                    assert not finite and "NaN/Inf in rows [0, 1, 3, 4]" in str(err), name
                    continue
                assert finite and bool(torch.isfinite(out).all()), name


def test_nonfinite_error_names_at_most_ten_rows():
    x = torch.randn(300, 4)
    x[::2, 1] = math.nan  # 150 bad rows
    with pytest.raises(ValueError) as err:
        R.mean(x)
    message = str(err.value)
    assert "\n" not in message and len(message) < 150, message
    assert "rows [0, 2, 4, 6, 8, 10, 12, 14, 16, 18] … and 140 more (150 of 300 rows)" in message


# --------------------------------------------------------------------------- 6. fuzz


@st.composite
def extreme_inputs(draw):
    """[n, d] tensors of any layout holding normal, huge, tiny and zero values, a quarter
    of them with NaN/Inf in a few rows."""
    n, d = draw(st.integers(1, 12)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from(DTYPES))
    huge = [1e38, 3e38] + ([1e300, 1.7e308] if dtype == torch.float64 else [])
    kinds = st.sampled_from(["normal", "normal", "huge", "tiny", "mixed", "zero"])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, d))
    for i in range(n):  # one kind of value per row, so rows differ in scale
        kind = draw(kinds)
        sign = rng.choice([-1.0, 1.0], size=d)
        if kind == "huge":
            x[i] = sign * draw(st.sampled_from(huge)) * rng.uniform(0.5, 1.0, d)
        elif kind == "tiny":
            x[i] *= 1e-30
        elif kind == "mixed":
            x[i, rng.integers(0, d)] = sign[0] * draw(st.sampled_from(huge))
        elif kind == "zero":
            x[i] = 0.0
    if draw(st.integers(0, 3)) == 0:
        for i in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3)):
            x[i, rng.integers(0, d)] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    t = torch.tensor(x, dtype=dtype)
    layout = draw(st.sampled_from(["contiguous", "column_major", "strided"]))
    if layout == "column_major":
        t = t.t().contiguous().t()
    elif layout == "strided":
        wide = torch.zeros(n + 2, 2 * d, dtype=dtype)
        wide[1 : n + 1, ::2] = t
        t = wide[1 : n + 1, ::2]
    return t


def fuzz_rules(f: int, n: int, dtype: torch.dtype, scale: float):
    """Every kernel, with f and the absolute scales τ (clipping) and ν (smoothing) drawn."""
    center = torch.zeros(1, dtype=dtype)  # expanded to d below
    return {
        "mean": R.mean,
        "coordinate_median": R.coordinate_median,
        "trimmed_mean": lambda x: R.trimmed_mean(x, f),
        "krum": lambda x: R.krum(x, f),
        "multi_krum": lambda x: R.multi_krum(x, f, allow_unsafe=True),
        "geometric_median": lambda x: R.geometric_median(x, iters=3, nu=scale),
        "bulyan": lambda x: R.bulyan(x, f),
        "centered_clip": lambda x: R.centered_clip(x, center.expand(x.shape[1]), tau=scale,
                                                   iters=2),
        "nnm": lambda x: R.nnm(x, f),
        "bucketing": lambda x: R.bucketing(x, max(f, 1)),
        "pairwise_sq_distances": R.pairwise_sq_distances,
    }


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extreme_inputs(), st.integers(-1, 12), st.booleans(),
       st.sampled_from([1e-30, 0.1, 10.0, 1e30]))
def test_fuzz_kernels_never_modify_input_and_never_return_nonfinite(x, f, torch_path, scale):
    """Every kernel returns all-finite values or raises ValueError — no other exception,
    no warning — and leaves x's bits alone, on the numpy path and on the torch path
    (taken by inputs that need autograd, as by other devices)."""
    n = x.shape[0]
    f = min(f, n)
    before = snapshot(x)
    xi = x.detach().requires_grad_(True) if torch_path else x  # same storage
    for name, rule in fuzz_rules(f, n, x.dtype, scale).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                out = rule(xi)
            except ValueError:
                pass
            else:
                assert bool(torch.isfinite(out).all()), name
        assert bitwise_equal(x, before), name
