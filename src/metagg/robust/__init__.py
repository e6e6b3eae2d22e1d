"""Byzantine-robust aggregation kernels: pure functions of an ``[n, d]`` tensor.

``x`` holds one row per worker (float32 or float64, any device). Every rule returns
a ``[d]`` tensor of x's dtype and device, except the pre-aggregation steps ``nnm``
(``[n, d]``) and ``bucketing`` (``[ceil(n/s), d]``), which feed another rule.
Bad input raises one plain ``ValueError`` naming the values: a shape that is not
``[n, d]`` with n ≥ 1, a non-float dtype, NaN/Inf (with the offending rows, the first
10 named and the rest counted), an ``f`` that is not an int ≥ 0, or an ``f`` outside the
rule's guarantee (the message states the inequality; ``allow_unsafe=True`` computes
anyway where the rule is still defined). No numpy ``RuntimeWarning`` escapes, whatever
the thread count.

Inputs are never modified: every kernel only reads ``x`` (contiguous, column-major or
any strided view) and returns new tensors.

Overflow and underflow: finite input gives a finite result whenever the exact result
fits x's dtype. Values are brought into range by powers of two, which are exact:

* a sum that overflows (``mean`` of two 3e38 is 3e38; trimmed mean, bucketing, Bulyan's
  window, the weighted means of Multi-Krum, NNM, the geometric median and centered
  clipping) is recomputed on ``x / 2**e`` and multiplied back;
* squared distances are formed from centred values rescaled by ``2**e`` before squaring,
  so they neither overflow (float32 beyond ~1e19) nor underflow (below ~1e-19): Krum,
  Multi-Krum, Bulyan, NNM, the geometric median and centered clipping select in float32
  what they select in float64, at any scale.

A result that does not fit the dtype raises ``ValueError`` ("… overflows …"); of these
functions only ``pairwise_sq_distances`` can produce one (float32 rows ~1e19 apart).

=====================  =====================================  ==================
rule                   reference                              guarantee
=====================  =====================================  ==================
``mean``               —                                      none (not robust)
``coordinate_median``  Yin et al. 2018                        breakdown 1/2
``trimmed_mean``       Yin et al. 2018                        n > 2f
``krum``               Blanchard et al. 2017 (n−f−2 nbrs)     n > 2f + 2
``multi_krum``         Blanchard et al. 2017                  n > 2f + 2
``geometric_median``   Pillutla et al. (RFA), Weiszfeld       breakdown 1/2
``bulyan``             El Mhamdi et al. 2018                  n ≥ 4f + 3
``centered_clip``      Karimireddy et al. 2021                (needs momentum)
``nnm``                Allouah et al. 2023                    n > 2f
``bucketing``          Karimireddy et al. 2022                —
=====================  =====================================  ==================

Speed: distance-based rules do one Gram product; order statistics use numpy's SIMD
sort on cache-sized blocks on CPU; Bulyan's θ Krum rounds are O(n) each after one sort
of the distances. The checks above look at small things the kernels already have (the
Gram diagonal, the sorted extremes, the outputs), so normal inputs pay next to nothing.
``benchmarks/robust.py`` measures every kernel against the memory floor ``x.sum(0)``
and against the straightforward torch versions.
"""

from metagg.robust.coordinate import coordinate_median, mean, trimmed_mean
from metagg.robust.distance import (
    bulyan,
    geometric_median,
    krum,
    multi_krum,
    pairwise_sq_distances,
)
from metagg.robust.preagg import bucketing, centered_clip, nnm

__all__ = [
    "bucketing",
    "bulyan",
    "centered_clip",
    "coordinate_median",
    "geometric_median",
    "krum",
    "mean",
    "multi_krum",
    "nnm",
    "pairwise_sq_distances",
    "trimmed_mean",
]
