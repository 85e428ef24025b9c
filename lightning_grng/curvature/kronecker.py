"""Kronecker factor state of one block: EMA statistics, their inverse representation, and the
preconditioning ``(A ⊗ G + γI)⁻¹ vec(V)``.

Two inverse routes:

* ``"eigh"``: ``A = Q_A diag(a) Q_Aᵀ``, ``G = Q_G diag(s) Q_Gᵀ`` and
  ``U = Q_G [(Q_Gᵀ V Q_A) / (s aᵀ + γ)] Q_Aᵀ``: exact Kronecker damping for any γ, so RING's
  per-step damping costs no extra decomposition.
* ``"newton"``: warm-started Newton–Schulz inverses of the factored-damped factors
  ``(A + π√γ I)⁻¹`` and ``(G + √γ/π I)⁻¹`` (π balances the factors' mean eigenvalues), matmuls
  only. The damping is frozen at the last refresh.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from lightning_grng.curvature.inverse import NewtonSchulzResult, newton_schulz_inverse, spd_eigh


class InverseMethod(str, Enum):
    EIGH = "eigh"
    NEWTON = "newton"


def pi_split(A: Tensor, G: Tensor) -> Tensor:
    """π per group: ``sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015, §6.3).

    ``A`` may be stored as its diagonal ``(g, n)``."""
    mean_a = (A if A.dim() == 2 else torch.diagonal(A, dim1=-2, dim2=-1)).mean(-1)
    mean_g = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
    tiny = torch.finfo(mean_a.dtype).tiny
    return torch.sqrt(mean_a.clamp_min(tiny) / mean_g.clamp_min(tiny))


def _add_to_diagonal(M: Tensor, value: Tensor) -> Tensor:
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    return M + value[..., None, None] * eye


def _diagonal_inverse(d: Tensor) -> NewtonSchulzResult:
    """Inverse of a positive diagonal matrix stored as its diagonal: ``1/d`` elementwise
    (exact, so no Newton step is taken)."""
    return NewtonSchulzResult(d.reciprocal(), 0, 0.0, False)


class KroneckerFactors:
    """EMA factors A ``(g, n_in, n_in)`` and G ``(g, n_out, n_out)`` of one block.

    A diagonal A (an embedding's) is stored as ``(g, n_in)``: its eigenvalues are the diagonal
    and its eigenvectors the identity (``evec_A`` stays None), and its Newton inverse is the
    elementwise reciprocal of the damped diagonal.

    Args:
        dtype: storage dtype of the factors (statistics arrive in float32 or better and are cast).
    """

    TENSORS = ("A", "G", "eval_A", "evec_A", "eval_G", "evec_G", "inv_A", "inv_G")

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.A: Tensor | None = None
        self.G: Tensor | None = None
        self.eval_A: Tensor | None = None
        self.evec_A: Tensor | None = None
        self.eval_G: Tensor | None = None
        self.evec_G: Tensor | None = None
        self.inv_A: Tensor | None = None
        self.inv_G: Tensor | None = None
        self.updates = 0
        self.newton_iterations = 0

    @property
    def ready(self) -> bool:
        """Whether an inverse representation exists (a preconditioner can be applied)."""
        return self.eval_A is not None or self.inv_A is not None

    @property
    def a_is_diagonal(self) -> bool:
        """A is stored as its diagonal ``(g, n_in)``."""
        return self.A is not None and self.A.dim() == 2

    def mean_eigenvalue(self) -> Tensor:
        """Mean eigenvalue of ``A ⊗ G`` per group, ``(tr A / n_A)·(tr G / n_G)``, shape
        ``(groups,)``: the unit of relative damping (``docs/algorithms.md`` §2)."""
        assert self.A is not None and self.G is not None
        diag_a = self.A if self.a_is_diagonal else torch.diagonal(self.A, dim1=-2, dim2=-1)
        return diag_a.mean(-1) * torch.diagonal(self.G, dim1=-2, dim2=-1).mean(-1)

    @property
    def finite(self) -> bool:
        return bool(
            self.A is not None
            and self.G is not None
            and torch.isfinite(self.A).all()
            and torch.isfinite(self.G).all()
        )

    def update(self, A_batch: Tensor, G_batch: Tensor, decay: float) -> None:
        """EMA update ``F ← decay·F + (1 − decay)·F_batch``; the first batch initializes F, and
        so does any batch after the state became non-finite (it would otherwise stay NaN)."""
        A_batch, G_batch = A_batch.to(self.dtype), G_batch.to(self.dtype)
        if self.A is None or self.G is None or not bool(self.finite):
            self.A, self.G = A_batch.clone(), G_batch.clone()
        else:
            self.A.mul_(decay).add_(A_batch, alpha=1.0 - decay)
            self.G.mul_(decay).add_(G_batch, alpha=1.0 - decay)
        self.updates += 1

    def refresh(self, method: InverseMethod, damping: float | Tensor, newton_iters: int) -> bool:
        """Recompute the inverse representation. Returns False (and keeps the last good one)
        when the factors or the result are not finite or the decomposition fails.

        ``damping`` is γ in the units of A ⊗ G: a float or a per-group tensor ``(groups,)``."""
        if not self.finite:
            return False
        if method is InverseMethod.EIGH:
            try:
                if self.a_is_diagonal:
                    eval_A, evec_A = self.A.clamp_min(0.0), None  # type: ignore[union-attr]
                else:
                    eval_A, evec_A = spd_eigh(self.A)
                eval_G, evec_G = spd_eigh(self.G)
            except torch.linalg.LinAlgError:
                return False
            decomposed = [t for t in (eval_A, evec_A, eval_G, evec_G) if t is not None]
            if not all(torch.isfinite(t).all() for t in decomposed):
                return False
            self.eval_A, self.evec_A, self.eval_G, self.evec_G = eval_A, evec_A, eval_G, evec_G
            self.inv_A = self.inv_G = None
            return True
        pi = pi_split(self.A, self.G)
        root = torch.as_tensor(damping, dtype=self.A.dtype, device=self.A.device).sqrt()
        res_A = (
            _diagonal_inverse(self.A + (pi * root)[..., None])
            if self.a_is_diagonal
            else newton_schulz_inverse(
                _add_to_diagonal(self.A, pi * root), self.inv_A, max_iters=newton_iters
            )
        )
        res_G = newton_schulz_inverse(
            _add_to_diagonal(self.G, root / pi), self.inv_G, max_iters=newton_iters
        )
        if not (torch.isfinite(res_A.inverse).all() and torch.isfinite(res_G.inverse).all()):
            return False
        self.inv_A, self.inv_G = res_A.inverse, res_G.inverse
        self.eval_A = self.evec_A = self.eval_G = self.evec_G = None
        self.newton_iterations = max(res_A.iterations, res_G.iterations)
        return True

    def precondition(self, V: Tensor, damping: float | Tensor) -> Tensor:
        """``(A ⊗ G + γI)⁻¹ vec(V)`` for V of shape ``(g, n_out, n_in)``; γ a float or a
        per-group tensor ``(g,)``.

        Exact damping γ on the eigh route; on the Newton route the factored damping chosen at
        the last refresh is used and ``damping`` is ignored.
        """
        dtype = V.dtype
        if self.eval_A is not None:
            QA, QG = self.evec_A, self.evec_G
            assert QG is not None and self.eval_G is not None
            rotated = QG.transpose(-1, -2) @ V.to(QG.dtype)
            if QA is not None:  # a diagonal A is its own eigenbasis
                rotated = rotated @ QA
            gamma = torch.as_tensor(damping, dtype=rotated.dtype, device=rotated.device)
            if gamma.dim() == 1:
                gamma = gamma[:, None, None]
            rotated = rotated / (self.eval_G[..., :, None] * self.eval_A[..., None, :] + gamma)
            out = QG @ rotated
            return (out if QA is None else out @ QA.transpose(-1, -2)).to(dtype)
        assert self.inv_A is not None and self.inv_G is not None
        out = self.inv_G @ V.to(self.inv_G.dtype)
        if self.inv_A.dim() == 2:  # the inverse of a diagonal A, as its diagonal
            return (out * self.inv_A[..., None, :]).to(dtype)
        return (out @ self.inv_A).to(dtype)

    def state_dict(self) -> dict[str, object]:
        state: dict[str, object] = {"updates": self.updates}
        for key in self.TENSORS:
            value = getattr(self, key)
            if value is not None:
                state[key] = value
        return state

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        self.updates = int(state.get("updates", 0))  # type: ignore[arg-type]
        for key in self.TENSORS:
            value = state.get(key)
            # Keep the saved dtype: optimizer checkpoints must not silently downcast factors.
            setattr(self, key, None if value is None else value.to(device))  # type: ignore[union-attr]
        if self.A is not None:
            self.dtype = self.A.dtype
