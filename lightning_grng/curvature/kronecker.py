"""Kronecker factor state of one block: EMA statistics, their inverse representation, and the
preconditioning ``(A ⊗ G + γI)⁻¹ vec(V)``.

Two inverse routes:

* ``"eigh"``: ``A = Q_A diag(a) Q_Aᵀ``, ``G = Q_G diag(s) Q_Gᵀ`` and
  ``U = Q_G [(Q_Gᵀ V Q_A) / (s aᵀ + γ)] Q_Aᵀ``: exact Kronecker damping for any γ, so RING's
  per-step damping costs no extra decomposition.
* ``"newton"``: warm-started Newton–Schulz inverses of the factored-damped factors
  ``(A + π√γ I)⁻¹`` and ``(G + √γ/π I)⁻¹`` (π balances the factors' mean eigenvalues), matmuls
  only. The damping is frozen at the last refresh.

The eigen-corrected mode (``preconditioner="eigen"``, ``docs/algorithms.md`` §8) keeps the eigh
route's basis but replaces the eigenvalue products ``s aᵀ`` by :attr:`KroneckerFactors.moment`, a
running second moment of the gradient in that basis (EKFAC, George et al. 2018; SOAP). A basis
refresh carries the moment into the new basis as the diagonal of the same operator, whether the
basis comes from an eigh or from a warm start (``optim/routes.py``, ``refresh="warm"``).
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from lightning_grng.curvature.inverse import (
    WARM_NEWTON_ITERS,
    newton_schulz_cold_start,
    newton_schulz_steps,
    spd_eigh,
    spectral_radius_mask,
)
from lightning_grng.numerics import all_finite, all_finite_each


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


class KroneckerFactors:
    """EMA factors A ``(g, n_in, n_in)`` and G ``(g, n_out, n_out)`` of one block.

    A diagonal A (an embedding's) is stored as ``(g, n_in)``: its eigenvalues are the diagonal
    and its eigenvectors the identity (``evec_A`` stays None), and its Newton inverse is the
    elementwise reciprocal of the damped diagonal. G may be stored as its diagonal
    ``(g, n_out)`` likewise (the factor-size policy ``max_factor``; eigh routes only).

    A convolution's input side may be split per tensor dimension (``split_conv``, gradient
    statistics, eigen route): A ``(g, C, C)`` over input channels and K ``(g, k, k)`` over the
    kernel's taps, the weight columns' basis ``Q_A ⊗ Q_K`` (channel-major, as the weight is
    flattened); a bias column, if any, is left out of both and rotated by Q_G alone.

    Args:
        dtype: storage dtype of the factors (statistics arrive in float32 or better and are cast).
    """

    TENSORS = (
        "A", "G", "eval_A", "evec_A", "eval_G", "evec_G", "inv_A", "inv_G", "moment",
        "rotated_first_moment", "K", "eval_K", "evec_K",
    )  # fmt: skip

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
        #: Eigen-corrected mode: EMA of the squared rotated gradient ``(Q_Gᵀ V Q_A)²``, shape
        #: ``(g, n_out, n_in)``, and how many gradients it holds (for the bias correction).
        self.moment: Tensor | None = None
        self.moment_count = 0
        #: ``momentum_on="gradient"``: EMA of the gradient (Adam's first moment), kept in the
        #: eigenbasis, ``Q_Gᵀ m Q_A``: it is linear in the gradient, so averaging the rotated
        #: gradients is rotating the average, and a basis change maps it exactly
        #: (:func:`carry_first_moment`). One rotation per step fewer than keeping m in
        #: parameter coordinates. And how many gradients it holds.
        self.rotated_first_moment: Tensor | None = None
        self.first_count = 0
        #: The kernel-tap factor of a split input side, its eigenvalues and eigenvectors.
        self.K: Tensor | None = None
        self.eval_K: Tensor | None = None
        self.evec_K: Tensor | None = None
        self.updates = 0
        self.newton_iterations = 0
        #: Device flag: the factors hold at least one accepted statistic (None: loaded state).
        self.valid: Tensor | None = None
        #: Device flag of the last Newton refresh: some warm-started inverse was not usable.
        self.unusable: Tensor | None = None
        #: Host flag, from the step's read-back: the next Newton refresh starts cold.
        self.cold_next = False
        #: The Newton route's damping at its last refresh, γ / mean eigenvalue per group (for
        #: diagnostics; not checkpointed).
        self.damping_ratio: Tensor | None = None
        #: Warm eigen route, device flags of the last refresh per side (A, G, K): the previous
        #: basis had drifted past the route's limit (None: that side was not warm-started).
        self.drifted: tuple[Tensor | None, ...] = (None, None, None)
        #: Host flags per side (A, G, K), from the step's read-back of :attr:`drifted`, or set
        #: by a stand-in basis: the next refresh of that side is a full eigh.
        self.full_next = [False, False, False]

    @property
    def ready(self) -> bool:
        """Whether an inverse representation exists (a preconditioner can be applied)."""
        return self.eval_A is not None or self.inv_A is not None

    @property
    def split(self) -> bool:
        """The input side is split per dimension (channels A ⊗ kernel taps K)."""
        return self.K is not None

    @property
    def a_is_diagonal(self) -> bool:
        """A is stored as its diagonal ``(g, n_in)``."""
        return self.A is not None and self.A.dim() == 2

    @property
    def g_is_diagonal(self) -> bool:
        """G is stored as its diagonal ``(g, n_out)``."""
        return self.G is not None and self.G.dim() == 2

    def mean_eigenvalue(self) -> Tensor:
        """Mean eigenvalue of ``A ⊗ G`` per group, ``(tr A / n_A)·(tr G / n_G)``, shape
        ``(groups,)``: the unit of relative damping (``docs/algorithms.md`` §2)."""
        assert self.A is not None and self.G is not None
        diag_a = self.A if self.a_is_diagonal else torch.diagonal(self.A, dim1=-2, dim2=-1)
        diag_g = self.G if self.g_is_diagonal else torch.diagonal(self.G, dim1=-2, dim2=-1)
        mean = diag_a.mean(-1) * diag_g.mean(-1)
        if self.K is not None:  # the weight columns' A is A ⊗ K
            mean = mean * torch.diagonal(self.K, dim1=-2, dim2=-1).mean(-1)
        return mean

    @property
    def finite(self) -> bool:
        """Host check that both factors exist and are finite (one read-back; not in ``step``)."""
        return self.A is not None and self.G is not None and bool(self.finite_mask())

    def finite_mask(self) -> Tensor:
        """Device flag (0-dim bool): the factors hold an accepted statistic and are finite."""
        assert self.A is not None and self.G is not None
        ok = all_finite(self.A) & all_finite(self.G)
        if self.K is not None:
            ok = ok & all_finite(self.K)
        return ok if self.valid is None else ok & self.valid

    def update(
        self,
        A_batch: Tensor,
        G_batch: Tensor,
        decay: float,
        accept: Tensor | None = None,
        K_batch: Tensor | None = None,
    ) -> Tensor:
        """EMA update ``F ← decay·F + (1 − decay)·F_batch`` of A, G (and K of a split input
        side); the first batch initializes F, and so does any batch after the state became
        non-finite (it would otherwise stay NaN).

        Decided on the device: a batch that is not finite, or whose ``accept`` flag is False
        (a skipped step), leaves the factors unchanged. Returns whether the batch statistics
        were finite (0-dim bool tensor; the caller counts rejections from it).
        """
        names = ("A", "G") if K_batch is None else ("A", "G", "K")
        batches = [F.to(self.dtype) for F in (A_batch, G_batch, K_batch) if F is not None]
        batch_ok = torch.stack([all_finite(F) for F in batches]).all()
        take = batch_ok if accept is None else batch_ok & accept
        if self.A is None or self.G is None:
            for name, F in zip(names, batches, strict=True):
                setattr(self, name, torch.where(take, F, torch.full_like(F, math.nan)))
            self.valid = take
        else:
            restart = ~self.finite_mask()
            for name, F in zip(names, batches, strict=True):
                old = getattr(self, name)
                ema = torch.where(restart, F, old.lerp(F, 1.0 - decay))
                setattr(self, name, torch.where(take, ema, old))
            self.valid = take if self.valid is None else self.valid | take
        self.updates += 1
        return batch_ok

    def _safe_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(A, G, ok)`` with non-finite factors replaced by identities, so a decomposition
        of a corrupted state cannot raise; ``ok`` says whether they were the real factors."""
        assert self.A is not None and self.G is not None
        ok = self.finite_mask()
        if self.a_is_diagonal:
            eye_A = torch.ones(self.A.shape[-1], dtype=self.A.dtype, device=self.A.device)
        else:
            eye_A = torch.eye(self.A.shape[-1], dtype=self.A.dtype, device=self.A.device)
        if self.g_is_diagonal:
            eye_G = torch.ones(self.G.shape[-1], dtype=self.G.dtype, device=self.G.device)
        else:
            eye_G = torch.eye(self.G.shape[-1], dtype=self.G.dtype, device=self.G.device)
        return torch.where(ok, self.A, eye_A), torch.where(ok, self.G, eye_G), ok

    def eigh_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """The matrices the eigh route decomposes and whether they are the real factors."""
        return self._safe_factors()

    def safe_tap_factor(self) -> Tensor | None:
        """A split input side's tap factor, the identity where the factors are not finite."""
        if self.K is None:
            return None
        eye = torch.eye(self.K.shape[-1], dtype=self.K.dtype, device=self.K.device)
        return torch.where(self.finite_mask(), self.K, eye)

    def install_eigh(
        self,
        eig_A: tuple[Tensor, Tensor | None],
        eig_G: tuple[Tensor, Tensor | None],
        inputs_ok: Tensor,
        accept: Tensor | None = None,
        eig_K: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Installs a new eigenbasis where it is usable (device-side), keeps the last good one
        otherwise; the second moment is carried into it (:func:`carry_moment`). ``eig_A``,
        ``eig_G`` (and ``eig_K`` of a split input side) are ``(eigenvalues, eigenvectors)``,
        the eigenvectors None for a side stored as its diagonal. Returns the failure flag
        (0-dim bool): the factors held statistics but the factors or the decomposition were
        not finite (the caller raises the damping)."""
        parts = (*eig_A, *eig_G, *(eig_K or (None, None)))
        decomposed = [t for t in parts if t is not None]  # a diagonal A has no eigenvectors
        ok = inputs_ok & torch.stack([all_finite(t) for t in decomposed]).all()
        take = ok if accept is None else ok & accept
        old = (self.eval_A, self.evec_A, self.eval_G, self.evec_G, self.eval_K, self.evec_K)
        kept = [
            None if new is None else _keep_last_good(new, prev, take)
            for new, prev in zip(parts, old, strict=True)
        ]
        if self.moment is not None or self.rotated_first_moment is not None:
            changes = changes_of_basis((old[1], kept[1]), (old[3], kept[3]), (old[5], kept[5]))
            if self.moment is not None:
                self.moment = _carry(self.moment, changes, square=True)
            if self.rotated_first_moment is not None:
                self.rotated_first_moment = _carry(self.rotated_first_moment, changes, False)
        self.eval_A, self.evec_A, self.eval_G, self.evec_G, self.eval_K, self.evec_K = kept
        self.inv_A = self.inv_G = None
        return self._failed(ok)

    def _failed(self, ok: Tensor) -> Tensor:
        return ~ok if self.valid is None else ~ok & self.valid

    def refresh(
        self,
        method: InverseMethod,
        damping: float | Tensor,
        newton_iters: int,
        accept: Tensor | None = None,
    ) -> Tensor:
        """Recompute the inverse representation without a host read-back. Where the factors or
        the result are not finite, the last good representation is kept (decided on the
        device). Returns the failure flag (0-dim bool tensor).

        The Newton route runs :data:`~lightning_grng.curvature.inverse.WARM_NEWTON_ITERS`
        steps from the previous inverse (a cold start for the batch elements whose warm start
        fails :func:`~lightning_grng.curvature.inverse.spectral_radius_mask`), or
        ``newton_iters`` from a cold start when there is no previous inverse or the last warm
        refresh did not give a usable one (:attr:`cold_next`, set by the optimizer from the
        step's read-back of :attr:`unusable`).
        """
        if method is InverseMethod.EIGH:
            A, G, inputs_ok = self.eigh_inputs()
            K = self.safe_tap_factor()
            try:
                eig_A = (A.clamp_min(0.0), None) if self.a_is_diagonal else spd_eigh(A)
                eig_G = (G.clamp_min(0.0), None) if self.g_is_diagonal else spd_eigh(G)
                eig_K = None if K is None else spd_eigh(K)
            except torch.linalg.LinAlgError:
                return self._failed(torch.zeros_like(inputs_ok))
            return self.install_eigh(eig_A, eig_G, inputs_ok, accept, eig_K)
        A, G, inputs_ok = self._safe_factors()
        pi = pi_split(A, G)
        root = torch.sqrt(damping) if isinstance(damping, Tensor) else math.sqrt(damping)
        M_G = _add_to_diagonal(G, root / pi)
        cold = self.cold_next or self.inv_A is None or self.inv_A.shape != A.shape
        new, usable = [], []
        if self.a_is_diagonal:  # the damped diagonal's inverse is exact: no Newton step
            inv = (A + (pi * root)[..., None]).reciprocal()
            new.append(inv)
            usable.append(torch.isfinite(inv).all(-1))
            pending = [(M_G, self.inv_G)]
        else:
            pending = [(_add_to_diagonal(A, pi * root), self.inv_A), (M_G, self.inv_G)]
        for M, previous in pending:
            X0 = newton_schulz_cold_start(M)
            if not cold and previous is not None:
                eye = torch.eye(M.shape[-1], dtype=X0.dtype, device=M.device)
                prev = previous.to(X0.dtype)
                warm_ok = spectral_radius_mask(eye - prev @ M.to(X0.dtype))
                X0 = torch.where(warm_ok[..., None, None], prev, X0)
            iters = newton_iters if cold else min(WARM_NEWTON_ITERS, newton_iters)
            X, residual = newton_schulz_steps(M, X0, iters)
            finite = torch.isfinite(X).flatten(-2).all(-1)
            # A cold run is kept whenever finite (its convergence is guaranteed); a warm run
            # only where it contracted (‖I − XM‖_F < 1), else the last good inverse stays.
            usable.append(finite if cold else finite & (residual < 1.0))
            new.append(X.to(M.dtype))
        self.newton_iterations = iters
        ok = inputs_ok & torch.stack([all_finite(X) for X in new]).all()
        take = ok if accept is None else ok & accept
        self.unusable = ~(usable[0].all() & usable[1].all())
        mask_A = usable[0][..., None] if self.a_is_diagonal else usable[0][..., None, None]
        self.inv_A = _keep_last_good(new[0], self.inv_A, take & mask_A)
        self.inv_G = _keep_last_good(new[1], self.inv_G, take & usable[1][..., None, None])
        self.eval_A = self.evec_A = self.eval_G = self.evec_G = None
        return self._failed(ok)

    def precondition(self, V: Tensor, damping: float | Tensor) -> Tensor:
        """``(A ⊗ G + γI)⁻¹ vec(V)`` for V of shape ``(g, n_out, n_in)``; γ a float or a
        per-group tensor ``(g,)``.

        Exact damping γ on the eigh route; on the Newton route the factored damping chosen at
        the last refresh is used and ``damping`` is ignored.
        """
        dtype = V.dtype
        if self.eval_A is not None:
            assert self.eval_G is not None
            rotated = self.to_eigenbasis(V)
            gamma = torch.as_tensor(damping, dtype=rotated.dtype, device=rotated.device)
            if gamma.dim() == 1:
                gamma = gamma[:, None, None]
            rotated = rotated / (self.eval_G[..., :, None] * self.eval_A[..., None, :] + gamma)
            return self.from_eigenbasis(rotated, dtype)
        assert self.inv_A is not None and self.inv_G is not None
        Vw = V.to(self.inv_G.dtype)
        if self.inv_A.dim() == 2:  # diagonal A: its inverse is a vector
            return (self.inv_G @ Vw * self.inv_A[..., None, :]).to(dtype)
        return (self.inv_G @ Vw @ self.inv_A).to(dtype)

    def to_eigenbasis(self, V: Tensor) -> Tensor:
        """``Q_Gᵀ V Q_A`` in the working dtype (eigh route only; a diagonal factor is its own
        eigenbasis, ``Q = I``; a split input side's basis is ``Q_A ⊗ Q_K``)."""
        if self.evec_G is None:  # G stored as its diagonal
            assert self.eval_G is not None
            rotated = V.to(self.eval_G.dtype)
        else:
            rotated = self.evec_G.transpose(-1, -2) @ V.to(self.evec_G.dtype)
        return input_side(rotated, self.evec_A, self.evec_K)

    def from_eigenbasis(self, R: Tensor, dtype: torch.dtype, transposed: bool = False) -> Tensor:
        """``Q_G R Q_Aᵀ`` cast to ``dtype``: the inverse of :meth:`to_eigenbasis`.

        ``transposed``: lay the result out in memory as its transpose (a block whose matrix is
        its weight's transpose, :attr:`KroneckerBlock.transposed_matrix`), so the direction
        comes out contiguous in the weight's own layout. Same values; on a 20,000-row
        embedding an elementwise op mixing the two layouts costs 20× a contiguous one."""
        if transposed and self.evec_A is None and self.evec_G is not None:
            return (R.mT @ self.evec_G.mT).mT.to(dtype)  # (Q_G R)ᵀ = Rᵀ Q_Gᵀ, row-major
        out = R if self.evec_G is None else self.evec_G @ R
        return input_side(out, _transposed(self.evec_A), _transposed(self.evec_K)).to(dtype)

    def eigen_moments(
        self, R: Tensor, beta2: float, beta1: float | None, shape: torch.Size | None = None
    ) -> tuple[Tensor, Tensor | None, tuple[float, float]]:
        """The moments that absorb this step's rotated gradient ``R`` (zeros at the first step
        and after a change of shape): the second moment, the first (kept in the eigenbasis;
        None when ``beta1`` is None), and Adam's bias corrections ``(1 − β₂ᵗ, 1 − β₁ᵗ)`` with
        this step counted. :func:`~lightning_grng.optim.eigen_scale.eigen_scale` updates the
        moments in place. ``shape``: the block's, where ``R`` holds some of its rows."""
        shape = R.shape if shape is None else shape
        if self.moment is None or self.moment.shape != shape:
            self.moment = torch.zeros(shape, dtype=R.dtype, device=R.device)
            self.moment_count = 0
        self.moment_count += 1
        second = 1.0 - beta2**self.moment_count
        if beta1 is None:
            return self.moment, None, (second, 1.0)
        m = self.rotated_first_moment
        if m is None or m.shape != shape:
            self.rotated_first_moment = torch.zeros(shape, dtype=self.dtype, device=R.device)
            self.first_count = 0
        self.first_count += 1
        return self.moment, self.rotated_first_moment, (second, 1.0 - beta1**self.first_count)

    def state_dict(self) -> dict[str, object]:
        state: dict[str, object] = {"updates": self.updates, "moment_count": self.moment_count}
        if self.rotated_first_moment is not None:
            state["first_count"] = self.first_count
        if any(self.full_next):  # a pending full eigh (warm route; a stand-in basis)
            state["full_next"] = list(self.full_next)
        for key in self.TENSORS:
            value = getattr(self, key)
            if value is not None:
                state[key] = value
        return state

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        self.updates = int(state.get("updates", 0))  # type: ignore[arg-type]
        self.moment_count = int(state.get("moment_count", 0))  # type: ignore[arg-type]
        self.first_count = int(state.get("first_count", 0))  # type: ignore[arg-type]
        for key in self.TENSORS:
            value = state.get(key)
            # Keep the saved dtype: optimizer checkpoints must not silently downcast factors.
            setattr(self, key, None if value is None else value.to(device))  # type: ignore[union-attr]
        if self.A is not None:
            self.dtype = self.A.dtype
        legacy = state.get("first_moment")  # kept in parameter coordinates before 2026-12-06
        if legacy is not None and self.rotated_first_moment is None and self.ready:
            rotated = self.to_eigenbasis(legacy.to(device))  # type: ignore[union-attr]
            self.rotated_first_moment = rotated.to(legacy.dtype)  # type: ignore[union-attr]
        self.valid = self.unusable = None
        self.cold_next = False
        self.drifted = (None, None, None)
        pending = [bool(x) for x in state.get("full_next", ())]  # type: ignore[union-attr]
        self.full_next = [*pending, False, False, False][:3]


def update_stacked(
    members: list[KroneckerFactors],
    A_batch: Tensor,
    G_batch: Tensor,
    decay: float,
    accept: Tensor | None = None,
) -> Tensor:
    """:meth:`KroneckerFactors.update` of k blocks at once (``optim/batching.py``): their
    factors initialized already, dense and alike in shape and dtype, their statistics stacked
    ``(k, g, n, n)``. Each member decides alone (its batch finite, its state restarted where
    it was not finite); the new factors are views of one stacked result. Returns each
    member's "statistics finite" flag, ``(k,)``."""
    dtype = members[0].dtype
    batches = {"A": A_batch.to(dtype), "G": G_batch.to(dtype)}
    batch_ok = all_finite_each(batches["A"]) & all_finite_each(batches["G"])  # (k, 1, 1, 1)
    take = batch_ok if accept is None else batch_ok & accept
    olds = {name: torch.stack([getattr(f, name) for f in members]) for name in batches}
    # A loaded state (valid None) counts as valid here, and holds only this batch's flag after.
    true = torch.ones((), dtype=torch.bool, device=A_batch.device)
    valid = torch.stack([true if f.valid is None else f.valid for f in members])
    prior = torch.stack([~true if f.valid is None else f.valid for f in members])
    state_ok = all_finite_each(olds["A"]) & all_finite_each(olds["G"])
    restart = ~(state_ok & valid[:, None, None, None])
    for name, F in batches.items():
        old = olds[name]
        new = torch.where(take, torch.where(restart, F, old.lerp(F, 1.0 - decay)), old)
        for f, value in zip(members, new.unbind(0), strict=True):
            setattr(f, name, value)
    for f, flag in zip(members, (prior | take.reshape(-1)).unbind(0), strict=True):
        f.valid = flag
        f.updates += 1
    return batch_ok.reshape(-1)


def input_side(X: Tensor, M: Tensor | None, M_K: Tensor | None = None) -> Tensor:
    """``X`` ``(g, n_out, n_in)`` times the input side's matrix: ``X M``, or for a split side
    ``X (M ⊗ M_K)`` on the first ``C·k`` columns (channel-major) as two mode products, the
    remaining (bias) column unchanged. None is the identity."""
    if M is None:
        return X
    X = X.to(M.dtype)
    if M_K is None:
        return X @ M
    C, k = M.shape[-1], M_K.shape[-1]
    width = C * k
    T = X[..., :width].reshape(*X.shape[:-1], C, k)  # (g, o, C, k)
    # Each mode product as one matmul per group, (o·k × C)(C × C) and (o·C × k)(k × k): a
    # matmul broadcasting M over the o rows runs o small products on copies of M (1.8× slower
    # on a 512-channel conv).
    T = torch.einsum("...oct,...cd->...odt", T, M)  # channels
    T = torch.einsum("...oct,...ts->...ocs", T, M_K).reshape(*X.shape[:-1], width)  # taps
    return T if width == X.shape[-1] else torch.cat([T, X[..., width:]], dim=-1)


def _transposed(Q: Tensor | None) -> Tensor | None:
    return None if Q is None else Q.transpose(-1, -2)


Basis = tuple[Tensor | None, Tensor | None]


def carry_moment(
    moment: Tensor, basis_A: Basis, basis_G: Basis, basis_K: Basis = (None, None)
) -> Tensor:
    """The second moment after a basis change ``(old, new)`` of each factor.

    The moment is the diagonal of an operator ``M = diag(m)`` in the old basis; in the new one
    its diagonal is ``(P_G∘P_G) m (P_A∘P_A)ᵀ`` with ``P = Q_newᵀ Q_old`` (``docs/algorithms.md``
    §8); for a split input side ``P_A ⊗ P_K``, whose elementwise square is
    ``(P_A∘P_A) ⊗ (P_K∘P_K)``. Exact when the basis is unchanged (also up to signs and the
    order of eigenvectors); the off-diagonal part the new basis would see is dropped, which is
    the mode's approximation. A missing old basis (the first decomposition) or A stored as its
    diagonal keeps that side.
    """
    return _carry(moment, changes_of_basis(basis_A, basis_G, basis_K), square=True)


def carry_first_moment(
    m: Tensor, basis_A: Basis, basis_G: Basis, basis_K: Basis = (None, None)
) -> Tensor:
    """The rotated first moment after a basis change ``(old, new)`` of each factor, exactly:
    ``Q_G,newᵀ (Q_G,old m Q_A,oldᵀ) Q_A,new`` (for a split input side, ``Q_A ⊗ Q_K``). Where
    the result is not finite (a failed first decomposition), the moment is kept."""
    return _carry(m, changes_of_basis(basis_A, basis_G, basis_K), square=False)


def changes_of_basis(
    basis_A: Basis, basis_G: Basis, basis_K: Basis = (None, None)
) -> tuple[Tensor | None, Tensor | None, Tensor | None, bool]:
    """``Q_oldᵀ Q_new`` of each side (A, G, K) whose basis changed (None where there is
    nothing to map), and whether the input side is split: computed once per refresh for
    both moments."""
    return (*(_change_of_basis(b) for b in (basis_A, basis_G, basis_K)), basis_K[1] is not None)


def _carry(
    x: Tensor, changes: tuple[Tensor | None, Tensor | None, Tensor | None, bool], square: bool
) -> Tensor:
    """``x`` mapped into the new basis by the changes of basis ``P`` of each side, or by their
    elementwise squares (``square``: the second moment's diagonal carry). A non-finite result
    (a non-finite old basis, a failed first decomposition) keeps ``x``."""
    *maps, split = changes
    if square:
        maps = [None if P is None else P * P for P in maps]
    map_A, map_G, map_K = maps
    out = x
    if map_G is not None:
        out = _left_multiply(map_G.transpose(-1, -2), out.to(map_G.dtype))
    if map_A is not None and (not split or map_K is not None):
        out = input_side(out, map_A, map_K)
    return _finite_or_kept(out.to(x.dtype), x)


def _finite_or_kept(new: Tensor, old: Tensor) -> Tensor:
    """``new`` if all of it is finite, else ``old`` (decided on the device), iterated over the
    storage's own order where both are transposed views (row-major moments: ~2× faster)."""
    ok = all_finite(new)
    if not new.is_contiguous() and new.mT.is_contiguous() and old.mT.is_contiguous():
        return torch.where(ok, new.mT, old.mT).mT
    return torch.where(ok, new, old)


def _left_multiply(M: Tensor, X: Tensor) -> Tensor:
    """``M @ X``, laid out like ``X`` where X is the transposed view of a contiguous tensor (an
    embedding's moments, kept row-major: ``optim/lazy_rows.py``), so the carried moment keeps
    its layout and the ops mixing it with the old one stay contiguous."""
    if X.mT.is_contiguous() and not X.is_contiguous():
        return (X.mT @ M.mT).mT
    return M @ X


def _change_of_basis(basis: Basis) -> Tensor | None:
    """``Q_oldᵀ Q_new`` of a side whose basis changed; None when there is nothing to map."""
    old, new = basis
    if old is None or new is None or old.shape != new.shape:
        return None
    return old.to(new.dtype).transpose(-1, -2) @ new


def _keep_last_good(new: Tensor, previous: Tensor | None, take: Tensor) -> Tensor:
    """``new`` where ``take``, else the previous value (NaN where there is none yet, so the
    preconditioned direction is not finite and the optimizer falls back to the gradient)."""
    if previous is None or previous.shape != new.shape:
        previous = torch.full_like(new, math.nan)
    return torch.where(take, new, previous.to(new.dtype))
