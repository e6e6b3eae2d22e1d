"""Fixtures for the data tests: an isolated search path and tiny generated datasets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from metagg.data import sources, write_cifar_batch, write_idx
from metagg.data.cifar import TEST_BATCH, TRAIN_BATCHES
from metagg.data.sources import IDX_FILES


@pytest.fixture(autouse=True)
def isolated_search_path(tmp_path_factory, monkeypatch):
    """No $METAGG_DATA_DIR and an empty download cache, so only the test's files count."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setattr(sources, "CACHE_ROOT", tmp_path_factory.mktemp("cache"))


@pytest.fixture
def no_system_dirs(monkeypatch):
    """Hide the Debian Fashion-MNIST folder, to test what happens when nothing is found."""
    for name, source in list(sources.IDX_SOURCES.items()):
        monkeypatch.setitem(sources.IDX_SOURCES, name, dataclasses.replace(source, system_dirs=()))


def _make_idx_dataset(
    folder: Path,
    *,
    n_train: int = 30,
    n_test: int = 10,
    size: int = 28,
    gz: bool = True,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write the four IDX files of a small MNIST-like dataset; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key])
    return arrays


@pytest.fixture
def make_idx_dataset():
    """Factory: ``make_idx_dataset(folder, n_train=30, n_test=10, size=28, gz=True)``."""
    return _make_idx_dataset


def _make_cifar_batches(folder: Path, *, per_batch: int = 4, seed: int = 0) -> dict:
    """Write six tiny CIFAR-10 batches into ``folder``; return the concatenated arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = {}, {}
    for i, name in enumerate((*TRAIN_BATCHES, TEST_BATCH)):
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = (np.arange(per_batch) + i) % 10
        write_cifar_batch(folder / name, x, y)
        xs[name], ys[name] = x, y
    return {
        "x_train": np.concatenate([xs[n] for n in TRAIN_BATCHES]),
        "y_train": np.concatenate([ys[n] for n in TRAIN_BATCHES]),
        "x_test": xs[TEST_BATCH],
        "y_test": ys[TEST_BATCH],
    }


@pytest.fixture
def make_cifar_batches():
    """Factory: ``make_cifar_batches(folder, per_batch=4)`` writes the six batch files."""
    return _make_cifar_batches
