"""Reductions on the step's hot path, each one pass over memory and none a host sync.

``torch.isfinite(x).all()`` makes four passes (``x == x``, ``|x|``, ``!= inf``, the
reduction) and ``g.double().pow(2).sum()`` materializes a float64 copy; on a 20,000 × 64
embedding either costs as much as a whole Adam step (``benchmarks/results/step_cost/``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def all_finite(x: Tensor) -> Tensor:
    """Whether every entry of ``x`` is finite, as a 0-dim bool tensor on ``x``'s device.

    One reduction: a NaN or an infinity makes the sum non-finite (``inf − inf`` is NaN).
    Conservative: finite entries whose sum overflows ``x``'s dtype also read as non-finite,
    and every caller then keeps its safe fallback.
    """
    return torch.isfinite(x.sum())


def all_finite_each(x: Tensor) -> Tensor:
    """:func:`all_finite` of each block of ``x`` over its last three dimensions (a block's
    ``(groups, n, m)``), kept as size-1 dimensions: ``(k, 1, 1, 1)`` for ``k`` blocks stacked
    (``optim/batching.py``), ``(1, 1, 1)`` for one, broadcastable against ``x`` either way."""
    return torch.isfinite(x.sum(dim=(-3, -2, -1), keepdim=True))


def inner(a: Tensor, b: Tensor) -> Tensor:
    """``⟨a, b⟩`` over all entries as a float64 0-dim tensor: one fused dot product in the
    wider of the two dtypes (at least float32), the layouts of ``a`` and ``b`` matching."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)).double()


def squared_norm(x: Tensor) -> Tensor:
    """``‖x‖²`` as a float64 0-dim tensor (see :func:`inner`)."""
    return inner(x, x)
