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
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

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
        raise ValueError(f"{rule}: x contains NaN/Inf in rows {bad}")


def check_probe(probe: Tensor, x: Tensor, rule: str) -> None:
    """Raise on NaN/Inf in ``x`` when ``probe`` — a quantity that is non-finite whenever
    ``x`` is (its mean, its squared norms, its extreme sorted values) — is not finite.

    The probe is summed first: one reduction, whereas ``isfinite(t).all()`` allocates a
    mask (it took 400 ms on a [100, 1e6] tensor). Finite data whose probe sum overflowed
    goes through the exact scan and passes.
    """
    if not bool(torch.isfinite(probe.sum())):
        raise_if_nonfinite(x, rule)


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
    if threads == 1:
        return [fn(s, e) for s, e in bounds]
    spans = [bounds[i::threads] for i in range(threads)]  # interleaved: balanced tails
    pool = _pool(os.getpid(), threads)
    per_span = list(pool.map(lambda span: [fn(s, e) for s, e in span], spans))
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


def anchor_row(x: Tensor) -> int:
    """A central row of ``x``: the medoid (least sum of distances to the others) on at
    most ~2048 evenly spaced columns. Only used to centre the Gram product, so a poor
    choice costs accuracy, never correctness."""
    n, d = x.shape
    if n <= 2 or d == 0:
        return 0
    sub = x.detach()[:, :: max(1, d // 2048)].to(work_dtype(x))
    g = sub @ sub.T
    diag = g.diagonal()
    dist = ((diag[:, None] + diag[None, :]) - 2.0 * g).clamp(min=0.0).sqrt()
    return int(torch.argmin(torch.nan_to_num(dist.sum(dim=1), nan=math.inf)))


def gram(x: Tensor, rule: str) -> Tensor:
    """Centred Gram matrix ``(x − 1 x_kᵀ)(x − 1 x_kᵀ)ᵀ`` for the anchor row
    ``k = anchor_row(x)``, as an ``[n, n]`` tensor in :func:`work_dtype`; raises on
    NaN/Inf in ``x`` (found on its diagonal).

    Distances are translation invariant, and centring on a central row makes round-off
    scale with the distances among the central rows instead of with ``‖x_i‖²``: honest
    copies of one vector become exact zero rows. CPU: column blocks are centred in a
    per-thread buffer and multiplied with numpy ``b @ b.T`` (OpenBLAS ``syrk``), the
    partial products summed in float64 — one pass over x, no centred copy, see
    :func:`blas_blocks`. Elsewhere: ``torch.mm`` on the centred tensor.
    """
    n, d = x.shape
    k = anchor_row(x)
    if numpy_ok(x):
        a = x.detach().numpy()
        anchor = a[k].copy()
        block = max(256, (1 << 20) // n)  # 4 MiB of float32 per block and thread
        buffers: dict[int, np.ndarray] = {}

        def work(s: int, e: int) -> np.ndarray:
            buf = buffers.setdefault(threading.get_ident(), np.empty((n, block), a.dtype))
            b = buf[:, : e - s]
            np.subtract(a[:, s:e], anchor[s:e], out=b)
            return b @ b.T

        g_np = np.zeros((n, n))
        with np.errstate(all="ignore"):  # NaN/Inf/overflow are reported below
            for part in blas_blocks(d, block, work):
                g_np += part
        g = torch.from_numpy(g_np).to(work_dtype(x))
    else:
        xc = x - x[k]
        g = (xc @ xc.T).to(work_dtype(x))
    if not bool(torch.isfinite(g.diagonal()).all()):
        raise_if_nonfinite(x, rule)
        raise ValueError(
            f"{rule}: squared norms overflow {x.dtype} (max |x| = {x.abs().max().item():.3g}); "
            "rescale the updates or pass float64"
        )
    return g


def sq_distances_from_gram(g: Tensor) -> Tensor:
    """``D_ij = G_ii + G_jj − 2 G_ij``, clamped at 0, with an exact zero diagonal."""
    diag = g.diagonal()
    d = ((diag[:, None] + diag[None, :]) - 2.0 * g).clamp(min=0.0)
    return d * (1 - torch.eye(len(d), dtype=d.dtype, device=d.device))  # exact 0 diagonal


# --------------------------------------------------------------------------- sort engine


def sort_reduce(x: Tensor, reducer: Reducer, rule: str, rows: Tensor | None = None) -> Tensor:
    """Sort ``x[rows]`` along the worker axis and apply ``reducer`` per coordinate.

    Args:
        x: ``[n, d]`` float tensor, already validated.
        reducer: ``reducer(s, dim) -> [...]`` taking values sorted along ``dim``; it is
            called on ``[c, n]`` column blocks (dim 1) on CPU and on the whole ``[n, d]``
            sorted tensor (dim 0) elsewhere.
        rule: name used in error messages.
        rows: optional index of the rows to use (Bulyan's selected set).

    Returns:
        ``[d]`` tensor of x's dtype and device. Raises ``ValueError`` on NaN/Inf, found
        from the first and last sorted values (NaN sorts last in numpy and torch).
    """
    d = x.shape[1]
    if not numpy_ok(x):
        xs = x if rows is None else x.index_select(0, rows)
        s = torch.sort(xs, dim=0).values
        check_probe(s[0] + s[-1], x, rule)  # -inf sorts first, inf and NaN last
        return reducer(s, 0)

    a = x.detach().numpy()
    idx = None if rows is None else rows.cpu().numpy()
    out = torch.empty(d, dtype=x.dtype)

    def work(s: int, e: int) -> bool:
        cols = a[:, s:e].T  # [c, n] view
        # one cache-resident copy; a[idx, s:e] (rows first) was measured 6x slower
        buf = np.ascontiguousarray(cols if idx is None else cols[:, idx])  # [c, n_used]
        buf.sort(axis=1)
        out[s:e] = reducer(torch.from_numpy(buf), 1)
        return bool(np.isfinite(buf[:, 0]).all() and np.isfinite(buf[:, -1]).all())

    n_used = a.shape[0] if idx is None else len(idx)
    finite = all(map_blocks(d, block_size(n_used), work))
    if not finite:
        raise_if_nonfinite(x, rule)
    return out
