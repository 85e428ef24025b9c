"""Inversion-free identities on covariance factors: the arithmetic of RKalman's filter.

RKalman keeps, per Kronecker block, covariance factors ``P_A = Λ_A⁻¹`` and ``P_G = Λ_G⁻¹``
directly and never forms, inverts or decomposes a precision ``Λ``. Every change to ``Λ`` is
additive, and each one has an inversion-free counterpart on ``P``:

==========================  ==========================  ==========================================
precision (information)     covariance (what is stored)  function
==========================  ==========================  ==========================================
``Λ ← s·Λ``                 ``P ← P / s``                :func:`predict` (forgetting, process noise
                                                         ``Q = (1/s − 1)·P``)
``Λ ← Λ + c·I``             ``P ← P (I + cP)⁻¹``         :func:`add_floor` (truncated power series,
                                                         needs ``c‖P‖ < 1``)
``Λ ← Λ + u uᵀ / c``        ``P − (Pu)(Pu)ᵀ/(c+uᵀPu)``   :func:`sherman_morrison_update`
``Λ ← Λ + U Uᵀ / c``        k scalar innovations         :func:`woodbury_update` (blocked)
==========================  ==========================  ==========================================

Everything is batched over leading dimensions (the block's groups) and is plain matrix
arithmetic: no ``linalg.inv``/``solve``/``cholesky``/``eigh``/``pinv`` and no Newton iteration.
The derivation, the error bounds and the measured candidates are in ``docs/algorithms.md §7``;
:mod:`lightning_grng.curvature.kalman` composes these into one filter update.
"""

from __future__ import annotations

import torch
from torch import Tensor


def predict(P: Tensor, retain: float | Tensor) -> Tensor:
    """Predict step with forgetting: ``P / s``, i.e. ``Λ ← s·Λ`` for ``s = retain`` in (0, 1].

    Equivalent to additive process noise proportional to the covariance,
    ``P + Q`` with ``Q = (1/s − 1)·P`` (Ollivier 2019: the EKF with this noise is online natural
    gradient with a constant step).
    """
    if isinstance(retain, Tensor):
        return P / retain[..., None, None]
    return P / retain


def add_floor(P: Tensor, c: float | Tensor, terms: int) -> Tensor:
    """``(P⁻¹ + cI)⁻¹ = P (I + cP)⁻¹`` by the power series ``P Σ_{k=0..K} (−cP)^k``.

    Converges when ``c‖P‖₂ < 1``. In the eigenbasis of P, with ``x = c·p`` for an eigenvalue p
    of P and ``λ = 1/p``, the truncated result is the inverse of
    ``(λ + c) / (1 − (−x)^{K+1})`` instead of ``λ + c``: the precision added differs from c by
    the relative error ``(1 + x)·x^K / (1 − (−x)^{K+1})``. For odd K it is never less than c (the
    floor is never under-applied), so the result stays SPD and ``≤ P``. Evaluated by Horner's
    rule, K matmuls; every factor is a polynomial in P, so the result is symmetric up to
    rounding.

    Args:
        P: SPD ``(..., n, n)``.
        c: the precision to add, a scalar or one per leading index.
        terms: K >= 1.
    """
    c_ = c[..., None, None] if isinstance(c, Tensor) else c
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    T = eye - c_ * P
    for _ in range(terms - 1):
        T = eye - c_ * (P @ T)
    return P @ T


def floor_terms(ratio: float, tol: float) -> int:
    """Smallest odd K with ``(1 + r)·r^K / (1 − r^{K+1}) <= tol``: the terms :func:`add_floor`
    needs for a relative error ``tol`` on the added precision when ``c‖P‖ <= r < 1``."""
    if ratio <= 0.0:
        return 1
    k = 1
    while (1.0 + ratio) * ratio**k / (1.0 - ratio ** (k + 1)) > tol and k < 99:
        k += 2
    return k


def sherman_morrison_update(P: Tensor, u: Tensor, c: float | Tensor) -> Tensor:
    """``(P⁻¹ + u uᵀ / c)⁻¹ = P − (Pu)(Pu)ᵀ / (c + uᵀPu)``: one scalar measurement.

    ``u`` is a measurement vector ``(..., n)`` and ``c > 0`` its observation noise (the scalar
    innovation variance is ``c + uᵀPu``). ``uᵀPu`` is clamped at 0, so the innovation never drops
    below the noise. O(n²).
    """
    v = (P @ u[..., None])[..., 0]
    q = (u * v).sum(-1).clamp_min(0.0)
    s = q + c
    return P - v[..., :, None] * v[..., None, :] / s[..., None, None]


def woodbury_update(P: Tensor, U: Tensor, c: float | Tensor) -> Tensor:
    """``(P⁻¹ + U Uᵀ / c)⁻¹`` for k measurement vectors, the columns of U ``(..., n, k)``.

    Exactly k sequential :func:`sherman_morrison_update` calls (scalar innovations, in column
    order), evaluated *blocked*: the sequential gains ``v_j = P_{j−1} u_j`` are kept for all
    columns at once in ``W = P U`` and, after each scalar innovation ``s_j = c + u_jᵀ v_j``,
    the remaining columns are updated like modified Gram–Schmidt,
    ``w_i ← w_i − v_j (v_jᵀ u_i) / s_j`` (that is ``P_j u_i``), so P itself is touched by two
    matmuls only: ``W = PU`` and ``P − V Vᵀ`` with ``V = [v_j / √s_j]``. The result equals
    Woodbury's ``P − PU (cI + UᵀPU)⁻¹ UᵀP`` without any k×k inverse or linear solve.

    O(2n²k + nk²) flops. Rounding matches sequential Sherman–Morrison (relative error about
    ``eps·uᵀPu/c``), whereas eliminating on ``UᵀPU`` directly squares that factor (measured in
    ``docs/algorithms.md §7``).
    """
    W = (P @ U).clone()  # column i holds P_{j} u_i as j advances
    k = U.shape[-1]
    c_ = c[..., None] if isinstance(c, Tensor) else c
    V = torch.empty_like(W)
    for j in range(k):
        v = W[..., :, j]
        u = U[..., :, j]
        s = (u * v).sum(-1, keepdim=True).clamp_min(0.0) + c_  # innovation, >= c
        if j + 1 < k:
            rest = U[..., :, j + 1 :]
            coeff = (v[..., :, None] * rest).sum(-2) / s
            W[..., :, j + 1 :] -= v[..., :, None] * coeff[..., None, :]
        V[..., :, j] = v / s.sqrt()
    return P - V @ V.transpose(-1, -2)


def inf_norm(P: Tensor) -> Tensor:
    """``max_i Σ_j |P_ij|`` per leading index: an upper bound of ‖P‖₂ for symmetric P."""
    return P.abs().sum(-1).amax(-1)


def relative_floor(n: int, dtype: torch.dtype) -> float:
    """Smallest damping, relative to a factor's mean eigenvalue, that keeps it representable.

    ``100·n·eps``: the precision's condition number is then at most about ``1/(100·eps)``
    whatever the scale of the gradients (for a 1000-wide factor: 2e-11 of the mean eigenvalue
    in float64, 1.2e-2 in float32). It binds only when the statistics dwarf the configured
    damping (huge gradients).
    """
    return 100.0 * n * torch.finfo(dtype).eps
