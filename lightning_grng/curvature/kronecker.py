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

from lightning_grng.curvature.inverse import newton_schulz_inverse, spd_eigh


class InverseMethod(str, Enum):
    EIGH = "eigh"
    NEWTON = "newton"


def pi_split(A: Tensor, G: Tensor) -> Tensor:
    """π per group: ``sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015, §6.3)."""
    mean_a = torch.diagonal(A, dim1=-2, dim2=-1).mean(-1)
    mean_g = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
    tiny = torch.finfo(mean_a.dtype).tiny
    return torch.sqrt(mean_a.clamp_min(tiny) / mean_g.clamp_min(tiny))


def _add_to_diagonal(M: Tensor, value: Tensor) -> Tensor:
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    return M + value[..., None, None] * eye


class KroneckerFactors:
    """EMA factors A ``(g, n_in, n_in)`` and G ``(g, n_out, n_out)`` of one block.

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
        return self.evec_A is not None or self.inv_A is not None

    def mean_eigenvalue(self) -> Tensor:
        """Mean eigenvalue of ``A ⊗ G`` per group, ``(tr A / n_A)·(tr G / n_G)``, shape
        ``(groups,)``: the unit of relative damping (``docs/algorithms.md`` §2)."""
        assert self.A is not None and self.G is not None
        mean_a = torch.diagonal(self.A, dim1=-2, dim2=-1).mean(-1)
        mean_g = torch.diagonal(self.G, dim1=-2, dim2=-1).mean(-1)
        return mean_a * mean_g

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
                eval_A, evec_A = spd_eigh(self.A)
                eval_G, evec_G = spd_eigh(self.G)
            except torch.linalg.LinAlgError:
                return False
            if not all(torch.isfinite(t).all() for t in (eval_A, evec_A, eval_G, evec_G)):
                return False
            self.eval_A, self.evec_A, self.eval_G, self.evec_G = eval_A, evec_A, eval_G, evec_G
            self.inv_A = self.inv_G = None
            return True
        pi = pi_split(self.A, self.G)
        root = torch.as_tensor(damping, dtype=self.A.dtype, device=self.A.device).sqrt()
        res_A = newton_schulz_inverse(
            _add_to_diagonal(self.A, pi * root), self.inv_A, max_iters=newton_iters
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
        if self.evec_A is not None:
            QA, QG = self.evec_A, self.evec_G
            assert QG is not None and self.eval_G is not None and self.eval_A is not None
            Vw = V.to(QA.dtype)
            rotated = QG.transpose(-1, -2) @ Vw @ QA
            gamma = torch.as_tensor(damping, dtype=rotated.dtype, device=rotated.device)
            if gamma.dim() == 1:
                gamma = gamma[:, None, None]
            rotated = rotated / (self.eval_G[..., :, None] * self.eval_A[..., None, :] + gamma)
            return (QG @ rotated @ QA.transpose(-1, -2)).to(dtype)
        assert self.inv_A is not None and self.inv_G is not None
        return (self.inv_G @ V.to(self.inv_G.dtype) @ self.inv_A).to(dtype)

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
