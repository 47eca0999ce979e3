"""Tiny real architectures shared by the examples, the tests and the benchmarks.

Each covers a structure the pruner must handle: residual adds, concatenation, batch norm,
depthwise convs, and transformer-encoder MLP blocks with layer norm. Inputs are NCHW float32
images (1 channel, ``size`` x ``size``) or token-embedding sequences.
"""

from __future__ import annotations

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(x + y)


class ResCNN(nn.Module):
    """Conv stem, two residual blocks, a concat branch, global pool, linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32, in_ch: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block1 = ResBlock(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.block2 = ResBlock(2 * width)
        # Two parallel branches joined by concatenation (inception-style).
        self.branch_a = nn.Conv2d(2 * width, width, 1)
        self.branch_b = nn.Conv2d(2 * width, width, 3, padding=1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        x = self.block2(self.down(x))
        x = torch.cat([torch.relu(self.branch_a(x)), torch.relu(self.branch_b(x))], dim=1)
        x = x.mean(dim=(2, 3))
        return self.head(x)


class DWBlock(nn.Module):
    """MobileNetV2-style inverted residual: expand 1x1, depthwise 3x3, project 1x1."""

    def __init__(
        self, ch: int, expand: int = 4, stride: int = 1, out_ch: int | None = None
    ) -> None:
        super().__init__()
        out_ch = out_ch or ch
        hidden = ch * expand
        self.use_res = stride == 1 and out_ch == ch
        self.body = nn.Sequential(
            nn.Conv2d(ch, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.use_res else y


class DWCNN(nn.Module):
    """Depthwise-separable CNN (MobileNetV2-style)."""

    def __init__(self, num_classes: int = 10, width: int = 24, in_ch: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6()
        )
        self.blocks = nn.Sequential(
            DWBlock(width),
            DWBlock(width, stride=2, out_ch=2 * width),
            DWBlock(2 * width),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyEncoder(nn.Module):
    """Small transformer encoder over image rows as tokens: (N, 1, S, S) -> S tokens of S."""

    def __init__(
        self, num_classes: int = 10, seq: int = 16, dim: int = 64, heads: int = 4,
        ffn: int = 256, layers: int = 2,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(seq, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq, dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(1, 2)) + self.pos  # (N, S, S) rows as tokens
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x).mean(dim=1))


class MLP(nn.Module):
    """Plain MLP on flattened images: the smallest useful test model."""

    def __init__(self, num_classes: int = 10, size: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(size * size, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.head(torch.relu(self.fc2(x)))


def digits(size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (shipped with the package), scaled to [0, 1] and resized.

    Returns (images float32 (N, 1, size, size), labels int64 (N,)), shuffled with ``seed``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    return x[perm].contiguous(), y[perm].contiguous()


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 10, lr: float = 3e-3,
    batch: int = 64, seed: int = 0,
) -> nn.Module:
    """Plain supervised training with a fixed seed (deterministic on CPU)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return model.eval()
