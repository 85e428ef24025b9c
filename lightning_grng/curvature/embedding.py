"""Kronecker block for ``nn.Embedding``: a Linear layer on one-hot inputs.

``embedding(i) = Wᵀ e_i`` with ``W = weight`` of shape ``(vocab, dim)``, so the layer's weight
matrix is ``weight.T`` (``dim × vocab``) and its input rows are one-hot vectors. Then
``A = E[e_i e_iᵀ] = diag(token frequencies)``: A is diagonal and is kept as its diagonal, counted
from the token ids (never a dense ``vocab × vocab`` matrix). G is the usual output-gradient factor
(``dim × dim``). A position holding ``padding_idx`` is a zero input row (its embedding row gets no
gradient): the padding token has frequency 0 and its column of the update stays 0.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from lightning_grng.curvature.block import KroneckerBlock


class EmbeddingBlock(KroneckerBlock):
    """``nn.Embedding`` with ``max_norm=None`` and ``sparse=False`` (see :func:`unsupported`)."""

    diagonal_input: ClassVar[bool] = True
    transposed_matrix: ClassVar[bool] = True

    def __init__(self, module: nn.Embedding, name: str, with_bias: bool = False) -> None:
        super().__init__(
            module,
            name,
            groups=1,
            fan_in=module.num_embeddings,
            n_out=module.embedding_dim,
            with_bias=False,
        )

    @property
    def bias(self) -> nn.Parameter | None:
        return None

    @staticmethod
    def unsupported(module: nn.Embedding) -> str | None:
        """Why this embedding cannot have a block, or None."""
        if module.max_norm is not None:
            return "max_norm renormalizes the rows in the forward pass (only max_norm=None)"
        if module.sparse:
            return "sparse=True gradients are not supported"
        return None

    def samples(self, x: Tensor) -> int:
        """Samples of the equivalent Linear on one-hot rows: every id is a row, and rows are
        samples (``docs/algorithms.md`` §1)."""
        return max(x.numel(), 1)

    def foreign_gradient(self, grad: Tensor, a_sum: Tensor) -> Tensor | None:
        """A token that no input of the window holds (or the padding token) gets no gradient
        from the embedding: a non-zero gradient row there comes from another use of the weight
        (e.g. an output layer ``F.linear(h, embedding.weight)``)."""
        absent = a_sum[0] == 0
        return ((grad != 0).any(-1) & absent).any()  # masks, not indexing: no host sync

    def input_rows(self, x: Tensor) -> Tensor:
        """Token ids ``(1, rows)``; ``padding_idx`` becomes -1 (a zero one-hot row)."""
        ids = x.reshape(1, -1)
        pad = self.module.padding_idx
        if pad is not None:
            ids = ids.masked_fill(ids == pad, -1)
        return ids

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(1, -1, grad_output.shape[-1])

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        return (1, self.n_out, self.n_in)

    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None = None) -> Tensor:
        return weight_like.T.unsqueeze(0)

    def from_matrix(self, mat: Tensor) -> list[Tensor]:
        return [mat[0].T]
