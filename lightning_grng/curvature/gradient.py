"""Gradient statistics: the Kronecker factors of Shampoo and SOAP, from the gradient alone.

For a block's gradient matrix V ``(groups, n_out, n_in)`` the factors are ``Vᵀ V`` (input side,
``n_in × n_in``, in the place of K-FAC's A) and ``V Vᵀ`` (output side, in the place of G). Their
moving averages L = E[V Vᵀ] and R = E[Vᵀ V] give ``L ⊗ R`` (up to scale) as a Kronecker
approximation of the empirical Fisher ``E[vec V vec Vᵀ]``: one step of the power iteration for
its nearest Kronecker product (Morwani et al. 2024; ``docs/algorithms.md`` §8.6). The eigen
route uses only their eigenbases; the scale of each direction is its own second moment.

No activation capture is needed, so any weight matrix qualifies, however it is called.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gradient_factors(V: Tensor, diagonal_input: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(Vᵀ V, V Vᵀ)`` per group in ``dtype``; with ``diagonal_input`` the input side is kept
    as its diagonal ``(groups, n_in)``, the column sums of squares (an embedding's vocabulary
    side, as K-FAC's A of an embedding is diagonal)."""
    V = V.to(dtype)
    # Column sums of squares as a norm: one pass, no temporary of V's size.
    A = column_squares(V) if diagonal_input else V.transpose(-1, -2) @ V
    return A, output_factor(V, dtype)


def output_factor(V: Tensor, dtype: torch.dtype) -> Tensor:
    """``V Vᵀ`` per group in ``dtype``: the output side alone (a split input side has its
    own factors, :func:`split_input_factors`)."""
    V = V.to(dtype)
    return V @ V.transpose(-1, -2)


def column_squares(V: Tensor) -> Tensor:
    """``(V ∘ V).sum(-2)``: each column's sum of squares, in one reduction."""
    return torch.linalg.vector_norm(V, dim=-2).square()


def split_input_factors(V: Tensor, taps: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The input side of a convolution's gradient statistics per tensor dimension (Shampoo's
    and SOAP's factors of a higher-order tensor): with the weight columns of V viewed as
    ``W (groups, n_out, C, k)`` (channel-major, k kernel taps), ``A = Σ_{o,t} W[o,:,t] W[o,:,t]ᵀ``
    over channels ``(groups, C, C)`` and ``K = Σ_{o,c} W[o,c,:] W[o,c,:]ᵀ`` over taps
    ``(groups, k, k)``. A bias column (the last, when ``n_in`` is not a multiple of k) enters
    neither. Their eigenbases give the weight columns the basis ``Q_A ⊗ Q_K``
    (``docs/algorithms.md`` §8.7)."""
    width = V.shape[-1] - V.shape[-1] % taps
    *lead, o, _ = V.shape
    C = width // taps
    W = V[..., :width].to(dtype).reshape(*lead, o, C, taps)
    # Each as one matmul per group, on a (C, o·k) copy and a (o·C, k) view: einsum's own
    # order ran 1.5× and 16× slower on a 512-channel conv.
    channels = W.transpose(-3, -2).reshape(*lead, C, o * taps)
    rows = W.reshape(*lead, o * C, taps)
    return channels @ channels.mT, rows.mT @ rows
