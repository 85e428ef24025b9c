"""Kronecker block for ``nn.Linear``.

**Rows are samples.** Every row of the input is one sample: ``(B, d)`` gives B rows, ``(B, T, d)``
gives B·T (a token, or one time step of a recurrent use). So a layer called once on ``(B, T, d)``
and the same layer called T times on ``(B, d)`` get identical factors, and for a per-token loss
(a language model) G is the per-token Fisher factor (``docs/algorithms.md`` §1).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_grng.curvature.block import KroneckerBlock


class LinearBlock(KroneckerBlock):
    def __init__(self, module: nn.Linear, name: str, with_bias: bool = True) -> None:
        super().__init__(
            module,
            name,
            groups=1,
            fan_in=module.in_features,
            n_out=module.out_features,
            with_bias=with_bias,
        )

    def samples(self, x: Tensor) -> int:
        return x.numel() // max(x.shape[-1], 1) if x.dim() > 1 else 1

    def input_rows(self, x: Tensor) -> Tensor:
        return self._append_ones(x.reshape(1, -1, x.shape[-1]))

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(1, -1, grad_output.shape[-1])

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        return (1, self.n_out, self.n_in - self.has_bias)
