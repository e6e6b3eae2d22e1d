"""The task: softmax regression on scikit-learn's 8×8 digits, in numpy (no torch needed).

The first 1 500 digits are split evenly among the clients; the other 297 are the
server's test set.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from sklearn.datasets import load_digits

NUM_TRAIN = 1500  # the rest of the 1 797 digits is the test set


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def load_partition(partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `partition_id`'s shard of the (seeded, shuffled) training digits."""
    x, y = _digits()
    order = np.random.default_rng(0).permutation(NUM_TRAIN)
    idx = np.array_split(order, num_partitions)[partition_id]
    return x[idx], y[idx]


def load_test() -> tuple[np.ndarray, np.ndarray]:
    x, y = _digits()
    return x[NUM_TRAIN:], y[NUM_TRAIN:]


def initial_model() -> list[np.ndarray]:
    """θ0: weights [64, 10] and biases [10], all zero."""
    return [np.zeros((64, 10), np.float32), np.zeros(10, np.float32)]


def loss_grads_accuracy(params: list[np.ndarray], x: np.ndarray,
                        y: np.ndarray) -> tuple[float, list[np.ndarray], float]:
    """Cross-entropy loss, its gradients with respect to (W, b), and the accuracy."""
    w, b = params
    logits = x @ w + b  # [n, 10]
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.log(p[rows, y] + 1e-12).mean())
    accuracy = float((logits.argmax(axis=1) == y).mean())
    p[rows, y] -= 1.0
    p /= len(y)  # dloss/dlogits
    return loss, [x.T @ p, p.sum(axis=0)], accuracy


def train(params: list[np.ndarray], x: np.ndarray, y: np.ndarray, *, steps: int,
          lr: float) -> tuple[list[np.ndarray], float]:
    """`steps` full-batch SGD steps; returns θ_k and the loss before the last step."""
    params = [p.copy() for p in params]
    loss = float("nan")
    for _ in range(steps):
        loss, grads, _ = loss_grads_accuracy(params, x, y)
        params = [p - np.float32(lr) * g for p, g in zip(params, grads, strict=True)]
    return params, loss
