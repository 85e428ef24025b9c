"""Kronecker block for ``nn.Conv2d`` (KFC, Grosse & Martens 2016).

Each output position is a sample: the input rows are the unfolded patches (one per position and
image), and the output-gradient rows are the gradient at each position. Stride, padding (any
mode, including ``"same"``), dilation and groups are honoured; a grouped convolution has one
independent Kronecker pair per group.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_grng.curvature.block import KroneckerBlock


class Conv2dBlock(KroneckerBlock):
    def __init__(self, module: nn.Conv2d, name: str, with_bias: bool = True) -> None:
        kh, kw = module.kernel_size
        groups = module.groups
        super().__init__(
            module,
            name,
            groups=groups,
            fan_in=(module.in_channels // groups) * kh * kw,
            n_out=module.out_channels // groups,
            with_bias=with_bias,
        )
        self._pad = self._explicit_padding(module)

    @staticmethod
    def _explicit_padding(m: nn.Conv2d) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` padding, resolving ``"same"``/``"valid"``."""
        if m.padding == "valid":
            return (0, 0, 0, 0)
        if m.padding == "same":
            pads = []
            for k, d in zip(reversed(m.kernel_size), reversed(m.dilation), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return (pads[0], pads[1], pads[2], pads[3])
        ph, pw = m.padding  # type: ignore[misc]
        return (pw, pw, ph, ph)

    def input_rows(self, x: Tensor) -> Tensor:
        m: nn.Conv2d = self.module  # type: ignore[assignment]
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        # Padding is applied explicitly so non-zero padding modes and asymmetric "same" padding
        # produce exactly the values the convolution saw; unfold itself then pads nothing.
        if any(self._pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride)  # (B, C*k, L)
        b, ck, length = patches.shape
        patches = patches.view(b, self.groups, ck // self.groups, length)
        rows = patches.permute(1, 0, 3, 2).reshape(self.groups, b * length, ck // self.groups)
        return self._append_ones(rows)

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        if grad_output.dim() == 3:
            grad_output = grad_output.unsqueeze(0)
        b = grad_output.shape[0]
        g = grad_output.reshape(b, self.groups, self.n_out, -1)  # (B, groups, o, L)
        return g.permute(1, 0, 3, 2).reshape(self.groups, -1, self.n_out)

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        return (self.groups, self.n_out, self.n_in - self.has_bias)
