"""Two models for the step-cost benchmark (issue 22), with random data (step time only).

* ``resnet18_cifar``: the CIFAR ResNet-18 (3x3 stem, no max-pool, 32x32 inputs, 10 classes,
  batch 64; about 11.2M parameters). Its 3x3 convolutions have input factors C_in*9 wide, up
  to 4608 (layer4), the case where a full eigh dominates a step.
* ``gpt_small``: a GPT-2-shaped causal transformer scaled down for a CPU (4 layers, width 256,
  4 heads, context 128, vocabulary 8192, batch 8; about 7.4M parameters); ``full=True`` gives
  GPT-2 small's shape (12 layers, width 768, 12 heads, context 1024, vocabulary 50257, batch 8;
  about 163M parameters with the untied head). Every projection is an ``nn.Linear`` (a Kronecker
  block each); attention is written out (no fused kernel), so RENG's double backward runs as is.
  The head is NOT tied to the token embedding (a tied pair is attach's concern, not this
  benchmark's). Note that a 50257-wide output factor is 10 GB in float32: the GRNG optimizers'
  K-FAC statistics of the full-size head need ``skip_modules`` or a diagonal output factor.

No torchvision, no data files: the batches are seeded random tensors of the right shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a projection shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 images (He et al. 2016, the CIFAR variant: 3x3 stem, no max-pool)."""

    def __init__(self, classes: int = 10, widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c_in, width, stride), BasicBlock(width, width, 1)]
            c_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------------------- GPT-2 shape
class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        mask = torch.ones(context, context, dtype=torch.bool).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(c // self.heads)
        scores = scores.masked_fill(self.mask[:t, :t], float("-inf"))
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class GPTBlock(nn.Module):
    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2's layout (pre-norm blocks, learned positions, final norm), head untied."""

    def __init__(self, vocab: int, context: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(GPTBlock(width, heads, context) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        return self.head(self.ln(self.blocks(x)))


# ---------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """A model, its batch size and how a seeded random batch of it looks."""

    name: str
    description: str
    model: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]

    @staticmethod
    def loss(output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def _images(batch: int) -> Callable[[torch.Generator], tuple[Tensor, Tensor]]:
    def make(g: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(
            0, 10, (batch,), generator=g
        )

    return make


def _tokens(
    batch: int, context: int, vocab: int
) -> Callable[[torch.Generator], tuple[Tensor, Tensor]]:
    def make(g: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, vocab, (batch, context + 1), generator=g)
        return ids[:, :-1], ids[:, 1:]

    return make


def workload(name: str, full: bool = False) -> Workload:
    """The workload ``name`` (``full``: GPT-2 small's full shape for ``gpt_small``)."""
    if name == "resnet18_cifar":
        return Workload(
            name, "CIFAR ResNet-18, 32x32, batch 64, random data", CifarResNet18, _images(64)
        )
    if name == "gpt_small":
        vocab, context, width, depth, heads = (
            (50257, 1024, 768, 12, 12) if full else (8192, 128, 256, 4, 4)
        )
        what = "GPT-2 small" if full else "GPT-2-shaped, scaled down"
        return Workload(
            name,
            f"{what}: {depth} layers, width {width}, {heads} heads, context {context}, "
            f"vocabulary {vocab}, batch 8, random tokens",
            lambda: GPT(vocab, context, width, depth, heads),
            _tokens(8, context, vocab),
        )
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


WORKLOADS = ("resnet18_cifar", "gpt_small")
