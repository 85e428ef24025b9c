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
    A = (V * V).sum(-2) if diagonal_input else V.transpose(-1, -2) @ V
    return A, V @ V.transpose(-1, -2)
