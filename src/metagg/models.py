"""Small models built from short spec strings.

    build_model("mlp:20:sigmoid", input_shape=(1, 8, 8), num_classes=10)
    build_model("mlp:20,20:relu", ...)      # two hidden layers
    build_model("linear", ...)              # softmax regression
    build_model("cnn:ji2019", ...)          # Ji et al. 2019 CIFAR net: 2 conv + max-pool + FC
    build_model("cnn:c10", ...)             # Joseph et al. 2025 conv-c10: 3x3 convs 32/64/64
    build_model("transformer:2:32:4", input_shape=(32,), num_classes=vocab)  # causal LM

Parameter names are stable across sizes (``hidden0.weight``, ``output.bias``...),
so gradients from an MLP-40 can be matched by name onto an MLP-20's tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "MODEL_HELP",
    "TransformerLM",
    "build_model",
    "parse_model_spec",
    "reset_parameters",
]

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
MODEL_HELP = (
    "model specs: 'linear', 'mlp:H1[,H2...]:ACT' with ACT in "
    f"{sorted(ACTIVATIONS)} (e.g. 'mlp:20:sigmoid'), 'cnn:ji2019', 'cnn:c10', "
    "'transformer:LAYERS:DIM:HEADS' (a causal language model on token data, e.g. "
    "'transformer:2:32:4')"
)


class MLP(nn.Module):
    """Flatten, then hidden Linear+activation layers, then a Linear output."""

    def __init__(self, in_features: int, hidden: list[int], activation: str, num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        width = in_features
        for i, h in enumerate(hidden):
            self.add_module(f"hidden{i}", nn.Linear(width, h))
            width = h
        self.num_hidden = len(hidden)
        self.act = ACTIVATIONS[activation]()
        self.output = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for i in range(self.num_hidden):
            x = self.act(getattr(self, f"hidden{i}")(x))
        return self.output(x)


class JiCNN(nn.Module):
    """Ji et al. 2019 / L2L-style CIFAR net: two 5x5 conv layers, each followed by
    ReLU and 2x2 max-pooling, then one fully connected layer to the classes.
    The paper gives only "two convolutional layers with max pooling followed by a
    fully-connected layer"; channel counts (16, 32) are our choice."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, 16, 5, padding=2)
        self.conv1 = nn.Conv2d(16, 32, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.output = nn.Linear(32 * (height // 4) * (width // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv0(x)))
        x = self.pool(torch.relu(self.conv1(x)))
        return self.output(x.flatten(1))


class ConvC10(nn.Module):
    """learned_optimization's conv-c10 (Joseph et al. 2025): 3x3 convs with 32, 64,
    64 channels, the first with stride 2, ReLU, global average pool, linear head."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, 32, 3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.output = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv0(x))
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.output(x.mean(dim=(2, 3)))


class _Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a 4× GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, 3, heads, d/heads) -> 3 × (B, heads, T, d/heads)
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)  # (B, heads, T, T)
        att = att.masked_fill(~mask[:t, :t], float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.out(torch.nn.functional.gelu(self.fc(self.norm2(x))))


class TransformerLM(nn.Module):
    """A tiny causal transformer language model: token and learned position embeddings,
    `layers` pre-norm blocks, a final LayerNorm and a linear head over the vocabulary.

    Input: token ids int64 [B, T] (T <= seq_len); output: logits [B, T, vocab], position
    t predicting token t + 1. Attention is written with plain tensor ops (no fused
    kernel), so `torch.func.vmap` over workers and `functional_call` work.
    """

    def __init__(self, vocab: int, seq_len: int, layers: int, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer: dim {dim} must be a multiple of heads {heads}")
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab)
        # a constant, never trained: token t attends to tokens <= t
        self.register_buffer("mask", torch.ones(seq_len, seq_len, dtype=torch.bool).tril(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position.weight[: x.shape[-1]]  # (B, T, dim)
        for block in self.blocks:
            h = block(h, self.mask)
        return self.output(self.norm(h))  # (B, T, vocab)


def parse_model_spec(spec: str) -> tuple[str, list[int], str]:
    """Split a spec into (kind, hidden sizes, activation); raise ValueError if malformed."""
    parts = spec.strip().lower().split(":")
    kind = parts[0]
    if kind == "linear" and len(parts) == 1:
        return "mlp", [], "relu"
    if kind == "mlp" and len(parts) == 3:
        try:
            hidden = [int(h) for h in parts[1].split(",") if h]
        except ValueError:
            raise ValueError(f"bad hidden sizes in model spec {spec!r}; {MODEL_HELP}") from None
        if any(h <= 0 for h in hidden):
            raise ValueError(f"hidden sizes must be positive in {spec!r}")
        if parts[2] not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {parts[2]!r} in {spec!r}; allowed: {sorted(ACTIVATIONS)}"
            )
        return "mlp", hidden, parts[2]
    if kind == "cnn" and len(parts) == 2 and parts[1] in ("ji2019", "c10"):
        return f"cnn:{parts[1]}", [], "relu"
    if kind == "transformer" and len(parts) == 4:
        try:
            sizes = [int(v) for v in parts[1:]]  # layers, dim, heads
        except ValueError:
            raise ValueError(f"bad sizes in model spec {spec!r}; {MODEL_HELP}") from None
        if any(v <= 0 for v in sizes) or sizes[1] % sizes[2]:
            raise ValueError(f"model spec {spec!r}: LAYERS, DIM, HEADS must be > 0 and DIM a "
                             "multiple of HEADS")
        return "transformer", sizes, "gelu"
    raise ValueError(f"unknown model spec {spec!r}; {MODEL_HELP}")


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model for `spec` on inputs of shape `input_shape` (without batch dim)."""
    kind, hidden, act = parse_model_spec(spec)
    if kind == "mlp":
        return MLP(math.prod(input_shape), hidden, act, num_classes)
    if kind == "transformer":
        if len(input_shape) != 1:
            raise ValueError(f"model {spec!r} needs token sequences [T] (data name 'text'), "
                             f"got inputs of shape {input_shape}")
        layers, dim, heads = hidden
        return TransformerLM(num_classes, input_shape[0], layers, dim, heads)
    if len(input_shape) != 3:
        raise ValueError(f"model {spec!r} needs image inputs [C, H, W], got shape {input_shape}")
    c, h, w = input_shape
    if kind == "cnn:ji2019":
        if h < 4 or w < 4:
            raise ValueError(f"model {spec!r} needs images of at least 4x4, got {h}x{w}")
        return JiCNN(c, h, w, num_classes)
    return ConvC10(c, num_classes)


def reset_parameters(model: nn.Module, seed: int) -> None:
    """Re-initialise every layer with PyTorch's default init, seeded (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()
