"""Kronecker block for ``nn.Linear``.

Inputs of shape ``(B, d)`` give one row per sample; inputs of shape ``(B, T, ..., d)`` give one row
per position (the "expand" convention for weight sharing: every position is treated as a sample
of the same layer).
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

    def input_rows(self, x: Tensor) -> Tensor:
        return self._append_ones(x.reshape(1, -1, x.shape[-1]))

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(1, -1, grad_output.shape[-1])

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        return (1, self.n_out, self.n_in - self.has_bias)
