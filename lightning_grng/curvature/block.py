"""Kronecker blocks: how one layer's inputs and output gradients become factor rows.

A block describes a layer whose weight gradient is an outer product of an input row ā
(with a trailing 1 when the layer has a bias) and an output-gradient row δ. The Fisher block of
that weight is approximated as ``A ⊗ G`` with ``A = E[ā āᵀ]`` and ``G = E[δ δᵀ]`` (K-FAC).

Every block is *grouped*: factors have shape ``(groups, n, n)`` so grouped convolutions get one
Kronecker pair per group and a Linear layer is simply ``groups == 1``. Matrices of the weight
(with the bias folded in as the last column) have shape ``(groups, n_out, n_in)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

#: ``record(module, x, output, batch, part=None, call=None)``: one forward use of a block's weight.
#: ``x`` is what :meth:`KroneckerBlock.input_rows` takes, ``output`` the tensor whose gradient
#: gives δ, ``batch`` the number of samples, ``part`` the groups this use feeds (None: all) and
#: ``call`` a token shared by the uses of one forward that feed different groups.
ForwardRecord = Callable[..., None]


@dataclass(frozen=True)
class Unsupported:
    """A block factory's answer for a configuration it cannot give a block: the parameters it
    names get the fallback update, and ``reason`` is said in :func:`~lightning_grng.attach`'s
    warning.

    Attributes:
        reason: why, in a few words (said after the module's name in attach's warning).
        params: the parameters concerned: the reason is said when the optimizer trains one of
            them (always, when empty).
    """

    reason: str
    params: tuple[nn.Parameter, ...] = ()


class KroneckerBlock(ABC):
    """One layer with a Kronecker-factored curvature block.

    Attributes:
        module: the layer.
        name: its qualified name in the model (used in messages and checkpoints).
        groups: number of independent Kronecker pairs (conv groups; 1 for Linear).
        n_in: input-factor size per group (fan-in, +1 with a folded bias).
        n_out: output-factor size per group.
        diagonal_input: A is diagonal (an embedding's one-hot inputs): ``input_rows`` gives
            indices, statistics are counts and A is stored as ``(groups, n_in)``.
    """

    diagonal_input: ClassVar[bool] = False
    #: :meth:`to_matrix` is the weight's transpose (an embedding's ``weight.T``): directions are
    #: laid out transposed in memory, so that :meth:`from_matrix` gives a contiguous tensor.
    transposed_matrix: ClassVar[bool] = False
    #: Kernel taps per input channel (kh·kw of a convolution; 1 for a matrix): the weight's
    #: columns are channel-major ``(C, taps)``, which a per-dimension split factors.
    taps: int = 1

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

    def register_capture(
        self, record: ForwardRecord, bind: Callable[[Callable[..., Any]], Any]
    ) -> list[RemovableHandle]:
        """Makes every forward use of the weight call ``record``; returns the hook handles.

        ``bind`` wraps each hook before it is registered (the capture's ``BoundHook``: copies of
        the model carry inert hooks and can be pickled).

        Default: a forward hook on :attr:`module` (its first argument is the input). A block
        whose weight is used functionally (``MultiheadAttention``) registers something else.
        """

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if module is not self.module:
                return  # a copy of the module (deepcopy carries the hook): inert
            x = args[0] if args else kwargs["input"]
            record(module, x, output, self.samples(x))

        return [self.module.register_forward_hook(bind(hook), with_kwargs=True)]

    def joined_rows(
        self, parts: list[tuple[slice | None, Any, Tensor | None]]
    ) -> tuple[Tensor, Tensor | None]:
        """Input and output-gradient rows of one forward whose groups were fed by separate
        calls, from ``(groups, x, output-gradient rows)`` per call.

        A group fed with fewer rows than another is padded with zero rows (which add nothing
        to a Gram matrix) and its input rows are scaled by ``sqrt(R / R_g)``, so dividing by
        the common count R gives every group the mean over its own rows; its output-gradient
        rows are scaled by ``sqrt(R_g / R)``, so ``G = R·Σ δδᵀ`` gives every group
        ``R_g·Σ δ_g δ_gᵀ``, its own rows as samples (``docs/algorithms.md`` §1).
        """
        a_parts: list[Tensor] = []
        g_parts: list[Tensor] = []
        for part, x, g in sorted(parts, key=lambda p: 0 if p[0] is None else p[0].start):
            width = self.groups if part is None else part.stop - part.start
            a = self.input_rows(x)
            a_parts += list(a.expand(width, *a.shape[1:]))
            if g is not None:
                g_parts += list(g)
        if len(a_parts) != self.groups or (g_parts and len(g_parts) != self.groups):
            raise ValueError(
                f"module '{self.name}': the parts feed {len(a_parts)} of {self.groups} groups"
            )
        rows = max(a.shape[0] for a in a_parts)
        A = torch.stack(
            [_pad_rows(a * math.sqrt(rows / max(a.shape[0], 1)), rows) for a in a_parts]
        )
        if not g_parts:
            return A, None
        # Rows are samples: group g's G is R_g·Σ δδᵀ. The caller counts R samples for the
        # joined pass, so each group's output gradients are scaled by sqrt(R_g / R).
        G = [_pad_rows(g * math.sqrt(g.shape[0] / rows), rows) for g in g_parts]
        return A, torch.stack(G)

    def foreign_gradient(self, grad: Tensor, a_sum: Tensor) -> Tensor | None:
        """Whether the weight's gradient ``grad`` provably has contributions from outside this
        layer (its weight used elsewhere too), given the window's input statistics ``a_sum``:
        a 0-dim bool tensor (decided on the device, read with the step's one read-back), or
        None when that cannot be told (the default)."""
        return None

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


def _pad_rows(rows: Tensor, n: int) -> Tensor:
    """``rows`` ``(r, d)`` followed by ``n - r`` zero rows."""
    return torch.nn.functional.pad(rows, (0, 0, 0, n - rows.shape[0]))
