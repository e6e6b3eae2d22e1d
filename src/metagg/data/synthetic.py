"""Synthetic classification: a random teacher network labels Gaussian inputs.

    ds = load_dataset("synthetic:32:10:7")   # 32 features, 10 classes, teacher seed 7

Every seed is a different task of the same kind, so meta-training can draw as many as it
likes. The teacher is a random one-hidden-layer tanh network (width 2·F, weights
N(0, 1/fan_in), so it is neither linear nor saturated); labels are the argmax of its
outputs after each class's output is centred over the sample (classes of roughly equal
size), and 5 % of labels are replaced by a random class (irreducible noise, as real
data has). 16 384 training and 4 096 test examples, float32 features [N, F].
"""

from __future__ import annotations

import torch

__all__ = ["SYNTHETIC_HELP", "parse_synthetic", "synthetic_arrays"]

SYNTHETIC_HELP = "'synthetic:FEATURES:CLASSES:SEED' (e.g. 'synthetic:32:10:7')"
TRAIN, TEST, LABEL_NOISE = 16384, 4096, 0.05


def parse_synthetic(name: str) -> tuple[int, int, int]:
    """'synthetic:32:10:7' -> (features 32, classes 10, seed 7); ValueError if malformed."""
    parts = name.strip().lower().split(":")
    try:
        features, classes, seed = (int(v) for v in parts[1:])
    except ValueError:
        raise ValueError(f"bad synthetic dataset {name!r}; expected {SYNTHETIC_HELP}") from None
    if parts[0] != "synthetic" or features < 1 or classes < 2 or seed < 0:
        raise ValueError(f"bad synthetic dataset {name!r}: FEATURES >= 1, CLASSES >= 2 and "
                         f"SEED >= 0; expected {SYNTHETIC_HELP}")
    return features, classes, seed


def synthetic_arrays(features: int, classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) of the teacher task `seed` (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * features
    w1 = torch.randn(features, width, generator=g) / features**0.5
    b1 = 0.5 * torch.randn(width, generator=g)
    w2 = torch.randn(width, classes, generator=g) / width**0.5
    x = torch.randn(TRAIN + TEST, features, generator=g)
    logits = torch.tanh(x @ w1 + b1) @ w2
    y = (logits - logits.mean(0)).argmax(1)
    noisy = torch.rand(len(y), generator=g) < LABEL_NOISE
    y = torch.where(noisy, torch.randint(0, classes, y.shape, generator=g), y)
    return x[:TRAIN].clone(), y[:TRAIN].clone(), x[TRAIN:].clone(), y[TRAIN:].clone()
