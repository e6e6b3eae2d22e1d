"""partition: sizes, disjointness, coverage, determinism, label skew, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metagg.data import PARTITIONS, partition


def _labels(n=1000, k=10, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).permutation(np.arange(n) % k))


def _check_disjoint_sorted(parts, n):
    assert all(p.dtype == torch.int64 and p.ndim == 1 for p in parts)
    assert all(bool((p[1:] > p[:-1]).all()) for p in parts)  # sorted, no repeats
    every = torch.cat(parts)
    assert len(torch.unique(every)) == len(every)
    assert len(every) == 0 or (int(every.min()) >= 0 and int(every.max()) < n)
    return every


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 12),
    m_frac=st.floats(0, 1),
    scheme=st.sampled_from(PARTITIONS),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.floats(0.01, 100),
    spw=st.integers(1, 4),
)
def test_properties(n, k, m_frac, scheme, seed, alpha, spw):
    labels = torch.from_numpy(np.random.default_rng(seed).integers(0, k, n))
    m = 1 + int(m_frac * (min(n, 20) - 1))
    if scheme == "shards" and m * spw > n:
        with pytest.raises(ValueError, match="exceeds"):
            partition(labels, m, scheme, seed=seed, shards_per_worker=spw)
        return
    parts = partition(labels, m, scheme, seed=seed, alpha=alpha, shards_per_worker=spw)
    assert len(parts) == m
    every = _check_disjoint_sorted(parts, n)
    if scheme == "iid":
        assert all(len(p) == n // m for p in parts)
    elif scheme == "dirichlet":
        assert len(every) == n and all(len(p) >= 1 for p in parts)
    else:
        size = n // (m * spw)
        assert all(len(p) == spw * size for p in parts)


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_deterministic_per_seed_and_seeds_differ(scheme):
    labels = _labels()
    a = partition(labels, 7, scheme, seed=3)
    b = partition(labels, 7, scheme, seed=3)
    c = partition(labels, 7, scheme, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_pinned_iid_split():
    # A change here changes every experiment's data split: update only on purpose.
    parts = partition(torch.zeros(10, dtype=torch.int64), 3, "iid", seed=0)
    assert [p.tolist() for p in parts] == [
        sorted(x) for x in np.random.default_rng(0).permutation(10)[:9].reshape(3, 3).tolist()
    ]


def test_iid_drops_remainder_and_is_balanced_in_labels():
    labels = _labels(n=1003)
    parts = partition(labels, 10, "iid", seed=0)
    assert [len(p) for p in parts] == [100] * 10
    counts = torch.stack([torch.bincount(labels[p], minlength=10) for p in parts])
    assert int(counts.min()) >= 1  # an iid split sees every class


def _mean_label_entropy(labels, parts, k=10):
    entropies = []
    for p in parts:
        q = torch.bincount(labels[p], minlength=k).double()
        q = q[q > 0] / q.sum()
        entropies.append(float(-(q * q.log()).sum()))
    return float(np.mean(entropies))


def test_dirichlet_small_alpha_is_skewed():
    labels = _labels(n=2000)
    skewed = _mean_label_entropy(labels, partition(labels, 10, "dirichlet", alpha=0.1, seed=0))
    near_iid = _mean_label_entropy(labels, partition(labels, 10, "dirichlet", alpha=100, seed=0))
    assert skewed < 0.6 * near_iid
    assert near_iid > 0.95 * np.log(10)


def test_dirichlet_tiny_alpha_still_gives_every_worker_a_sample():
    labels = _labels(n=60, k=2)
    parts = partition(labels, 50, "dirichlet", alpha=1e-3, seed=1)
    assert all(len(p) >= 1 for p in parts)
    assert len(torch.cat(parts)) == 60


def test_shards_give_few_labels_per_worker():
    labels = _labels(n=1000)
    for spw in (1, 2, 3):
        parts = partition(labels, 10, "shards", shards_per_worker=spw, seed=0)
        for p in parts:
            assert len(torch.unique(labels[p])) <= 2 * spw
    # The McMahan setting: 100 workers, 2 shards each; most workers see exactly 2 labels.
    parts = partition(_labels(n=6000), 100, "shards", shards_per_worker=2, seed=0)
    n_labels = [len(torch.unique(_labels(n=6000)[p])) for p in parts]
    assert max(n_labels) <= 4 and np.mean(n_labels) < 2.5


def test_single_worker_gets_everything_that_is_kept():
    labels = _labels(n=50)
    assert torch.equal(partition(labels, 1, "iid")[0], torch.arange(50))
    assert torch.equal(partition(labels, 1, "dirichlet")[0], torch.arange(50))


def test_accepts_numpy_labels():
    labels = np.arange(20) % 4
    assert len(partition(labels, 4, "shards", shards_per_worker=1)) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_workers": 0}, r"num_workers must be in 1\.\.N=10, got 0"),
        ({"num_workers": 11}, r"num_workers must be in 1\.\.N=10, got 11"),
        ({"num_workers": 2.5}, "num_workers must be an int"),
        ({"scheme": "pathological"}, r"unknown partition scheme 'pathological'.*'iid'"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "alpha must be"),
        ({"scheme": "dirichlet", "alpha": "big"}, "alpha must be"),
        ({"scheme": "shards", "shards_per_worker": 0}, "shards_per_worker must be an int >= 1"),
        ({"scheme": "shards", "shards_per_worker": 6}, "exceeds the 10 samples"),
        ({"seed": -1}, "seed must be a non-negative int"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"num_workers": 2, "scheme": "iid", **kwargs}
    with pytest.raises(ValueError, match=match):
        partition(torch.arange(10) % 2, args.pop("num_workers"), args.pop("scheme"), **args)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.zeros(4, 2, 2, dtype=torch.int64), "1-D"),
        (torch.zeros(4), "integers"),
        (torch.tensor([0, -1, 2, 3]), ">= 0"),
    ],
)
def test_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        partition(labels, 2)
