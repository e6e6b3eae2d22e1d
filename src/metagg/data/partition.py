"""Split a dataset's samples among workers: iid, Dirichlet label skew, label shards.

    >>> parts = partition(ds.y_train, 10, "dirichlet", alpha=0.1, seed=0)
    >>> x_k, y_k = ds.x_train[parts[k]], ds.y_train[parts[k]]

Every scheme is a pure function of ``(labels, num_workers, seed, ...)`` through
``numpy.random.default_rng(seed)``, so the same call gives the same split on
every run and machine. Each worker's indices are returned sorted.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

__all__ = ["PARTITIONS", "partition"]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards")


def _as_label_array(labels: torch.Tensor, scheme: str) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim == 2 and scheme == "iid":
        # Token sequences [N, T]: an iid split only needs N, and there is no one label
        # per sample to skew by.
        return np.zeros(len(y), dtype=np.int64)
    if y.ndim == 2:
        raise ValueError(
            f"partition {scheme!r} skews workers by label, but these samples are sequences "
            f"(labels of shape {tuple(y.shape)}, e.g. the text dataset); use partition: iid"
        )
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(y.shape)}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise ValueError(f"labels must be >= 0, got min {y.min()}")
    return y.astype(np.int64)


def _to_tensors(parts: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def _iid(y: np.ndarray, m: int, rng: np.random.Generator) -> list[np.ndarray]:
    per = len(y) // m  # the equal split: drop the N mod M remainder
    return list(rng.permutation(len(y))[: per * m].reshape(m, per))


def _dirichlet(y: np.ndarray, m: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
    """Hsu et al. 2019: for each class, worker shares ~ Dir(alpha · 1_M)."""
    chunks: list[list[np.ndarray]] = [[] for _ in range(m)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        shares = rng.dirichlet(np.full(m, alpha))
        # Cut points from cumulative shares; rounding keeps every index exactly once.
        cuts = np.round(np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for k, piece in enumerate(np.split(idx, cuts)):
            chunks[k].append(piece)
    parts = [np.concatenate(c) for c in chunks]
    # Small alpha can leave a worker empty; give it one sample from the largest worker
    # (which has >= 2 because N >= M), so every worker can compute a gradient.
    for k in range(m):
        if len(parts[k]) == 0:
            donor = max(range(m), key=lambda j: len(parts[j]))
            parts[k], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts


def _shards(y: np.ndarray, m: int, rng: np.random.Generator, per_worker: int) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut M·s equal shards, deal s at random to each."""
    num_shards = m * per_worker
    size = len(y) // num_shards
    if size == 0:
        raise ValueError(
            f"shards: num_workers * shards_per_worker = {num_shards} exceeds the {len(y)} samples"
        )
    # Drop a random remainder, then sort by label (stable, so ties keep the random order).
    keep = rng.permutation(len(y))[: num_shards * size]
    ordered = keep[np.argsort(y[keep], kind="stable")]
    shards = ordered.reshape(num_shards, size)
    deal = rng.permutation(num_shards).reshape(m, per_worker)
    return [shards[row].reshape(-1) for row in deal]


def partition(
    labels: torch.Tensor,
    num_workers: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_worker: int = 2,
) -> list[torch.Tensor]:
    """Split sample indices ``0..N-1`` among ``num_workers`` workers.

    Schemes:
        - ``"iid"``: a random permutation cut into equal parts of ``N // M``
          (the remainder is dropped, so every worker holds the same amount).
        - ``"dirichlet"``: label skew of Hsu et al. (2019): each class's samples
          are split by proportions ``p ~ Dir(alpha · 1_M)``; small ``alpha`` →
          few classes per worker, large ``alpha`` → close to iid. Covers all N;
          a worker left empty receives one sample from the largest worker.
        - ``"shards"``: McMahan et al. (2017): samples sorted by label, cut into
          ``M · shards_per_worker`` equal shards, each worker gets
          ``shards_per_worker`` random shards (so at most about that many labels).
          The remainder ``N mod (M · shards_per_worker)`` is dropped.

    Args:
        labels: int ``[N]`` labels (≥ 0); token targets ``[N, T]`` allow only ``"iid"``.
        num_workers: M, in ``1..N``.
        scheme: one of ``PARTITIONS``.
        seed: seed of ``numpy.random.default_rng``; the split is a pure function of it.
        alpha: Dirichlet concentration (> 0), ``"dirichlet"`` only.
        shards_per_worker: shards per worker (≥ 1), ``"shards"`` only.

    Returns:
        ``num_workers`` disjoint, sorted int64 index tensors.

    Raises:
        ValueError: an unknown scheme or an argument out of range.
    """
    y = _as_label_array(labels, scheme)
    n = len(y)
    try:
        m = operator.index(num_workers)
    except TypeError:
        raise ValueError(f"num_workers must be an int, got {num_workers!r}") from None
    if not 1 <= m <= n:
        raise ValueError(f"num_workers must be in 1..N={n}, got {num_workers}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    if scheme == "iid":
        parts = _iid(y, m, rng)
    elif scheme == "dirichlet":
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            a = float("nan")
        if not (np.isfinite(a) and a > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        parts = _dirichlet(y, m, rng, a)
    elif scheme == "shards":
        if isinstance(shards_per_worker, bool) or not isinstance(shards_per_worker, int):
            raise ValueError(f"shards_per_worker must be an int >= 1, got {shards_per_worker!r}")
        if shards_per_worker < 1:
            raise ValueError(f"shards_per_worker must be an int >= 1, got {shards_per_worker}")
        parts = _shards(y, m, rng, shards_per_worker)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {PARTITIONS}")
    return _to_tensors(parts)
