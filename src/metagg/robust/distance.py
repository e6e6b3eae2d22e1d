"""Distance-based rules: Krum, Multi-Krum, Bulyan, geometric median.

Each needs the pairwise geometry of the n vectors only, so each does one (centred,
rescaled) Gram product (see :func:`metagg.robust._core.gram`) and then works on the small
``[n, n]`` matrix in float64; the only other pass over ``x`` builds the output.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from metagg.robust._core import (
    all_finite,
    check_guarantee,
    check_int,
    check_positive,
    check_vector,
    check_x,
    gram,
    headroom_exponent,
    overflow_error,
    pow2_exponent,
    rescaled,
    sort_reduce,
    sq_distances_from_gram,
)
from metagg.robust.coordinate import closest_to_median_mean

__all__ = ["bulyan", "geometric_median", "krum", "multi_krum", "pairwise_sq_distances"]


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances ``D_ij = ‖x_i − x_j‖²`` via the Gram matrix.

    ``D_ij = G_ii + G_jj − 2 G_ij`` with ``G = y yᵀ``, ``y = x − x_k`` centred on a
    central row k (distances do not change; round-off then scales with the distances
    around x_k instead of with ‖x_i‖²). One matrix product (numpy/OpenBLAS ``syrk`` over
    centred column blocks on CPU, ``torch.mm`` elsewhere), combined in float64, clamped
    at 0 against round-off, exact zeros on the diagonal; copies of x_k are exactly 0
    apart.

    Args:
        x: ``[n, d]`` float32/float64 tensor.

    Returns:
        ``[n, n]`` symmetric tensor, same dtype and device as ``x``. ``ValueError`` when
        a squared distance does not fit the dtype (float32 values beyond ~1e19 apart).
    """
    check_x(x, "pairwise_sq_distances")
    g, e, _ = gram(x, "pairwise_sq_distances")
    down = 2.0**-e  # two factors: 2**-2e may not be a float64
    dist = (sq_distances_from_gram(g) * down * down).to(x.dtype)
    if not all_finite(dist):
        raise overflow_error("pairwise_sq_distances", x, "a squared distance")
    return dist


def _krum_scores(dist: Tensor, k: int) -> Tensor:
    """Krum score of each row: the sum of its ``k`` smallest squared distances to the
    other rows."""
    d = dist.clone()
    d.fill_diagonal_(math.inf)
    return d.sort(dim=1).values[:, :k].sum(dim=1)


def _check_krum(x: Tensor, f: object, rule: str, allow_unsafe: bool) -> tuple[int, int]:
    check_x(x, rule)
    n = x.shape[0]
    f = check_int(f, "f", rule)
    check_guarantee(n > 2 * f + 2, allow_unsafe, f"{rule} needs n > 2f + 2, got n={n}, f={f}")
    if n - f - 2 < 1:
        raise ValueError(f"{rule} needs n - f - 2 >= 1 neighbours, got n={n}, f={f}")
    return n, f


def krum(x: Tensor, f: int, *, allow_unsafe: bool = False) -> Tensor:
    """Krum (Blanchard et al., NeurIPS 2017, "Machine learning with adversaries").

    ``score(i) = Σ_{j ∈ N_i} ‖x_i − x_j‖²`` where ``N_i`` are the **n − f − 2** nearest
    neighbours of ``x_i`` (itself excluded) — the paper's count; some libraries use
    n − f − 1. Returns ``x_{i*}`` with ``i* = argmin score`` (ties: lowest index).
    Distances are squared once (not squared twice, a bug seen in the wild).

    Guarantee (paper, Prop. 1): ``n > 2f + 2``. With ``allow_unsafe=True`` any
    ``n ≥ f + 3`` (at least one neighbour) is computed.

    Implementation: one Gram product (numpy/OpenBLAS ``syrk`` on CPU) gives all
    distances; scores are a sort of the ``[n, n]`` matrix. 2-6x faster than
    ``torch.cdist`` (``benchmarks/robust.py``).

    Args:
        x: ``[n, d]`` float32/float64 tensor.
        f: assumed number of Byzantine workers, int ``>= 0``.
        allow_unsafe: skip the ``n > 2f + 2`` check.

    Returns:
        ``[d]`` tensor: a copy of the selected row.

    Example:
        >>> x = torch.tensor([[0.0], [0.1], [0.2], [0.15], [50.0]])
        >>> krum(x, f=1)
        tensor([0.1500])
    """
    n, f = _check_krum(x, f, "krum", allow_unsafe)
    scores = _krum_scores(sq_distances_from_gram(gram(x, "krum").g), n - f - 2)
    return x[int(torch.argmin(scores))].clone()  # argmin returns the first minimum


def multi_krum(x: Tensor, f: int, m: int | None = None, *, allow_unsafe: bool = False) -> Tensor:
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): the mean of the ``m``
    rows with the lowest Krum scores (n − f − 2 neighbours, as in :func:`krum`).

    ``m = n − f`` by default; ``m = 1`` is Krum. Ties in the score are broken towards
    the lower index. Guarantee: ``n > 2f + 2`` (``allow_unsafe`` skips it; ``n ≥ f + 3``
    is still required).

    Implementation: scores from one Gram product; the mean is one matrix-vector
    product ``wᵀ x`` with ``w_i = 1/m`` on the selected rows (no gathered copy).

    Args:
        x: ``[n, d]`` float32/float64 tensor.
        f: assumed number of Byzantine workers, int ``>= 0``.
        m: number of rows averaged, ``1 <= m <= n``; default ``n − f``.
        allow_unsafe: skip the ``n > 2f + 2`` check.

    Returns:
        ``[d]`` tensor, same dtype and device.
    """
    n, f = _check_krum(x, f, "multi_krum", allow_unsafe)
    m = n - f if m is None else check_int(m, "m", "multi_krum", minimum=1)
    if m > n:
        raise ValueError(f"multi_krum needs 1 <= m <= n, got m={m}, n={n}")
    scores = _krum_scores(sq_distances_from_gram(gram(x, "multi_krum").g), n - f - 2)
    chosen = torch.sort(scores, stable=True).indices[:m]
    w = torch.zeros(n, dtype=x.dtype, device=x.device)
    w[chosen.to(x.device)] = 1.0 / m
    out = w @ x
    if not all_finite(out):  # finite x (gram checked it): a mean within round-off of max
        out = rescaled(lambda y: w @ y, x, "multi_krum", 1)
    return out


def bulyan(x: Tensor, f: int, *, allow_unsafe: bool = False) -> Tensor:
    """Bulyan (El Mhamdi et al., ICML 2018, "The hidden vulnerability of distributed
    learning in Byzantium") over Krum.

    1. Selection: ``θ = n − 2f`` rows chosen by repeated Krum — pick the Krum winner
       (score over the ``n_r − f − 2`` nearest *remaining* neighbours, same f, ties to
       the lowest index), remove it, recompute on the remaining ``n_r − 1`` rows.
    2. Aggregation: per coordinate, the mean of the ``β = θ − 2f`` selected values
       closest to the coordinate median of the selected set (ties at equal distance
       keep the smaller value).

    Guarantee (paper): ``n ≥ 4f + 3``. ``allow_unsafe`` skips it; ``β ≥ 1``
    (``n ≥ 4f + 1``) is still required. With ``n ≥ 4f + 3`` every round has
    ``n_r − f − 2 ≥ f − 1 ≥ 0`` neighbours; a round with 0 neighbours scores every
    remaining row 0 and so takes the lowest remaining index, and a round with 1 neighbour
    ties mutual nearest neighbours exactly (lowest index again): for f <= 2 the selection,
    hence the output, can depend on the order of the rows.

    Implementation: one Gram product; each row's distances are sorted once and the θ
    rounds update the scores in O(n) each (:func:`_bulyan_selection`; re-sorting the
    ``[n, n]`` matrix every round took 28-48 s at n = 1100, f = 262); step 2 runs on the
    sort engine (numpy SIMD sort on CPU) and finds the β-window with one monotone
    predicate instead of a second sort.

    Args:
        x: ``[n, d]`` float32/float64 tensor.
        f: assumed number of Byzantine workers, int ``>= 0``.
        allow_unsafe: skip the ``n >= 4f + 3`` check.

    Returns:
        ``[d]`` tensor, same dtype and device.
    """
    check_x(x, "bulyan")
    n = x.shape[0]
    f = check_int(f, "f", "bulyan")
    theta, beta = n - 2 * f, n - 4 * f
    check_guarantee(n >= 4 * f + 3, allow_unsafe, f"bulyan needs n >= 4f + 3, got n={n}, f={f}")
    if beta < 1:
        raise ValueError(f"bulyan needs n - 4f >= 1 values per coordinate, got n={n}, f={f}")
    dist = sq_distances_from_gram(gram(x, "bulyan").g)
    rows = torch.tensor(_bulyan_selection(dist, f, theta), device=x.device)
    return sort_reduce(x, closest_to_median_mean(beta), "bulyan", rows=rows)


def _bulyan_selection(dist: Tensor, f: int, theta: int) -> list[int]:
    """The θ rows Bulyan's repeated Krum selects from the squared distances ``dist``
    (``[n, n]``, zero diagonal), in selection order: in round r the remaining row with
    the least score — the sum of its ``max(n − r − f − 2, 0)`` smallest distances to the
    other remaining rows — ties to the lowest index.

    Each row's distances are sorted once. A round removes the winner w and lowers the
    neighbour count k by one, so every remaining row loses exactly one term of its score:
    w when w was among its k nearest, else its k-th nearest; a linked list over each
    row's sorted order (remaining rows only) gives the new k-th nearest in O(1). A round
    is O(n) instead of the O(n² log n) of re-sorting.

    The running scores are float subtractions, so they only shortlist: every row within
    the round-off bound ``8 n u · (initial score)`` of the least score is rescored as the
    definition says (its k smallest remaining distances, ascending, summed left to
    right — the formula of the initial scores), and the least exact score wins. Rows
    with equal distance multisets get equal exact scores, so ties resolve as in the
    definition.
    """
    big = dist.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
    n = len(big)
    np.fill_diagonal(big, np.inf)  # itself sorts last: never among its k <= n_r - 2 nearest
    order = np.argsort(big, axis=1, kind="stable")  # [n, n]: row i's rows, nearest first
    near = np.take_along_axis(big, order, axis=1)  # [n, n]: their distances
    pos = np.empty_like(order)  # pos[i, j]: where j is in row i's order
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(n), (n, n)), axis=1)
    # doubly linked lists over the sorted positions 1..n of each row; 0 and n+1 are ends
    prev = np.broadcast_to(np.arange(-1, n + 1), (n, n + 2)).copy()
    nxt = prev + 2
    alive = np.ones(n, dtype=bool)

    def exact(cand: np.ndarray, k: int) -> np.ndarray:
        take = alive[order[cand]]  # [c, n] remaining rows, in each row's order
        take &= np.cumsum(take, axis=1) <= k
        # left-to-right (cumsum): adding the zeros of skipped rows changes no bit
        return np.cumsum(np.where(take, near[cand], 0.0), axis=1)[:, -1]

    k = max(n - f - 2, 0)
    scores = exact(np.arange(n), k) if k else np.zeros(n)
    tol = 8 * n * 2.0**-53 * scores  # |running score − exact score| is below this
    last = np.full(n, k)  # position (1-based) of each row's k-th nearest; 0: none
    index = np.arange(n)
    chosen = []
    for r in range(theta):
        live = index[alive]  # ascending: argmin takes the lowest index on ties
        cand = live[scores[live] - tol[live] <= (scores[live] + tol[live]).min()]
        if len(cand) > 1 and tol[cand].any():
            w = int(cand[np.argmin(exact(cand, k))])
        else:
            w = int(cand[np.argmin(scores[cand])])
        chosen.append(w)
        alive[w] = False
        rest = index[alive]
        t = pos[rest, w] + 1  # w's position in each remaining row's order
        if k > 0:
            p = last[rest]
            inside = t <= p
            scores[rest] -= near[rest, np.where(inside, t, p) - 1]
            moved = ~inside | (t == p)  # the k-th nearest left: step back to the previous
            last[rest[moved]] = prev[rest[moved], p[moved]]
        before, after = prev[rest, t], nxt[rest, t]  # unlink w from every remaining row
        nxt[rest, before] = after
        prev[rest, after] = before
        k = max(n - r - 1 - f - 2, 0)
        if k == 0:  # empty sums: exactly 0, whatever round-off the subtractions left
            scores[:] = 0.0
            tol[:] = 0.0
    return chosen


def geometric_median(
    x: Tensor,
    iters: int = 8,
    nu: float = 0.1,
    weights: Tensor | None = None,
) -> Tensor:
    """Smoothed Weiszfeld geometric median, as in RFA (Pillutla et al., IEEE TSP 2022,
    "Robust aggregation for federated learning").

    Approximates ``argmin_z Σ_i w_i ‖z − x_i‖``: start at the weighted mean, then
    ``iters`` times ``β_i = w_i / max(ν, ‖z − x_i‖)``, ``z ← Σ β_i x_i / Σ β_i``.
    RFA's defaults: 8 iterations, ν = 0.1.

    Implementation: every iterate is an affine combination ``z = Σ c_i x_i``
    (``Σ c_i = 1``) of the rows, so with the centred Gram matrix ``G`` of
    :func:`pairwise_sq_distances` the distances are ``‖z − x_i‖² = G_ii − 2 (G c)_i +
    cᵀ G c`` (float64, clamped at 0): the iterations run on length-n vectors and x is
    read by one Gram product and one final ``cᵀ x`` — 2 passes instead of 2 per
    iteration. Accuracy (float32, n=20, d=2e5, ‖v‖ = 1.4e3, honest spread 4e2 … 4e-2):
    within 1e-4 of float64 Weiszfeld on materialised differences, as good as float32
    materialised differences; the uncentred expansion ``‖x_i‖² − 2 x_i·z + ‖z‖²`` was off
    by up to 0.2. Breakdown point 1/2, so no f and no guarantee check.

    Args:
        x: ``[n, d]`` float32/float64 tensor.
        iters: Weiszfeld iterations, int ``>= 0`` (0 returns the weighted mean).
        nu: smoothing ν > 0 (distances below ν count as ν).
        weights: optional ``[n]`` non-negative weights with a positive sum (e.g. the
            workers' sample counts); default uniform.

    Returns:
        ``[d]`` tensor, same dtype and device.
    """
    check_x(x, "geometric_median")
    n = x.shape[0]
    iters = check_int(iters, "iters", "geometric_median")
    nu = check_positive(nu, "nu", "geometric_median")
    g, e, _ = gram(x, "geometric_median")  # G of x · 2**e: distances carry 2**e
    if weights is None:
        w = torch.ones(n, dtype=g.dtype, device=g.device)
    else:
        w = check_vector(weights, n, "weights", "geometric_median")
        w = w.to(device=g.device, dtype=g.dtype)
        if bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError(
                "geometric_median: weights must be >= 0 with a positive sum, "
                f"got min {float(w.min())}, sum {float(w.sum())}"
            )
        w = w * 2.0 ** pow2_exponent(float(w.detach().max()), w.dtype)  # exact: max w in [0.5, 1)
    c = w / w.sum()
    diag = g.diagonal()
    # The distances ‖z − x_i‖ · 2**e (from G) are compared with ν · 2**e: the true distances
    # may not fit float64 (1e300 · sqrt(d)); their ratios do.
    nu_scaled = nu * 2.0**e
    if math.isinf(nu_scaled):  # every distance is below ν: the weighted mean is the answer
        iters = 0
    nu_scaled = max(nu_scaled, torch.finfo(g.dtype).tiny)  # ν underflowed: w / ν stays finite
    if n / nu_scaled > torch.finfo(g.dtype).max / 4:  # Σ β_i <= n max(w) / ν could overflow
        w = w * 2.0 ** -headroom_exponent(n)  # exact: c is unchanged
    for _ in range(iters):
        gc = g @ c
        d2 = (diag - 2.0 * gc + c @ gc).clamp(min=0.0)
        beta = w / d2.sqrt().clamp(min=nu_scaled)
        c = beta / beta.sum()
    weights_x = c.to(device=x.device, dtype=x.dtype)
    out = weights_x @ x
    if not all_finite(out):  # a convex combination: only round-off can pass max
        out = rescaled(lambda y: weights_x @ y, x, "geometric_median", 1)
    return out
