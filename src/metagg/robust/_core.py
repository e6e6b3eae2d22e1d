"""Shared machinery of the robust kernels: validation, the Gram matrix, the sort engine.

Nothing here is public API; :mod:`metagg.robust` re-exports the kernels.

Two numerical choices every kernel relies on (2-core AMD EPYC, float32, n=100,
d=1e6, memory floor ``x.sum(0)`` ≈ 22 ms; ``benchmarks/robust.py --choices``):

* **Distances come from one centred Gram product.** ``‖x_i − x_j‖² = G_ii + G_jj −
  2 G_ij`` with ``G = y yᵀ``, ``y = x − x_k`` for a central row k (:func:`anchor_row`),
  combined in float64 on the small ``[n, n]`` matrix, clamped at 0, zero diagonal. On
  CPU the product is numpy's ``b @ b.T`` on centred column blocks, which OpenBLAS runs
  as ``syrk`` (half the flops), one BLAS thread per block thread (:func:`blas_blocks`):
  ~100 ms, like one uncentred ``a @ a.T`` (104 ms); ``torch.mm`` (MKL) took 170 ms, a
  float64 product ~1 s with the cast, ``torch.cdist`` ~950 ms. Centring is what makes
  float32 enough: uncentred, round-off is ~2e-6 · max ‖x_i‖² (4.6 on squared distances
  of 2e6 at d=1e6, 160 when ‖x_i‖² ≈ 1e7), which swamps the distances inside a tight
  honest cluster; centred, it scales with the distances around x_k, and copies of x_k
  are exactly 0 apart on any BLAS.
* **Order statistics come from numpy's vectorised sort.** numpy ≥ 2 sorts contiguous
  float rows with x86-simd-sort (AVX2/AVX-512). Measured: ``torch.median(dim=0)``
  1.2 s, ``torch.sort(dim=0)`` 2.4 s, ``torch.kthvalue`` 1.4 s, ``torch.topk`` 1.6 s,
  ``np.partition(axis=0)`` 1.6 s (2.0 s with the trimmed mean's two kth; introselect,
  no SIMD path), ``np.sort(axis=0)`` 0.41 s, ``np.sort`` of pre-transposed rows 0.28 s
  plus 0.12 s for the transpose. So CPU tensors are cut into ~1 MiB column blocks,
  each transposed to ``[c, n]`` in cache, sorted in place and reduced at once, blocks
  spread over ``torch.get_num_threads()`` threads (numpy releases the GIL): 0.18 s
  (0.37 s on one thread). Other devices, and tensors that need autograd, use
  ``torch.sort(dim=0)``; the reductions are the same torch code on both paths.

Two safety rules hold everywhere: no kernel writes to its input (the sort engine always
sorts its own copy), and finite input never yields a silently non-finite output. Values
are brought into range by powers of two, which are exact factors: the centred values are
rescaled before they are squared when their magnitude is far from 1 (:func:`gram`), and a
sum that overflowed is recomputed on ``x / 2**e`` (:func:`rescaled`, per block in
:func:`sort_reduce`) and multiplied back; only a result that itself does not fit the
dtype raises (:func:`overflow_error`). Both checks look at small things the kernel
already has (the Gram diagonal, the sorted extremes, the output), so normal inputs take
the same path as before.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64)
T = TypeVar("T")

# A reducer maps values sorted along `dim` (the worker axis) to one value per coordinate.
Reducer = Callable[[Tensor, int], Tensor]

# Column-block size of the CPU sort engine: ~256 K elements per block (1 MiB of
# float32) measured best on 2 cores for n in {10, 100} (see benchmarks/robust.py).
_BLOCK_ELEMS = 1 << 18
# Column-block size of the CPU Gram product: ~1 M elements (4 MiB of float32) per block
# and thread. Module constants so that tests can force several blocks on small inputs.
_GRAM_BLOCK_ELEMS = 1 << 20

# Centred values whose sampled magnitude has a binary exponent within ±this are squared
# as they are: float32 products then stay below 2**64 · d (no overflow) and differences
# down to eps · max square to normal numbers (>= 2**-112), so rescaling would change
# nothing that matters; others are rescaled by a power of two first (see gram).
_SAFE_EXPONENT = {torch.float32: 32, torch.float64: 400}

# Rows named in a NaN/Inf error; the rest are counted.
_MAX_ROWS_NAMED = 10


# --------------------------------------------------------------------------- validation


def check_x(x: object, rule: str) -> Tensor:
    """Check that ``x`` is a non-empty 2-D float32/float64 tensor; return it."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{rule}: x must be a torch.Tensor [n, d], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{rule}: x must be 2-D [n, d] (n workers), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{rule}: x has no rows (n == 0): nothing to aggregate")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{rule}: x must be float32 or float64, got {x.dtype}")
    return x


def check_vector(v: object, length: int, name: str, rule: str) -> Tensor:
    """Check that ``v`` is a 1-D tensor of ``length`` finite entries; return it."""
    if not isinstance(v, Tensor) or tuple(v.shape) != (length,):
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{rule}: {name} must be a tensor of shape ({length},), got {got}")
    if not (bool(torch.isfinite(v.sum())) or bool(torch.isfinite(v).all())):
        raise ValueError(f"{rule}: {name} contains NaN/Inf")
    return v


def check_int(value: object, name: str, rule: str, minimum: int = 0) -> int:
    """Check that ``value`` is an int (not a bool) ``>= minimum``; return it as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{rule}: {name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{rule}: {name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_positive(value: float, name: str, rule: str, allow_inf: bool = False) -> float:
    """Check that ``value`` is a real number > 0 (finite unless ``allow_inf``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0
    if not ok or not (allow_inf or math.isfinite(value)):
        kind = "a float > 0" if allow_inf else "a finite float > 0"
        raise ValueError(f"{rule}: {name} must be {kind}, got {value!r}")
    return float(value)


def check_guarantee(ok: bool, allow_unsafe: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` or the caller allowed unsafe use."""
    if not ok and not allow_unsafe:
        raise ValueError(f"{message} (pass allow_unsafe=True to compute it anyway)")


def raise_if_nonfinite(x: Tensor, rule: str) -> None:
    """Scan ``x`` row by row; raise naming the rows that hold NaN/Inf.

    Kernels call this only when a cheap probe (a sum, the Gram diagonal, the extremes of
    a sort) was not finite, so the full scan is off the hot path. Returns normally when
    no entry is NaN/Inf (the probe overflowed on finite values).
    """
    bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        rows = str(bad[:_MAX_ROWS_NAMED])
        if len(bad) > _MAX_ROWS_NAMED:  # one line, whatever n is
            rows += f" … and {len(bad) - _MAX_ROWS_NAMED} more ({len(bad)} of {len(x)} rows)"
        raise ValueError(f"{rule}: x contains NaN/Inf in rows {rows}")


def check_probe(probe: Tensor, x: Tensor, rule: str) -> None:
    """Raise on NaN/Inf in ``x`` when ``probe`` — a quantity that is non-finite whenever
    ``x`` is (its mean, its squared norms, its extreme sorted values) — is not finite.

    The probe is summed first: one reduction, whereas ``isfinite(t).all()`` allocates a
    mask (it took 400 ms on a [100, 1e6] tensor). Finite data whose probe sum overflowed
    goes through the exact scan and passes.
    """
    if not bool(torch.isfinite(probe.sum())):
        raise_if_nonfinite(x, rule)


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one sum, and the exact (mask) test only
    when that sum is not finite (it may overflow on finite values)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


# --------------------------------------------------------------------------- scaling


def pow2_exponent(m: float, dtype: torch.dtype, extra: int = 0) -> int:
    """``e`` with ``m · 2**e`` in ``[0.5, 1)`` (``[2**-extra / 2, 2**-extra)`` with
    ``extra``) for a finite ``m > 0``, clamped so that ``2**e`` is a normal number of
    ``dtype``: multiplying by it is exact (barring underflow of values far below ``m``)."""
    limit = math.frexp(torch.finfo(dtype).max)[1] - 2  # float32: 126, float64: 1022
    return max(-limit, min(limit, -math.frexp(m)[1] - extra))


def headroom_exponent(count: int) -> int:
    """``e`` with ``2**e >= 2 · count``: a sum of ``count`` values of the dtype's range,
    divided by ``2**e`` first, cannot overflow (with room for round-off)."""
    return max(1, count).bit_length() + 1


def overflow_error(rule: str, x: Tensor, what: str = "the result") -> ValueError:
    """The error for finite input whose exact ``what`` is too large for x's dtype."""
    top = float(x.detach().abs().max()) if x.numel() else 0.0
    hint = "pass float64 or rescale the updates" if x.dtype != torch.float64 else (
        "rescale the updates")
    return ValueError(
        f"{rule}: {what} overflows {x.dtype} (max |x| = {top:.3g}): it is not "
        f"representable; {hint}"
    )


def rescaled(fn: Callable[[Tensor], Tensor], x: Tensor, rule: str, count: int) -> Tensor:
    """``2**e · fn(x / 2**e)`` for an ``fn`` that commutes with scaling (a weighted sum
    of at most ``count`` rows with weights in [0, 1]), ``2**e >= 2 · count``.

    Called only after ``fn(x)`` came out non-finite on finite ``x``: the sum overflowed,
    the scaled one cannot, and scaling by a power of two changes no rounding. It makes one
    scaled copy of x. Raises :func:`overflow_error` when the result does not fit.
    """
    e = headroom_exponent(count)
    out = fn(x * 2.0**-e) * 2.0**e
    if not all_finite(out):
        raise overflow_error(rule, x)
    return out


# --------------------------------------------------------------------------- numpy fast path


def numpy_ok(x: Tensor) -> bool:
    """Whether ``x`` may go through numpy zero-copy: a CPU tensor that needs no autograd."""
    return (
        x.device.type == "cpu"
        and x.layout == torch.strided
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def work_dtype(x: Tensor) -> torch.dtype:
    """dtype for the small [n, n] algebra: float64 (MPS has none: stay in x's dtype)."""
    return x.dtype if x.device.type == "mps" else torch.float64


@functools.lru_cache(maxsize=4)
def _pool(pid: int, threads: int) -> ThreadPoolExecutor:
    # Keyed by pid: a forked child (DataLoader, multiprocessing) has none of the parent's
    # threads, and reusing the parent's executor there would hang.
    del pid
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="metagg-robust")


def block_size(n: int) -> int:
    """Columns per block so that a ``[n, block]`` block holds ~_BLOCK_ELEMS values."""
    return max(256, _BLOCK_ELEMS // n)


def map_blocks(d: int, block: int, fn: Callable[[int, int], T]) -> list[T]:
    """``[fn(s, e) for each column block [s, e) of range(d)]``, in block order, spread
    over ``torch.get_num_threads()`` threads (``fn`` must release the GIL to gain:
    numpy sorts and ufuncs on large arrays do)."""
    bounds = [(s, min(s + block, d)) for s in range(0, d, block)]
    threads = max(1, min(torch.get_num_threads(), len(bounds)))

    def run(span: list[tuple[int, int]]) -> list[T]:
        # np.errstate is per thread: set it in each worker, or NaN/Inf/overflow in x
        # leaks RuntimeWarnings (FloatingPointError under np.seterr(all="raise")) that
        # the kernels report themselves as one ValueError
        with np.errstate(all="ignore"):
            return [fn(s, e) for s, e in span]

    if threads == 1:
        return run(bounds)
    spans = [bounds[i::threads] for i in range(threads)]  # interleaved: balanced tails
    pool = _pool(os.getpid(), threads)
    per_span = list(pool.map(run, spans))
    out: list[T] = [None] * len(bounds)  # type: ignore[list-item]
    for i, results in enumerate(per_span):
        out[i::threads] = results
    return out


@functools.lru_cache(maxsize=1)
def _blas_controller() -> object | None:
    try:
        from threadpoolctl import ThreadpoolController  # comes with scikit-learn
    except ImportError:  # pragma: no cover - then BLAS calls run one after another
        return None
    return ThreadpoolController()


def blas_blocks(d: int, block: int, fn: Callable[[int, int], T]) -> list[T]:
    """:func:`map_blocks` for ``fn`` that call numpy BLAS: numpy's OpenBLAS is held to one
    thread meanwhile (threadpoolctl) and the blocks go to our threads instead.

    OpenBLAS's own threads spin at barriers inside each call; when other processes share
    the cores this was 5-20x slower (Gram at n=100, d=1e6 under load 5: 7.2 s with
    OpenBLAS threads, 0.33 s with one BLAS thread per block thread). Without
    threadpoolctl the blocks run in this thread and OpenBLAS threads each call.
    """
    controller = _blas_controller()
    if controller is None:  # pragma: no cover
        return [fn(s, min(s + block, d)) for s in range(0, d, block)]
    with controller.limit(limits=1, user_api="blas"):  # type: ignore[attr-defined]
        return map_blocks(d, block, fn)


# --------------------------------------------------------------------------- Gram and distances


def anchor_row(x: Tensor) -> tuple[int, float]:
    """A central row ``k`` of ``x`` and the spread ``max_i ‖x_i − x_k‖`` around it (the
    largest ``|x_ij − x_kj|`` when n <= 2 or the squares underflowed), both on at most
    ~2048 evenly spaced columns: ``k`` is their medoid (least sum of distances to the
    others). ``k`` only centres the Gram product and the spread only picks its scale, so
    poor estimates cost accuracy or a second pass, never correctness. The spread is NaN
    or inf when the sampled values (or, in float64, their squares) are not finite."""
    n, d = x.shape
    if d == 0:
        return 0, 0.0
    sub = x.detach()[:, :: max(1, d // 2048)].to(work_dtype(x))  # float64: float32 squares fit
    if n <= 2:
        return 0, float((sub - sub[0]).abs().max())
    g = sub @ sub.T
    diag = g.diagonal()
    dist = ((diag[:, None] + diag[None, :]) - 2.0 * g).clamp(min=0.0).sqrt()
    k = int(torch.argmin(torch.nan_to_num(dist.sum(dim=1), nan=math.inf)))
    spread = float(dist[:, k].max())
    if spread == 0.0 and not bool((sub == sub[k]).all()):  # float64 squares underflowed
        spread = float((sub - sub[k]).abs().max())
    return k, spread


def _exact_exponent(x: Tensor, k: int) -> int | None:
    """The scale exponent from the exact spread ``max |x − x_k|``, None when every row
    equals x_k (one full pass: only when the sampled estimate turned out wrong)."""
    if x.shape[1] == 0:
        return None
    with torch.no_grad():
        xd = x.detach()
        spread = float((xd - xd[k]).abs().max())
        if spread == 0.0:
            return None
        if math.isfinite(spread):
            return pow2_exponent(spread, x.dtype)
        # the difference itself overflowed: |x_i − x_k| <= 2 max |x|
        return pow2_exponent(float(xd.abs().max()), x.dtype, extra=1)


def _centred_gram(x: Tensor, k: int, e: int) -> Tensor:
    """Gram matrix of ``y = (x − 1 x_kᵀ) · 2**e``, ``[n, n]`` in :func:`work_dtype`.
    The scaling comes first so that the difference cannot overflow either."""
    n, d = x.shape
    scale = 2.0**e
    if numpy_ok(x):
        a = x.detach().numpy()
        anchor = a[k] * scale if e else a[k].copy()
        block = max(256, _GRAM_BLOCK_ELEMS // n)  # 4 MiB of float32 per block and thread
        buffers: dict[int, np.ndarray] = {}

        def work(s: int, e_: int) -> np.ndarray:
            buf = buffers.setdefault(threading.get_ident(), np.empty((n, block), a.dtype))
            b = buf[:, : e_ - s]
            if e:
                np.multiply(a[:, s:e_], scale, out=b)
                b -= anchor[s:e_]
            else:
                np.subtract(a[:, s:e_], anchor[s:e_], out=b)
            return b @ b.T

        g_np = np.zeros((n, n))
        with np.errstate(all="ignore"):  # NaN/Inf/overflow are reported by the caller
            for part in blas_blocks(d, block, work):
                g_np += part
        return torch.from_numpy(g_np).to(work_dtype(x))
    xc = x - x[k] if e == 0 else x * scale - x[k] * scale
    return (xc @ xc.T).to(work_dtype(x))


class Gram(NamedTuple):
    """The centred, rescaled Gram matrix of ``x`` (:func:`gram`)."""

    g: Tensor  # [n, n], work dtype: y yᵀ with y = (x − 1 x_kᵀ) · 2**e
    e: int  # squared distances of x = those of y times 4**-e
    anchor: int  # k, the row subtracted


def gram(x: Tensor, rule: str) -> Gram:
    """Centred, rescaled Gram matrix ``G = y yᵀ``, ``y = (x − 1 x_kᵀ) · 2**e`` for the
    anchor row ``k`` of :func:`anchor_row`, an ``[n, n]`` tensor in :func:`work_dtype`;
    raises on NaN/Inf in ``x`` (found on its diagonal). The squared distances of ``x``
    are those of ``y`` times ``4**-e``; kernels that only compare distances use ``G`` as
    it is.

    Distances are translation invariant, and centring on a central row makes round-off
    scale with the distances among the central rows instead of with ``‖x_i‖²``: honest
    copies of one vector become exact zero rows. The power of two ``2**e`` (exact) brings
    the largest centred value near 1 when it is far from it (:data:`_SAFE_EXPONENT`), so
    squares neither overflow (float32 values above ~1e19) nor underflow (below ~1e-19):
    float32 then selects the rows float64 selects. ``e`` comes from a sample of columns;
    when the diagonal shows it was wrong (an overflow, or all values tiny) the product is
    redone once with ``e`` from the exact spread. CPU: column blocks are centred in a
    per-thread buffer and multiplied with numpy ``b @ b.T`` (OpenBLAS ``syrk``), the
    partial products summed in float64 — one pass over x, no centred copy, see
    :func:`blas_blocks`. Elsewhere: ``torch.mm`` on the centred tensor.
    """
    k, spread = anchor_row(x)
    e = 0
    if math.isfinite(spread) and spread > 0:
        estimate = pow2_exponent(spread, x.dtype)
        if abs(estimate) > _SAFE_EXPONENT[x.dtype]:
            e = estimate
    g = _centred_gram(x, k, e)
    top = float(g.detach().diagonal().max())  # NaN/inf when any entry is (max keeps NaN)
    # After scaling, the largest square is >= 2**(-2 W - 2) unless the sample saw no
    # spread; then tiny or zero squares (n > 1) may have underflowed outside the sample.
    if not math.isfinite(top) or (
        top < 2.0 ** (-2 * _SAFE_EXPONENT[x.dtype] - 2) and len(x) > 1
    ):
        raise_if_nonfinite(x, rule)  # NaN/Inf in x; otherwise the estimate was wrong
        exact = _exact_exponent(x, k)
        if exact is not None:  # else every row is x_k: G = 0 is exact
            e = exact
            g = _centred_gram(x, k, e)
            if not bool(torch.isfinite(g.diagonal()).all()):  # pragma: no cover - |y| <= 4
                raise overflow_error(rule, x, "the squared norms")
    return Gram(g, e, k)


def means_fit(x: Tensor, gr: Gram) -> bool:
    """Whether every mean of rows of ``x`` surely fits x's dtype, from the Gram matrix
    and one row: ``|x_ij| <= |x_kj| + ‖x_i − x_k‖`` (a [d] pass instead of checking an
    [n, d] output)."""
    if x.shape[1] == 0:
        return True
    spread = math.sqrt(float(gr.g.detach().diagonal().max())) * 2.0**-gr.e
    return max_abs(x[gr.anchor]) + spread < torch.finfo(x.dtype).max / 4  # room for round-off


def max_abs(v: Tensor) -> float:
    """``max |v|`` of a non-empty tensor in one pass without a temporary (aminmax)."""
    lo, hi = torch.aminmax(v.detach())
    return max(-float(lo), float(hi))


def sq_distances_from_gram(g: Tensor) -> Tensor:
    """``D_ij = G_ii + G_jj − 2 G_ij``, clamped at 0, with an exact zero diagonal."""
    diag = g.diagonal()
    d = ((diag[:, None] + diag[None, :]) - 2.0 * g).clamp(min=0.0)
    return d * (1 - torch.eye(len(d), dtype=d.dtype, device=d.device))  # exact 0 diagonal


# --------------------------------------------------------------------------- sort engine


def sort_reduce(x: Tensor, reducer: Reducer, rule: str, rows: Tensor | None = None) -> Tensor:
    """Sort ``x[rows]`` along the worker axis and apply ``reducer`` per coordinate.

    Args:
        x: ``[n, d]`` float tensor, already validated. Never written to: on CPU each block
            is sorted in its own copy.
        reducer: ``reducer(s, dim) -> [...]`` taking values sorted along ``dim``; it is
            called on ``[c, n]`` column blocks (dim 1) on CPU and on the whole ``[n, d]``
            sorted tensor (dim 0) elsewhere. It must commute with scaling by powers of
            two (sums, means, medians, comparisons of differences do).
        rule: name used in error messages.
        rows: optional index of the rows to use (Bulyan's selected set).

    Returns:
        ``[d]`` tensor of x's dtype and device. Raises ``ValueError`` on NaN/Inf, found
        from the first and last sorted values (NaN sorts last in numpy and torch). Where
        the spread ``last − first`` or the result is not finite on finite values (a sum
        or a difference overflowed), the reducer runs again on the values divided by
        ``2**e`` (:func:`headroom_exponent`) and its result is multiplied back; if that
        does not fit the dtype either, :func:`overflow_error` is raised.
    """
    d = x.shape[1]
    n_used = x.shape[0] if rows is None else len(rows)
    up = 2.0 ** headroom_exponent(n_used)
    if not numpy_ok(x):
        xs = x if rows is None else x.index_select(0, rows)
        s = torch.sort(xs, dim=0).values
        out = reducer(s, 0)
        if not (all_finite(s[-1] - s[0]) and all_finite(out)):
            check_probe(s[0] + s[-1], x, rule)  # -inf sorts first, inf and NaN last
            out = reducer(s / up, 0) * up
            if not all_finite(out):
                raise overflow_error(rule, x)
        return out

    a = x.detach().numpy()
    idx = None if rows is None else rows.cpu().numpy()
    out = torch.empty(d, dtype=x.dtype)

    def work(s: int, e: int) -> bool:
        cols = a[:, s:e].T  # [c, n] view
        # Always a copy, sorted in place below. np.ascontiguousarray(cols) returned cols
        # itself when x was column-major or d = 1, and the sort reordered the caller's x.
        # cols[:, idx] copies anyway (a[idx, s:e], rows first, was measured 6x slower).
        buf = np.array(cols, order="C") if idx is None else np.ascontiguousarray(cols[:, idx])
        buf.sort(axis=1)  # [c, n_used]
        res = reducer(torch.from_numpy(buf), 1)
        if np.isfinite(buf[:, -1] - buf[:, 0]).all() and np.isfinite(res.numpy()).all():
            out[s:e] = res
            return True
        if not (np.isfinite(buf[:, 0]).all() and np.isfinite(buf[:, -1]).all()):
            return False  # NaN/Inf in x: the caller names the rows
        buf /= up  # exact; the sums and differences of the reducer now fit
        res = reducer(torch.from_numpy(buf), 1) * up
        if not bool(torch.isfinite(res).all()):
            raise overflow_error(rule, x)
        out[s:e] = res
        return True

    finite = all(map_blocks(d, block_size(n_used), work))
    if not finite:
        raise_if_nonfinite(x, rule)
    return out
