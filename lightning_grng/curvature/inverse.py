"""Inverse routines for symmetric positive definite (SPD) Kronecker factors.

All routines act on batches ``(..., n, n)`` and compute in float32 or better, whatever the dtype
of the factor (bf16/fp16 covariances are too inaccurate to decompose).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype decompositions run in: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def symmetrize(x: Tensor) -> Tensor:
    """``(X + Xᵀ) / 2`` over the last two dimensions."""
    return 0.5 * (x + x.transpose(-1, -2))


@dataclass
class NewtonSchulzResult:
    """Outcome of :func:`newton_schulz_inverse`.

    Attributes:
        inverse: the approximate inverse X, shape of M.
        iterations: Newton steps taken.
        residual: ``max ‖I − X M‖_F`` over the batch after the last step.
        warm: whether the warm start was accepted (otherwise a cold start was used).
    """

    inverse: Tensor
    iterations: int
    residual: float
    warm: bool


def default_tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-4


def _power_iteration_radius(E: Tensor, iters: int) -> Tensor:
    """``iters`` power-iteration steps from the ones vector: an estimate of the largest
    ``|eigenvalue|`` per batch element, shape ``E.shape[:-2]`` (on the device)."""
    v = torch.ones(*E.shape[:-1], 1, dtype=E.dtype, device=E.device)
    estimate = torch.zeros(E.shape[:-2], dtype=E.dtype, device=E.device)
    for _ in range(iters):
        w = E @ v
        estimate = torch.linalg.vector_norm(w, dim=(-2, -1))
        v = w / estimate.clamp_min(torch.finfo(E.dtype).tiny)[..., None, None]
    return estimate


def spectral_radius_estimate(E: Tensor, iters: int = 12) -> float:
    """Largest ``|eigenvalue|`` of ``E`` (max over the batch) by power iteration.

    ``E = I − X₀M`` with X₀, M SPD has real eigenvalues, and Newton–Schulz converges iff they
    lie in ``(−1, 1)``. The Frobenius norm bounds the radius but is far too pessimistic for wide,
    low-rank-updated factors, so the warm start is accepted on this cheap ``O(n²)`` estimate and
    guarded against divergence.
    """
    value = float(_power_iteration_radius(E, iters).max())
    return value if value == value else float("inf")


def newton_schulz_inverse(
    M: Tensor,
    initial: Tensor | None = None,
    max_iters: int = 30,
    tol: float | None = None,
) -> NewtonSchulzResult:
    """Newton–Schulz iteration for the inverse of SPD matrices.

    Iterates ``X ← X (2I − M X)``. With ``E = I − X M`` this satisfies ``E_{k+1} = E_k²``, so the
    residual squares every step once the spectral radius of ``E_0`` is below 1.

    Warm start: ``initial`` (the previous inverse; EMA factors move slowly) is used when
    :func:`spectral_radius_estimate` of ``I − X₀ M`` is below 0.9 for every matrix of the batch,
    and abandoned for a cold start if the residual then grows. Cold start: ``X₀ = I / ‖M‖_F``,
    which converges for any SPD M because the eigenvalues of ``I − M/‖M‖_F`` lie in ``[0, 1)``.
    X is symmetrized after each step so rounding cannot drift it away from a symmetric matrix.

    Args:
        M: SPD matrices, shape ``(..., n, n)``.
        initial: optional warm start of the same shape.
        max_iters: upper bound on Newton steps.
        tol: stop once ``‖I − X M‖_F <= tol`` (default depends on dtype).

    Returns:
        A :class:`NewtonSchulzResult`; the inverse has the dtype of ``M``.
    """
    dtype = working_dtype(M.dtype)
    Mw = M.to(dtype)
    tol = default_tolerance(dtype) if tol is None else tol
    eye = torch.eye(M.shape[-1], dtype=dtype, device=M.device).expand_as(Mw)

    def cold_start() -> Tensor:
        norm = torch.linalg.matrix_norm(Mw).clamp_min(torch.finfo(dtype).tiny)
        return eye / norm[..., None, None]

    X, warm = cold_start(), False
    if initial is not None and initial.shape == M.shape and bool(initial.isfinite().all()):
        X0 = initial.to(dtype)
        if spectral_radius_estimate(eye - X0 @ Mw) < 0.9:
            X, warm = X0, True

    residual = float("inf")
    first = None
    iters = 0
    for iters in range(max_iters + 1):
        E = eye - X @ Mw
        residual = float(torch.linalg.matrix_norm(E).max())
        first = residual if first is None else first
        if warm and not (residual < 10.0 * first):  # the estimate was wrong: diverging
            X, warm, first = cold_start(), False, None
            continue
        if residual <= tol or iters == max_iters or residual != residual:
            break
        # X(2I − MX) = X + X(I − MX); for symmetric X and M, (I − MX) = Eᵀ.
        X = symmetrize(X + X @ E.transpose(-1, -2))
    return NewtonSchulzResult(X.to(M.dtype), iters, residual, warm)


def spd_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of symmetric PSD matrices, eigenvalues clamped at 0.

    Runs in float32 or better and retries in float64 when the first attempt fails (ill-conditioned
    float32 factors occasionally make ``eigh`` diverge). Returns ``(eigenvalues, eigenvectors)``
    in the working dtype.

    Raises:
        torch.linalg.LinAlgError: if the float64 retry fails as well.
    """
    dtype = working_dtype(M.dtype)
    try:
        evals, evecs = torch.linalg.eigh(symmetrize(M.to(dtype)))
    except torch.linalg.LinAlgError:
        evals, evecs = torch.linalg.eigh(symmetrize(M.to(torch.float64)))
        evals, evecs = evals.to(dtype), evecs.to(dtype)
    return evals.clamp_min(0.0), evecs


_TIE_BREAKERS: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _tie_breaker(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``n`` fixed distinct weights in ``[1, 2)`` (a seeded draw, the same on every process and
    run): the diagonal that makes the null-space basis of :func:`settle_null_space` unique."""
    key = (n, dtype, device)
    if key not in _TIE_BREAKERS:
        draw = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        _TIE_BREAKERS[key] = (1.0 + draw).to(dtype=dtype, device=device)
    return _TIE_BREAKERS[key]


def settle_null_space(evals: Tensor, evecs: Tensor, rank_bound: int) -> Tensor:
    """``evecs`` with the basis of each factor's null space made unique.

    An eigh basis inside a repeated eigenvalue is arbitrary: for a rank-deficient factor
    (gradient statistics after fewer updates than its width) the null-space columns are
    whatever rounding picks, so two runs that differ only in rounding (another loss scale, a
    DDP split) rotate the next gradients' null-space components differently and the eigen
    mode's per-coordinate second moment drifts apart. The null space itself is well defined,
    so its basis is replaced by the eigenvectors of ``P diag(d) P`` (P its orthogonal
    projector, d fixed distinct weights), which are unique up to sign (the eigen step does not
    depend on signs). Columns outside the null space are returned unchanged.

    The null space of a batch element is at least the ``n − rank_bound`` smallest eigenvalues
    (``rank_bound`` an upper bound on the rank, known from how the factor was built), plus
    the eigenvalues at rounding level (``≤ n·ε·λ_max``). ``evals`` ascending, as eigh returns.
    """
    n = evecs.shape[-1]
    index = torch.arange(n, device=evals.device)
    floor = n * torch.finfo(evals.dtype).eps * evals[..., -1:].clamp_min(0.0)
    null = (index < n - rank_bound) | (evals <= floor)  # a prefix of the ascending order
    kept = null.sum(-1, keepdim=True)  # null columns per batch element
    Qn = evecs * null[..., None, :]
    P = Qn @ Qn.transpose(-1, -2)
    d = _tie_breaker(n, evecs.dtype, evecs.device)
    # Range directions get eigenvalue 0, null directions eigenvalues in [1, 2): the null
    # basis is the last ``kept`` columns, in ascending order.
    _, U = torch.linalg.eigh(symmetrize(P @ (d[:, None] * P)))
    source = (index + (n - kept)).clamp_max(n - 1)  # null column j <- U's column n − kept + j
    settled = U.gather(-1, source[..., None, :].expand_as(U))
    return torch.where(null[..., None, :], settled, evecs)


# ---------------------------------------------------------------------------- sync-free forms
#: Newton–Schulz steps of a warm-started refresh. An accepted warm start has spectral radius
#: ``ρ(I − X₀M) < 0.9``, so 7 steps give ``‖E‖ <= √n·0.9^128 ≈ 1e-5`` for n = 785 (the residual
#: squares every step); measured after one EMA step: 2–4 (``benchmarks/decompositions.py``).
WARM_NEWTON_ITERS = 7


def spectral_radius_mask(E: Tensor, bound: float = 0.9, iters: int = 12) -> Tensor:
    """Per batch element, whether the power-iteration estimate of ``ρ(E)`` is below ``bound``.

    The device-side form of :func:`spectral_radius_estimate` (no host read-back): a boolean
    tensor of shape ``E.shape[:-2]``, False where the estimate is not finite.
    """
    return _power_iteration_radius(E, iters) < bound  # NaN compares False


def newton_schulz_steps(M: Tensor, X: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Exactly ``iters`` Newton–Schulz steps ``X ← X(2I − MX)`` from ``X``, no host read-back.

    The identity is that of :func:`newton_schulz_inverse` (``E_{k+1} = E_k²``); the number of
    steps is fixed by the caller, and convergence is judged afterwards from the returned
    residual ``‖I − XM‖_F`` per batch element (shape ``M.shape[:-2]``), on the device.
    Both are in the working dtype.
    """
    dtype = working_dtype(M.dtype)
    Mw, X = M.to(dtype), X.to(dtype)
    eye = torch.eye(M.shape[-1], dtype=dtype, device=M.device)
    for _ in range(iters):
        E = eye - X @ Mw
        X = symmetrize(X + X @ E.transpose(-1, -2))
    residual = torch.linalg.matrix_norm(eye - X @ Mw)
    return X, residual


def newton_schulz_cold_start(M: Tensor) -> Tensor:
    """``I / ‖M‖_F``: converges for any SPD M (the eigenvalues of ``I − M/‖M‖_F`` lie in [0, 1))."""
    dtype = working_dtype(M.dtype)
    Mw = M.to(dtype)
    norm = torch.linalg.matrix_norm(Mw).clamp_min(torch.finfo(dtype).tiny)
    eye = torch.eye(M.shape[-1], dtype=dtype, device=M.device)
    return eye / norm[..., None, None]


def batched_spd_eigh(matrices: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """:func:`spd_eigh` of many ``(g_i, n_i, n_i)`` batches, one call per distinct ``(n, dtype)``.

    Same-size factors of different blocks are concatenated along the batch dimension, so a
    device runs one batched decomposition instead of one launch sequence per block. Returns
    ``(eigenvalues, eigenvectors)`` per input, in input order.
    """
    groups: dict[tuple[int, torch.dtype], list[int]] = {}
    for i, m in enumerate(matrices):
        groups.setdefault((m.shape[-1], m.dtype), []).append(i)
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(matrices)
    for indices in groups.values():
        parts = [matrices[i] for i in indices]
        evals, evecs = spd_eigh(torch.cat(parts) if len(parts) > 1 else parts[0])
        offset = 0
        for i, part in zip(indices, parts, strict=True):
            size = part.shape[0]
            out[i] = (evals[offset : offset + size], evecs[offset : offset + size])
            offset += size
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------- warm eigenbasis
def warm_eigh(M: Tensor, Q: Tensor, iters: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """An eigenbasis of symmetric PSD ``M`` by ``iters`` steps of orthogonal iteration from a
    previous basis ``Q`` (SOAP's warm start): ``Q ← qr(M Q)``, matmuls and one QR, no eigh.

    Before each step the columns are sorted by their Rayleigh quotients ``diag(Qᵀ M Q)``,
    largest first (the order in which orthogonal iteration is stable), and after it each
    column's sign is fixed by ``diag(R) ≥ 0``, so an exact eigenbasis comes back unchanged up
    to that order. A batch element whose ``Q`` is not finite starts from the identity.

    Returns ``(eigenvalues, eigenvectors, drift)`` in the working dtype: the eigenvalues are
    the sorted Rayleigh quotients of the last step's starting basis (clamped at 0), and
    ``drift`` (shape ``M.shape[:-2]``) is the relative off-diagonal mass of ``Qᵀ M Q`` for the
    GIVEN basis, ``‖offdiag(Qᵀ M Q)‖_F / ‖Qᵀ M Q‖_F`` = ``‖M Q − Q diag(d)‖_F / ‖M Q‖_F``
    (Q orthogonal): 0 for an exact eigenbasis, near 1 for an unrelated one; O(n²) given M Q.
    """
    dtype = working_dtype(M.dtype)
    Mw = symmetrize(M.to(dtype))
    eye = torch.eye(M.shape[-1], dtype=dtype, device=M.device)
    Qw = Q.to(dtype)
    Qw = torch.where(torch.isfinite(Qw).flatten(-2).all(-1)[..., None, None], Qw, eye)
    drift = torch.zeros(M.shape[:-2], dtype=dtype, device=M.device)
    evals = torch.diagonal(Mw, dim1=-2, dim2=-1)
    for step in range(iters):
        W = Mw @ Qw
        evals = (Qw * W).sum(-2)  # q_iᵀ M q_i
        if step == 0:
            off = torch.linalg.matrix_norm(W - Qw * evals[..., None, :])
            tiny = torch.finfo(dtype).tiny
            drift = off / torch.linalg.matrix_norm(W).clamp_min(tiny)
        evals, order = evals.sort(dim=-1, descending=True)
        W = W.gather(-1, order[..., None, :].expand_as(W))
        Qw, R = torch.linalg.qr(W)
        signs = torch.diagonal(R, dim1=-2, dim2=-1).sign()
        Qw = Qw * torch.where(signs == 0, torch.ones_like(signs), signs)[..., None, :]
    return evals.clamp_min(0.0), Qw, drift


def batched_warm_eigh(
    pairs: list[tuple[Tensor, Tensor]], iters: int = 1
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`warm_eigh` of many ``(M_i, Q_i)`` batches ``(g_i, n_i, n_i)``, one call per
    distinct ``(n, dtype)`` (same-size factors of different blocks concatenated, as in
    :func:`batched_spd_eigh`). Returns ``(eigenvalues, eigenvectors, drift)`` per input."""
    groups: dict[tuple[int, torch.dtype], list[int]] = {}
    for i, (m, _) in enumerate(pairs):
        groups.setdefault((m.shape[-1], m.dtype), []).append(i)
    out: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(pairs)
    for indices in groups.values():
        Ms = [pairs[i][0] for i in indices]
        Qs = [pairs[i][1].to(Ms[0].dtype) for i in indices]
        joined = (torch.cat(Ms), torch.cat(Qs)) if len(Ms) > 1 else (Ms[0], Qs[0])
        evals, evecs, drift = warm_eigh(*joined, iters=iters)
        offset = 0
        for i, part in zip(indices, Ms, strict=True):
            size = part.shape[0]
            out[i] = tuple(t[offset : offset + size] for t in (evals, evecs, drift))  # type: ignore[assignment]
            offset += size
    return out  # type: ignore[return-value]
