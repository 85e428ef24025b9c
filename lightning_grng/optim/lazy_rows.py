"""An embedding's eigen-mode update at O(rows touched) (issue 22; ``docs/algorithms.md`` §8.9).

A batch touches a fraction of an embedding's rows (IMDB: about 2,700 of 20,000 per batch); the
others have a zero gradient. With ``lazy_rows`` only the touched rows are rotated, absorbed
into the moments and updated; the untouched rows keep their moments and weights, as with
TensorFlow's LazyAdam and torch's ``SparseAdam``. The work is O(rows touched × d) instead of
O(vocabulary × d).

Which rows is data-dependent. Their count is read back with the step's one read-back
(``optim/readback.py``); a ``topk`` of that size over the rows' norms then gathers them (the
count is exactly the number of non-zero norms), so no second host synchronisation. A row
counts as touched when its Euclidean norm is non-zero (one fast reduction; a row whose every
entry is below ~1e-19 in float32 underflows to norm 0 and is left out).

The work runs on rows: the gathered gradient rows ``(k, d)`` times ``Q_G`` are the rotated
gradient's touched columns, transposed, and the moments are kept row-major (``(1, d, rows)``
views of ``(1, rows, d)`` storage) so that gathering and writing back rows is contiguous.

Exact where the block's input side is its own eigenbasis (an embedding's diagonal A: Q = I):
the rotation ``Q_Gᵀ V`` acts on each weight row (a column of V) alone, so the touched rows
rotate alone, and for them the step is the dense step's arithmetic. Two block-level
quantities keep the whole block's value: γ's mean of D (the rows left out enter by their sum)
and the block means of RING's GR forms (the rows left out have R = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_grng.curvature.kronecker import KroneckerFactors
from lightning_grng.numerics import all_finite, inner


@dataclass
class TouchedRows:
    """The rows of one block's gradient this step: their norms on the device, and how many are
    non-zero once the step's read-back brought the count to the host."""

    #: The Euclidean norm (or its square) of each weight row (a column of the block matrix),
    #: ``(n_in,)``.
    norm: Tensor
    #: The number of non-zero rows (host value); None until the read-back.
    count: int | None = None

    def set_count(self, value: float) -> None:
        self.count = int(value)


def touched_rows(V: Tensor, squares: Tensor | None = None) -> tuple[TouchedRows, Tensor]:
    """The rows of the weight whose gradient ``V`` ``(1, n_out, n_in)`` (its transpose) is not
    zero there, and their count (a 0-dim device tensor, to be read back). ``squares``: the
    rows' squared norms where the gradient statistics computed them already. A non-finite
    gradient skips the step before any row is gathered."""
    norm = torch.linalg.vector_norm(V[0], dim=0) if squares is None else squares
    return TouchedRows(norm), (norm > 0).sum()


def row_major(t: Tensor) -> Tensor:
    """``t`` ``(1, n_out, n_in)`` with its rows (the last dimension's entries) contiguous
    per weight row: a ``(1, n_in, n_out)`` tensor seen transposed (copied once if not)."""
    return t if t.mT.is_contiguous() else t.mT.contiguous().mT


@dataclass
class GatheredRows:
    """The touched rows of a block, gathered for the scale stage, each ``(1, k, n_out)`` (the
    block's entries transposed: the scale stage is elementwise, so the same arithmetic)."""

    index: Tensor
    #: The gradient's rows (the weight's layout).
    grad_rows: Tensor
    #: Rows of the rotated gradient ``Q_Gᵀ V``.
    R: Tensor
    #: Copies of the moments' rows, updated by the scale stage, then written back.
    moment: Tensor
    first: Tensor | None
    #: The second moment's sum over the rows left out, per group ``(1, 1, 1)``.
    outside: Tensor
    #: The block's entries per group (the divisor of its means).
    numel: int
    corrections: tuple[float, float]


def gather(
    factors: KroneckerFactors, V: Tensor, rows: TouchedRows, beta2: float, beta1: float | None
) -> GatheredRows:
    """The touched rows of gradient ``V`` rotated by ``Q_G`` and of the moments (counting this
    step in the bias corrections: the steps a row was not touched are steps it kept its
    moments)."""
    assert rows.count is not None
    index = rows.norm.topk(rows.count, sorted=False).indices
    Q = factors.evec_G  # None: G kept as its diagonal, its basis the identity
    dtype = factors.eval_G.dtype if Q is None else Q.dtype
    grad_rows = V[0].mT.index_select(0, index)
    R = grad_rows.to(dtype)
    R = (R if Q is None else R @ Q[0]).unsqueeze(0)
    moment, first, corrections = factors.eigen_moments(R, beta2, beta1, V.shape)
    factors.moment = moment = row_major(moment)
    rows_moment = moment[0].mT.index_select(0, index).unsqueeze(0)
    outside = moment.sum(dim=(-2, -1), keepdim=True) - rows_moment.sum(dim=(-2, -1), keepdim=True)
    rows_first = None
    if first is not None:
        factors.rotated_first_moment = first = row_major(first)
        rows_first = first[0].mT.index_select(0, index).unsqueeze(0)
    numel = V.shape[-2] * V.shape[-1]
    return GatheredRows(index, grad_rows, R, rows_moment, rows_first, outside, numel, corrections)


@dataclass
class RowUpdate:
    """A weight's direction that is zero outside some rows: ``rows`` ``(k, d)`` at ``index``
    of a weight shaped ``shape``. The template applies it to those rows (``index_add_``), so
    nothing of the size of the whole table is written."""

    index: Tensor
    rows: Tensor
    shape: torch.Size
    #: The same rows of the gradient: the direction where ``rows`` is not finite.
    grad_rows: Tensor

    def finite_or_gradient(self) -> RowUpdate:
        """The template's rule for a non-finite direction: the gradient instead."""
        finite = torch.where(all_finite(self.rows), self.rows, self.grad_rows.to(self.rows.dtype))
        return RowUpdate(self.index, finite, self.shape, self.grad_rows)

    def dense(self) -> Tensor:
        """The whole direction, shaped like the weight."""
        out = self.rows.new_zeros(self.shape)
        return out.index_copy_(0, self.index, self.rows)

    def inner(self, grad: Tensor) -> Tensor:
        """``⟨U, grad⟩`` over the weight (``grad`` shaped like it)."""
        return inner(self.rows, grad.index_select(0, self.index).to(self.rows.dtype))


def scatter(factors: KroneckerFactors, V: Tensor, rows: GatheredRows, scaled: Tensor) -> RowUpdate:
    """Writes the updated rows of the moments back, and returns the direction of the touched
    rows: ``scaled`` rotated back by ``Q_G``, in the weight's layout."""
    assert factors.moment is not None
    factors.moment[0].mT.index_copy_(0, rows.index, rows.moment[0])
    if rows.first is not None:
        assert factors.rotated_first_moment is not None
        factors.rotated_first_moment[0].mT.index_copy_(0, rows.index, rows.first[0])
    Q = factors.evec_G
    U = scaled[0] if Q is None else scaled[0] @ Q[0].mT
    shape = torch.Size((V.shape[-1], V.shape[-2]))
    return RowUpdate(rows.index, U.to(V.dtype), shape, rows.grad_rows)
