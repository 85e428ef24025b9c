"""Kronecker blocks for ``nn.Conv1d`` and ``nn.Conv2d`` (KFC, Grosse & Martens 2016).

Each output position is a sample: the input rows are the unfolded patches (one per position and
input), and the output-gradient rows are the gradient at each position (positions summed in G).
Stride, padding (any mode, including ``"same"``), dilation and groups are honoured; a grouped
convolution has one independent Kronecker pair per group. A Conv1d is treated as a Conv2d of
height 1, so both share one patch extraction.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_grng.curvature.block import KroneckerBlock


def _pair(value: tuple[int, ...], one_d: bool, fill: int) -> tuple[int, int]:
    """A Conv1d hyperparameter ``(w,)`` as the 2-d ``(fill, w)`` of a height-1 convolution."""
    return (fill, value[0]) if one_d else (value[0], value[1])


class _ConvBlock(KroneckerBlock):
    """Shared KFC block of an N-d convolution handled as 2-d (1-d: height 1)."""

    _spatial_dims: int

    def __init__(self, module: nn.Conv1d | nn.Conv2d, name: str, with_bias: bool = True) -> None:
        groups = module.groups
        super().__init__(
            module,
            name,
            groups=groups,
            fan_in=(module.in_channels // groups) * math.prod(module.kernel_size),
            n_out=module.out_channels // groups,
            with_bias=with_bias,
        )
        self.taps = math.prod(module.kernel_size)
        one_d = self._spatial_dims == 1
        self._kernel = _pair(module.kernel_size, one_d, 1)
        self._stride = _pair(module.stride, one_d, 1)
        self._dilation = _pair(module.dilation, one_d, 1)
        self._pad = self._explicit_padding(module)

    def _explicit_padding(self, m: nn.Conv1d | nn.Conv2d) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` padding, resolving ``"same"``/``"valid"``."""
        if m.padding == "valid":
            return (0, 0, 0, 0)
        if m.padding == "same":
            pads = []
            for k, d in zip(reversed(m.kernel_size), reversed(m.dilation), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            pads += [0, 0] * (2 - self._spatial_dims)
            return (pads[0], pads[1], pads[2], pads[3])
        if self._spatial_dims == 1:
            (pw,) = m.padding  # type: ignore[misc]
            return (pw, pw, 0, 0)
        ph, pw = m.padding  # type: ignore[misc]
        return (pw, pw, ph, ph)

    def _as_batched_2d(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` view of a (possibly unbatched, possibly 1-d) input."""
        if x.dim() == self._spatial_dims + 1:  # unbatched
            x = x.unsqueeze(0)
        return x.unsqueeze(-2) if self._spatial_dims == 1 else x

    def input_rows(self, x: Tensor) -> Tensor:
        m = self.module
        x = self._as_batched_2d(x)
        # Padding is applied explicitly so non-zero padding modes and asymmetric "same" padding
        # produce exactly the values the convolution saw; unfold itself then pads nothing.
        if any(self._pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        patches = F.unfold(x, self._kernel, dilation=self._dilation, stride=self._stride)
        b, ck, length = patches.shape  # (B, C*k, L)
        patches = patches.view(b, self.groups, ck // self.groups, length)
        rows = patches.permute(1, 0, 3, 2).reshape(self.groups, b * length, ck // self.groups)
        return self._append_ones(rows)

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        if grad_output.dim() == self._spatial_dims + 1:
            grad_output = grad_output.unsqueeze(0)
        b = grad_output.shape[0]
        g = grad_output.reshape(b, self.groups, self.n_out, -1)  # (B, groups, o, L)
        return g.permute(1, 0, 3, 2).reshape(self.groups, -1, self.n_out)

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        return (self.groups, self.n_out, self.n_in - self.has_bias)


class Conv2dBlock(_ConvBlock):
    """``nn.Conv2d``: rows are the ``(C/groups)·kh·kw`` patches at every output position."""

    _spatial_dims = 2

    def __init__(self, module: nn.Conv2d, name: str, with_bias: bool = True) -> None:
        super().__init__(module, name, with_bias)


class Conv1dBlock(_ConvBlock):
    """``nn.Conv1d``: rows are the ``(C/groups)·k`` patches at every output position."""

    _spatial_dims = 1

    def __init__(self, module: nn.Conv1d, name: str, with_bias: bool = True) -> None:
        super().__init__(module, name, with_bias)
