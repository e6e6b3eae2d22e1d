"""Shared helpers for the learned-aggregator tests."""

from __future__ import annotations

import pytest
import torch

from metagg.aggregators.base import RoundContext
from metagg.layout import ParamLayout, TensorSpec


def flat_layout(d: int) -> ParamLayout:
    return ParamLayout([TensorSpec("theta", (d,), 0)])


def context(d: int, m: int, worker_ids=None, trusted=None, params=None) -> RoundContext:
    return RoundContext(
        round=0, params=torch.zeros(d) if params is None else params, layout=flat_layout(d),
        num_workers=m, worker_ids=torch.arange(m) if worker_ids is None else worker_ids,
        trusted=trusted,
    )


@pytest.fixture
def make_ctx():
    return context


@pytest.fixture(autouse=True)
def _learned_tests_use_one_thread(one_thread):
    """Every learned-aggregator test runs on one thread (see tests/conftest.py)."""
