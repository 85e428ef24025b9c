"""Kronecker blocks: how one layer's inputs and output gradients become factor rows.

A block describes a layer whose weight gradient is an outer product of an input row ā
(with a trailing 1 when the layer has a bias) and an output-gradient row δ. The Fisher block of
that weight is approximated as ``A ⊗ G`` with ``A = E[ā āᵀ]`` and ``G = E[δ δᵀ]`` (K-FAC).

Every block is *grouped*: factors have shape ``(groups, n, n)`` so grouped convolutions get one
Kronecker pair per group and a Linear layer is simply ``groups == 1``. Matrices of the weight
(with the bias folded in as the last column) have shape ``(groups, n_out, n_in)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class KroneckerBlock(ABC):
    """One layer with a Kronecker-factored curvature block.

    Attributes:
        module: the layer.
        name: its qualified name in the model (used in messages and checkpoints).
        groups: number of independent Kronecker pairs (conv groups; 1 for Linear).
        n_in: input-factor size per group (fan-in, +1 with a folded bias).
        n_out: output-factor size per group.
    """

    def __init__(
        self, module: nn.Module, name: str, groups: int, fan_in: int, n_out: int, with_bias: bool
    ) -> None:
        self.module = module
        self.name = name
        self.groups = groups
        self.has_bias = with_bias and module.bias is not None  # type: ignore[union-attr]
        self.n_in = fan_in + self.has_bias
        self.n_out = n_out

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight  # type: ignore[return-value]

    @property
    def bias(self) -> nn.Parameter | None:
        """The bias when it is folded into the block (present and optimized), else None."""
        return self.module.bias if self.has_bias else None  # type: ignore[return-value]

    def params(self) -> list[nn.Parameter]:
        """The parameters the block preconditions, weight first."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def _append_ones(self, rows: Tensor) -> Tensor:
        if not self.has_bias:
            return rows
        ones = torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype, device=rows.device)
        return torch.cat([rows, ones], dim=-1)

    @abstractmethod
    def input_rows(self, x: Tensor) -> Tensor:
        """Input rows ā, shape ``(groups, rows, n_in)``, bias column included."""

    @abstractmethod
    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """Output-gradient rows δ, shape ``(groups, rows, n_out)``."""

    def samples(self, x: Tensor) -> int:
        """Number of loss samples one forward call on ``x`` represents (the N of G's scale,
        ``docs/algorithms.md`` §1). Default: the leading dimension (1 for an unbatched input);
        a Linear counts every row, a convolution every image."""
        return x.shape[0] if x.dim() > 1 else 1

    @abstractmethod
    def weight_matrix_shape(self) -> tuple[int, int, int]:
        """``(groups, n_out, n_in - has_bias)``: the weight alone viewed as grouped matrices."""

    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None = None) -> Tensor:
        """Fold a weight-shaped and a bias-shaped tensor into ``(groups, n_out, n_in)``."""
        mat = weight_like.reshape(self.weight_matrix_shape())
        if bias_like is None:
            return mat
        return torch.cat([mat, bias_like.reshape(self.groups, self.n_out, 1)], dim=-1)

    def from_matrix(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`to_matrix`: tensors shaped like :meth:`params`."""
        if not self.has_bias:
            return [mat.reshape(self.weight.shape)]
        w, b = mat[..., :-1], mat[..., -1]
        return [w.reshape(self.weight.shape), b.reshape(self.bias.shape)]  # type: ignore[union-attr]
