"""Centered clipping and the pre-aggregation steps NNM and bucketing.

NNM and bucketing return ``[m, d]`` tensors meant to be fed to another rule
(``krum(nnm(x, f), f)``, ``coordinate_median(bucketing(x, 2))``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from metagg.robust._core import (
    all_finite,
    blas_blocks,
    block_size,
    check_guarantee,
    check_int,
    check_positive,
    check_vector,
    check_x,
    gram,
    map_blocks,
    max_abs,
    means_fit,
    numpy_ok,
    overflow_error,
    pow2_exponent,
    raise_if_nonfinite,
    rescaled,
    sq_distances_from_gram,
    work_dtype,
)

__all__ = ["bucketing", "centered_clip", "nnm"]


def _sq_dist_to(x: Tensor, v: Tensor) -> Tensor:
    """``‖x_i − v‖²`` for every row, from the differences themselves (no expansion).

    The expansion ``‖x_i‖² − 2 x_i·v + ‖v‖²`` cancels badly when x_i is near v: at
    n=100, d=1e6, ‖x_i‖² ≈ 1e7 it was off by 160 on squared distances of ~1e6, while
    centered clipping compares distances with an absolute τ = 10. So the differences
    are formed per cache-sized column block (CPU, threads) and never as a [n, d] tensor;
    elsewhere they are formed at once.
    """
    if not numpy_ok(x):
        return (x - v).square().sum(dim=1).to(work_dtype(x))
    a, b = x.detach().numpy(), v.detach().numpy()

    def work(s: int, e: int) -> np.ndarray:
        diff = a[:, s:e] - b[s:e]
        return np.einsum("ij,ij->i", diff, diff).astype(np.float64)

    parts = map_blocks(x.shape[1], block_size(x.shape[0]), work)
    total = np.sum(parts, axis=0) if parts else np.zeros(x.shape[0])
    return torch.from_numpy(np.asarray(total, dtype=np.float64))


def _ldexp(t: Tensor, e: Tensor) -> Tensor:
    """``t · 2**e`` in float64 for int exponents up to ±2000 (two exact factors)."""
    half = torch.div(e, 2, rounding_mode="floor").to(torch.float64)
    return t * torch.exp2(half) * torch.exp2(e.to(torch.float64) - half)


def _clip_scales_rescaled(x: Tensor, v: Tensor, tau: float) -> Tensor:
    """``min(1, τ/‖x_i − v‖)`` per row without overflow or underflow: the differences
    are formed at a power-of-two scale where they fit, each row is then rescaled by its
    own power of two before squaring (in float64), and ``‖x_i − v‖ = m_i · 2**p_i`` is
    never formed. One [n, d] copy: only when the fast distances were not usable."""
    if x.shape[1] == 0:  # every distance is 0
        return torch.ones(len(x), dtype=torch.float64, device=x.device)
    top = max(float(x.detach().abs().max()), float(v.detach().abs().max()))
    e = pow2_exponent(top, x.dtype) if top > 0 else 0  # |x · 2**e| < 1: differences fit
    diff = x * 2.0**e - v * 2.0**e  # [n, d], x.dtype
    row_max = diff.detach().abs().amax(dim=1).to(torch.float64)  # [n]
    row_e = (-torch.frexp(row_max).exponent).clamp(-1000, 1000)  # 0 for a zero row
    y = _ldexp(diff.to(torch.float64), row_e[:, None])  # each row's max in [0.5, 1)
    m = y.square().sum(dim=1).sqrt()  # ‖x_i − v‖ = m_i · 2**(−row_e_i − e)
    return _ldexp(tau / m, row_e + e).clamp(max=1.0)  # τ/m_i = inf for a zero row: 1


def centered_clip(x: Tensor, center: Tensor, tau: float = 10.0, iters: int = 1) -> Tensor:
    """Centered clipping (Karimireddy, He & Jaggi, ICML 2021, "Learning from history
    for Byzantine robust optimization").

    ``v ← v + (1/n) Σ_i clip_τ(x_i − v)`` repeated ``iters`` times (the paper's L,
    1-3), with ``clip_τ(z) = z · min(1, τ/‖z‖)`` and ``v`` starting at ``center`` (the
    previous aggregate, i.e. the server momentum). Returns the final ``v``.
    Computed as ``v ← (1 − Σ_i s_i / n) v + Σ_i (s_i / n) x_i`` with
    ``s_i = min(1, τ/‖x_i − v‖)``: one pass for the distances (formed from the
    differences, see :func:`_sq_dist_to`) and one matrix-vector product per iteration.
    ``tau = inf`` gives ``s_i = 1`` and the plain mean. Distances that overflow x's dtype,
    or so small that τ could cut them where their squares underflow, are recomputed with
    each row rescaled by a power of two (:func:`_clip_scales_rescaled`); a step whose
    convex combination overflows by round-off is recomputed on ``x / 4``.

    Args:
        x: ``[n, d]`` float32/float64 tensor.
        center: ``[d]`` tensor, same dtype and device (the previous aggregate).
        tau: clipping radius τ > 0 (``math.inf`` allowed).
        iters: number of iterations L, int ``>= 1``.

    Returns:
        ``[d]`` tensor, same dtype and device.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [100.0, 0.0]])
        >>> centered_clip(x, torch.zeros(2), tau=2.0)
        tensor([1.0000, 0.3333])
    """
    check_x(x, "centered_clip")
    n, d = x.shape
    iters = check_int(iters, "iters", "centered_clip", minimum=1)
    tau = check_positive(tau, "tau", "centered_clip", allow_inf=True)
    check_vector(center, d, "center", "centered_clip")
    if center.dtype != x.dtype or center.device != x.device:
        raise ValueError(
            f"centered_clip: center must match x's dtype and device ({x.dtype}, {x.device}), "
            f"got ({center.dtype}, {center.device})"
        )
    # Rows closer than this to v may have lost their squares to underflow (each of the d
    # terms loses < tiny, which is below eps · sq only for sq >= d · tiny / eps); it
    # matters only when τ is as small, i.e. almost never.
    info = torch.finfo(x.dtype)
    unsure = 4.0 * max(d, 1) * info.tiny / info.eps
    # Each v is a convex combination of the previous v and the rows, and |x_ij| <= |v_j| +
    # ‖x_i − v‖: this bound on max |v| says when an output could overflow by round-off
    # (then it is checked) without a pass over each output.
    bound = max_abs(center) if d else 0.0
    v = center
    for _ in range(iters):
        sq = _sq_dist_to(x, v)  # [n], work dtype
        if not all_finite(sq):
            raise_if_nonfinite(x, "centered_clip")  # center was checked
            s = _clip_scales_rescaled(x, v, tau)  # a difference or a square overflowed
            bound = math.inf
        elif tau * tau < 2.0 * unsure and bool((sq < unsure).any()):
            s = _clip_scales_rescaled(x, v, tau)
            # sq may have lost its tiny squares: bound them generously
            bound += math.sqrt(float(sq.detach().max())) * 2 + 1
        else:
            s = (tau / sq.sqrt()).clamp(max=1.0)  # dist 0 -> inf -> 1
            bound += math.sqrt(float(sq.detach().max()))
        s = s.to(device=x.device, dtype=x.dtype)
        keep = 1.0 - s.sum() / n
        v_next = keep * v + (s / n) @ x
        if not bound < info.max / 4 and not all_finite(v_next):
            v_next = (keep * (v / 4) + (s / n) @ (x / 4)) * 4  # exact scalings
            if not all_finite(v_next):
                raise overflow_error("centered_clip", x)
        v = v_next
    return v


def nnm(x: Tensor, f: int, *, allow_unsafe: bool = False) -> Tensor:
    """Nearest-neighbour mixing (Allouah et al., AISTATS 2023, "Fixing by mixing").

    Row i is replaced by the mean of its ``n − f`` nearest rows in Euclidean distance,
    itself included (it is always its own nearest; distance ties go to the lower
    index). Apply any rule to the result.

    Guarantee (paper): ``n > 2f``. ``allow_unsafe`` skips it (``f <= n − 1`` is still
    required).

    Implementation: one Gram product for the distances, a sort of the ``[n, n]``
    matrix, and one ``[n, n] @ [n, d]`` product with the 0 / ``1/(n−f)`` mixing
    matrix (no gathered ``[n, n−f, d]`` copy).

    Args:
        x: ``[n, d]`` float32/float64 tensor.
        f: assumed number of Byzantine workers, int ``>= 0``.
        allow_unsafe: skip the ``n > 2f`` check.

    Returns:
        ``[n, d]`` tensor, same dtype and device.
    """
    check_x(x, "nnm")
    n = x.shape[0]
    f = check_int(f, "f", "nnm")
    check_guarantee(n > 2 * f, allow_unsafe, f"nnm needs n > 2f, got n={n}, f={f}")
    if f > n - 1:
        raise ValueError(f"nnm needs n - f >= 1 neighbours, got n={n}, f={f}")
    gr = gram(x, "nnm")
    dist = sq_distances_from_gram(gr.g)
    dist.fill_diagonal_(-1.0)  # itself first, whatever the ties at distance 0
    k = n - f
    nearest = torch.sort(dist, dim=1, stable=True).indices[:, :k].to(x.device)
    mix = torch.zeros(n, n, dtype=x.dtype, device=x.device).scatter_(1, nearest, 1.0 / k)
    # each output row is a mean of rows of x (finite: gram checked): only round-off can
    # carry it past the dtype's max, and then it is recomputed on x / 4
    out = _mix(mix, x, checked=not means_fit(x, gr))
    if out is None:
        out = rescaled(lambda y: _mix(mix, y, checked=False), x, "nnm", 1)
    return out


def _mix(mix: Tensor, x: Tensor, checked: bool = True) -> Tensor | None:
    """``mix @ x``; None when ``checked`` and an entry is not finite."""
    if not numpy_ok(x):
        out = mix @ x
        return out if not checked or all_finite(out) else None
    # numpy (OpenBLAS) per column block on our threads: measured 2x faster than torch.mm
    # (MKL) here, and robust to other processes on the cores (see blas_blocks)
    a, m = x.detach().numpy(), mix.numpy()
    out_np = np.empty_like(a)

    def work(s: int, e: int) -> bool:
        block = m @ a[:, s:e]
        out_np[:, s:e] = block
        # a sum of the block while it is in cache; the exact test only if it overflowed
        return not checked or bool(np.isfinite(block.sum()) or np.isfinite(block).all())

    if not all(blas_blocks(x.shape[1], block_size(len(m)), work)):
        return None
    return torch.from_numpy(out_np)


def bucketing(x: Tensor, s: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Bucketing (Karimireddy, He & Jaggi, ICLR 2022, "Byzantine-robust learning on
    heterogeneous datasets via bucketing").

    Shuffle the rows with a random permutation (``torch.randperm`` with ``generator``,
    so a seeded generator makes it reproducible), cut the shuffled order into
    consecutive buckets of ``s`` rows (the last one smaller when ``s`` does not divide
    n) and return each bucket's mean: ``[ceil(n/s), d]``. Apply any rule to the result.

    Implementation: one ``index_add_`` of the rows into their buckets (no permuted copy
    of x), then a division by the bucket sizes.

    Args:
        x: ``[n, d]`` float32/float64 tensor.
        s: bucket size, int ``>= 1``.
        generator: optional ``torch.Generator`` for the permutation.

    Returns:
        ``[ceil(n/s), d]`` tensor, same dtype and device. A bucket sum that overflows on
        finite values is redone on ``x / 2**e``; ``ValueError`` only if a bucket mean
        itself does not fit the dtype.
    """
    check_x(x, "bucketing")
    n = x.shape[0]
    s = check_int(s, "s", "bucketing", minimum=1)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=gen_device).to(x.device)
    n_buckets = math.ceil(n / s)
    bucket = torch.empty(n, dtype=torch.long, device=x.device)
    bucket[perm] = torch.arange(n, device=x.device) // s  # row perm[j] goes to bucket j // s
    sizes = torch.bincount(bucket, minlength=n_buckets).to(x.dtype)

    def bucket_means(y: Tensor) -> Tensor:
        sums = torch.zeros(n_buckets, y.shape[1], dtype=y.dtype, device=y.device)
        sums.index_add_(0, bucket, y)
        return sums.div_(sizes[:, None])  # in place: no second [ceil(n/s), d] allocation

    out = bucket_means(x)
    if not all_finite(out):
        raise_if_nonfinite(x, "bucketing")  # NaN/Inf in any row reaches its bucket
        out = rescaled(bucket_means, x, "bucketing", s)  # a bucket's sum overflowed
    return out
