"""Preconditioner routes: how a Kronecker block's factors become a step direction.

Each route is one class with one interface: its defaults, its momentum style, how it refreshes
the factors' representation (:meth:`Route.refresh`) and how it turns a gradient into a
direction (:meth:`Route.direction`). The damping comes in as an explicit argument and goes
through the one rule of ``optim/damping.py``.

===========  ========================================  ===========================================
route        refresh                                   direction
===========  ========================================  ===========================================
eigen        batched eigh of A and G                   ``Q (D + γ + ρR∘R)^(−p) Qᵀ g``, D a running
                                                       second moment of R = Qᵀ g (§8)
eigen_warm   ``Q ← qr(F Q)`` from the previous basis   as eigen
             (batched; eigh at first and on drift)
eigh         batched eigh of A and G                   ``(A ⊗ G + γI)⁻¹ g`` exactly, γ per step
newton       warm Newton–Schulz inverses of the        ``(A + π√γ I)⁻¹`` ⊗ ``(G + √γ/π I)⁻¹``, γ
             factored-damped factors (matmuls only)    frozen at the refresh
===========  ========================================  ===========================================

The eigh-based routes also take two cost options of the optimizer: a factor stored as its
diagonal (``max_factor``; its eigenbasis is the identity) and a stand-in identity basis for a
wide block's first refresh off its staggered slot (``stagger_first``, :attr:`Due.stand_in`).

A new route is one more subclass, listed in :func:`route_for`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.inverse import (
    batched_spd_eigh,
    batched_warm_eigh,
    settle_null_space,
)
from lightning_grng.curvature.kronecker import InverseMethod, KroneckerFactors
from lightning_grng.optim import lazy_rows
from lightning_grng.optim.damping import DampingArgs, eigen_damping, kronecker_damping
from lightning_grng.optim.eigen_scale import EigenScale
from lightning_grng.optim.lazy_rows import TouchedRows
from lightning_grng.optim.validation import check_int


class Preconditioner(str, Enum):
    """How a block's gradient is scaled in the Kronecker eigenbasis (``docs/algorithms.md`` §8)."""

    #: ``(A ⊗ G + γI)⁻¹``: the eigenvalue products ``s aᵀ`` (the paper's K-FAC; eigh or Newton).
    KFAC = "kfac"
    #: ``(D + γ)^(−power)`` in the eigenbasis of A and G, with D a running second moment of the
    #: rotated gradient (eigenvalue-corrected, EKFAC/SOAP-like; eigh only).
    EIGEN = "eigen"


class CurvatureSource(str, Enum):
    """Where the Kronecker factors come from (``docs/algorithms.md`` §8.6)."""

    #: The paper's K-FAC statistics: A = E[a aᵀ] of the layer inputs, G = E[δ δᵀ] of the
    #: output gradients (captured by hooks).
    KFAC = "kfac"
    #: Gradient statistics (Shampoo/SOAP): E[Vᵀ V] and E[V Vᵀ] of the weight's gradient V.
    GRADIENT = "gradient"


#: The statistics and refresh schedule of each source when the optimizer is given None: gradient
#: statistics cost two matmuls per block, so they are taken every step, as SOAP does;
#: K-FAC statistics need the activation capture, so every 5 (``docs/defaults.md``).
SOURCE_DEFAULTS: dict[CurvatureSource, dict[str, int]] = {
    CurvatureSource.KFAC: dict(curvature_every=5, inverse_every=20),
    CurvatureSource.GRADIENT: dict(curvature_every=1, inverse_every=10),
}


class OneSided(str, Enum):
    """Which side of each weight keeps its factor (the optimizers' ``one_sided``); the other
    is kept as its diagonal, an identity eigenbasis."""

    #: The input side (A, the weight's columns): the side that carried the curvature's benefit
    #: on the benchmark models (docs/defaults.md).
    INPUT = "input"
    #: The narrower side: the state is at most twice the weight plus its two moments (4x).
    NARROWER = "narrower"


class BasisRefresh(str, Enum):
    """How the eigen mode keeps its eigenbasis up to date (the optimizers' ``refresh``)."""

    #: A full eigh of every due factor (batched per size).
    EIGH = "eigh"
    #: Orthogonal iteration from the previous basis, ``Q ← qr(F Q)`` (SOAP's warm start); a
    #: full eigh only at the first refresh and after the basis drifted (:class:`WarmEigenRoute`).
    WARM = "warm"


class MomentumOn(str, Enum):
    """What momentum averages (``docs/algorithms.md`` §8.4)."""

    #: The preconditioned direction U (an EMA in the eigen mode, heavy ball in the kfac mode).
    DIRECTION = "direction"
    #: The gradient, whose first moment is then preconditioned (Adam's and SOAP's order;
    #: eigen mode only).
    GRADIENT = "gradient"


@dataclass
class Due:
    """A block whose representation is refreshed this step, with its damping (the routes that
    fold the damping into the representation read it; the others ignore it)."""

    block: KroneckerBlock
    factors: KroneckerFactors
    damping: DampingArgs
    #: Install a stand-in basis (the identity, the factors' diagonals as eigenvalues) instead
    #: of decomposing: a wide block's first refresh off its staggered slot (``stagger_first``);
    #: its decomposition comes on the slot.
    stand_in: bool = False
    #: Per side (A, G, and K of a split input side), an upper bound on the factor's rank
    #: where it may be below the width (gradient statistics after few updates), else None:
    #: the eigenbasis of such a side gets a unique null-space basis
    #: (:func:`~lightning_grng.curvature.inverse.settle_null_space`).
    rank_bound: tuple[int | None, ...] = (None, None, None)


#: How one side (A or G) of a due block is refreshed by the eigh-based routes.
DIAGONAL, STAND_IN, FULL, WARM = "diagonal", "stand_in", "full", "warm"


class Route(ABC):
    """One preconditioner route. Subclasses set the defaults and implement the two stages.

    Args:
        beta2: decay of the eigen route's second moment.
        power: the eigen route's exponent p in ``(D + γ)^(−p)``.
        newton_iters: the Newton route's iterations from a cold start.
        first_moment: precondition the gradient's first moment (see :attr:`first_moment`).
        compile: fuse the eigen route's elementwise stage with ``torch.compile``.
    """

    #: The route's name (``docs/defaults.md`` lists the defaults below per route).
    name: ClassVar[str]
    #: Default λ (relative units).
    damping: ClassVar[float]
    #: Default Adam-fallback lr, as a multiple of the group's lr.
    fallback_lr: ClassVar[float]
    #: RING's default ρ in this route's units.
    ring_rho: ClassVar[float]
    #: Momentum as an EMA ``m ← μm + (1 − μ)U`` (the step keeps U's units, as Adam's first
    #: moment does) instead of heavy ball ``m ← μm + U``.
    momentum_ema: ClassVar[bool] = False

    def __init__(
        self,
        beta2: float,
        power: float,
        newton_iters: int,
        first_moment: bool = False,
        compile: bool = False,
    ) -> None:
        self.beta2, self.power, self.newton_iters = beta2, power, newton_iters
        #: Fuse the eigen route's elementwise stage with ``torch.compile`` (the optimizers
        #: refuse it for the other routes, which have none).
        self.compile = compile
        #: The route preconditions Adam's first moment of the gradient (``momentum_on=
        #: "gradient"``: SOAP's order) instead of the gradient; the template's momentum on the
        #: direction is then off for its blocks.
        self.first_moment = first_moment

    @abstractmethod
    def refresh(self, due: list[Due], accept: Tensor | None) -> list[Tensor]:
        """Recomputes the representation of every due block on the device, keeping the last
        good one where a result is not finite or ``accept`` (the step's flag) is False.
        Returns one failure flag (0-dim bool) per block."""

    @abstractmethod
    def direction(
        self,
        block: KroneckerBlock,
        factors: KroneckerFactors,
        V: Tensor,
        damping: DampingArgs,
        beta1: float = 0.0,
        rows: TouchedRows | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The preconditioned ``(groups, n_out, n_in)`` matrix of gradient ``V`` and the damping
        used, in the route's units (γ / mean curvature per group; None if unknown). ``beta1``
        is the group's momentum, for a route that keeps the gradient's first moment itself
        (:attr:`first_moment`). ``rows``: the touched rows of an embedding updated lazily
        (``optim/lazy_rows.py``; the eigen route's), None for a dense update."""


class EighRoute(Route):
    """``(A ⊗ G + γI)⁻¹ g`` from the eigendecompositions of A and G: exact damping for any γ,
    so RING's per-step damping costs no extra decomposition."""

    name = "eigh"
    damping = 100.0
    fallback_lr = 0.1
    ring_rho = 10.0

    def refresh(self, due: list[Due], accept: Tensor | None) -> list[Tensor]:
        """All due factors decomposed by :func:`batched_spd_eigh`, one call per size. A factor
        stored as its diagonal (an embedding's A, ``max_factor``) is its own decomposition; a
        stand-in block gets the identity basis; the warm route warm-starts what it can."""
        inputs = [d.factors.eigh_inputs() for d in due]
        plans = [
            [(self._side_kind(d, side, M), M, Q) for side, (M, Q) in enumerate(_sides(d, A, G))]
            for d, (A, G, _) in zip(due, inputs, strict=True)
        ]
        full = [M for plan in plans for kind, M, _ in plan if kind == FULL]
        try:
            eigs = iter(batched_spd_eigh(full) if full else [])
        except torch.linalg.LinAlgError:  # even the float64 retry: one block at a time
            return [_decompose_alone(d.factors, accept) for d in due]
        warm = iter(self._warm([(M, Q) for plan in plans for k, M, Q in plan if k == WARM]))
        failed = []
        for d, (_, _, ok), plan in zip(due, inputs, plans, strict=True):
            results = [
                _settled(self._side_result(kind, M, eigs, warm), kind, bound)
                for (kind, M, _), bound in zip(plan, d.rank_bound, strict=False)
            ]
            eig_K = results[2][0] if len(results) == 3 else None
            failed.append(d.factors.install_eigh(results[0][0], results[1][0], ok, accept, eig_K))
            d.factors.drifted = tuple(drift for _, drift in results) + (None,) * (3 - len(results))
            d.factors.full_next = [d.stand_in] * 3
        return failed

    def _side_kind(self, d: Due, side: int, M: Tensor) -> str:
        """How side ``side`` (0: A, 1: G) of a due block is refreshed."""
        if M.dim() == 2:
            return DIAGONAL
        return STAND_IN if d.stand_in else FULL

    def _warm(self, pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Warm starts ``(factor, previous basis)`` (the warm route's; none here)."""
        return []

    def _side_result(
        self, kind: str, M: Tensor, eigs: Any, warm: Any
    ) -> tuple[tuple[Tensor, Tensor | None], Tensor | None]:
        """``((eigenvalues, eigenvectors), drifted flag or None)`` of one side."""
        if kind == DIAGONAL:
            return (M.clamp_min(0.0), None), None
        if kind == STAND_IN:
            eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)
            return (torch.diagonal(M, dim1=-2, dim2=-1).clamp_min(0.0), eye), None
        if kind == FULL:
            return next(eigs), None
        raise ValueError(f"the {self.name} route has no {kind!r} refresh")

    def direction(
        self,
        block: KroneckerBlock,
        factors: KroneckerFactors,
        V: Tensor,
        damping: DampingArgs,
        beta1: float = 0.0,
        rows: TouchedRows | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        gamma, ratio = kronecker_damping(
            factors.mean_eigenvalue(), block.n_in * block.n_out, damping
        )
        return factors.precondition(V, gamma), ratio


class EigenRoute(EighRoute):
    """The eigenvalue-corrected route (§8): the eigenbasis Q of A and G, each direction scaled
    by a running, bias-corrected second moment D of the rotated gradient ``R = Qᵀ g``:
    ``U = Q (D + γ + ρR∘R)^(−power) Qᵀ g``. The basis is refreshed like :class:`EighRoute`'s;
    the moment is carried into a new basis by :meth:`KroneckerFactors.install_eigh`."""

    name = "eigen"
    damping = 1e-4
    fallback_lr = 1.0
    ring_rho = 0.1
    momentum_ema = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The arithmetic between the rotations (``optim/eigen_scale.py``), fused by
        #: ``torch.compile`` with ``compile=True``.
        self.scale = EigenScale(self.compile)

    def direction(
        self,
        block: KroneckerBlock,
        factors: KroneckerFactors,
        V: Tensor,
        damping: DampingArgs,
        beta1: float = 0.0,
        rows: TouchedRows | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Absorbs this step's ``R`` into D (the route's per-step state), then scales R, or,
        with :attr:`first_moment`, the rotated first moment of the gradient (Adam in the
        eigenbasis, as SOAP: ``Q (Qᵀ m̂ Q ∘ (D + γ + ρR∘R)^(−p)) Qᵀ``). With ``rows``, the
        same for the touched rows alone (``optim/lazy_rows.py``)."""
        beta1_kept = beta1 if self.first_moment else None
        if rows is not None:
            return self._rows_direction(factors, V, damping, beta1, beta1_kept, rows)
        R = factors.to_eigenbasis(V)
        moment, first, corrections = factors.eigen_moments(R, self.beta2, beta1_kept)
        ratio, relative = eigen_damping(damping, R)
        scaled = self.scale(
            R, moment, first, ratio, corrections, self.beta2, beta1,
            relative, damping.rho, damping.gr_form, self.power,
        )  # fmt: skip
        return factors.from_eigenbasis(scaled, V.dtype, block.transposed_matrix), ratio

    def stacked_direction(
        self, members: list[KroneckerFactors], V: Tensor, damping: DampingArgs, beta1: float
    ) -> tuple[Tensor, Tensor]:
        """:meth:`direction` of k blocks at once (``optim/batching.py``): ``V`` their gradient
        matrices stacked ``(k, g, n_out, n_in)``; every member with dense bases and moments of
        the same shapes and step counts, and one param group (so one damping rule). The
        rotations are batched matmuls and the elementwise stage one pass over all k; each
        member's moments take their rows of the result. Returns the k directions stacked, and
        λ·boost per group (the same for every member)."""
        beta1_kept = beta1 if self.first_moment else None
        Q_G = torch.stack([f.evec_G for f in members])  # type: ignore[misc]
        Q_A = torch.stack([f.evec_A for f in members])  # type: ignore[misc]
        R = Q_G.mT @ V.to(Q_G.dtype) @ Q_A
        parts = [f.eigen_moments(R[j], self.beta2, beta1_kept) for j, f in enumerate(members)]
        moment = torch.stack([m for m, _, _ in parts])
        first = None if beta1_kept is None else torch.stack([m for _, m, _ in parts])  # type: ignore[misc]
        ratio, relative = eigen_damping(damping, R[0])
        scaled = self.scale(
            R, moment, first, ratio, parts[0][2], self.beta2, beta1,
            relative, damping.rho, damping.gr_form, self.power,
        )  # fmt: skip
        torch._foreach_copy_([m for m, _, _ in parts], list(moment.unbind(0)))
        if first is not None:
            torch._foreach_copy_([m for _, m, _ in parts], list(first.unbind(0)))  # type: ignore[misc]
        return (Q_G @ scaled @ Q_A.mT).to(V.dtype), ratio

    def _rows_direction(
        self,
        factors: KroneckerFactors,
        V: Tensor,
        damping: DampingArgs,
        beta1: float,
        beta1_kept: float | None,
        rows: TouchedRows,
    ) -> tuple[Tensor, Tensor]:
        """The lazy embedding update: the dense arithmetic on the gathered touched rows, the
        block's mean D from all rows (its input side is its own eigenbasis)."""
        got = lazy_rows.gather(factors, V, rows, self.beta2, beta1_kept)
        ratio, relative = eigen_damping(damping, got.R)
        scaled = self.scale(
            got.R, got.moment, got.first, ratio, got.corrections, self.beta2, beta1, relative,
            damping.rho, damping.gr_form, self.power, got.outside, got.numel,
        )  # fmt: skip
        return lazy_rows.scatter(factors, V, got, scaled), ratio


class WarmEigenRoute(EigenRoute):
    """The eigen route with its basis kept up to date by orthogonal iteration from the previous
    basis, ``Q ← qr(F Q)`` after sorting the columns by ``diag(Qᵀ F Q)`` (SOAP's warm start):
    matmuls and a QR per factor, batched over same-shaped factors, instead of an eigh.

    A side gets a full eigh at its first refresh (no basis yet, or a stand-in) and after its
    basis drifted: the relative off-diagonal mass ``‖offdiag(Qᵀ F Q)‖_F / ‖Qᵀ F Q‖_F`` of the
    previous basis, measured on the device by the warm refresh
    (:func:`~lightning_grng.curvature.inverse.warm_eigh`), above :attr:`drift_limit` (or not
    finite) is read back with the step's one read-back and makes that side's next refresh a
    full eigh. The moment is carried into each new basis like the eigen route's.

    Attributes:
        drift_limit: the drift above which a side's next refresh is a full eigh (settable per
            optimizer, ``opt.route.drift_limit``). 0.25: on a small CNN (statistics every 5
            steps, refresh every 10) a warm-kept basis measured 0.01–0.1 in steady state and
            up to 0.7 in the first 20 steps; an unrelated (random) basis 0.1–1, near 1 for
            factors wider than ~50. One warm step cut the drift about threefold.
        warm_iters: orthogonal-iteration steps per warm refresh.
    """

    name = "eigen_warm"
    drift_limit: float = 0.25
    warm_iters: int = 1

    def _side_kind(self, d: Due, side: int, M: Tensor) -> str:
        kind = super()._side_kind(d, side, M)
        previous = (d.factors.evec_A, d.factors.evec_G, d.factors.evec_K)[side]
        if kind != FULL or previous is None or previous.shape != M.shape:
            return kind
        # A factor that may still be rank-deficient has a null space whose warm-started basis
        # is whatever rounding makes of the near-zero columns of F Q: runs that differ only in
        # rounding (a DDP split, batched blocks) would rotate the next gradients differently.
        # Such a side is decomposed in full and its null-space basis settled, as the eigh
        # route does, until the factor has had as many updates as it is wide.
        if d.rank_bound[side] is not None:
            return FULL
        return FULL if d.factors.full_next[side] else WARM

    def _warm(self, pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor, Tensor]]:
        return batched_warm_eigh(pairs, self.warm_iters) if pairs else []

    def _side_result(
        self, kind: str, M: Tensor, eigs: Any, warm: Any
    ) -> tuple[tuple[Tensor, Tensor | None], Tensor | None]:
        if kind != WARM:
            return super()._side_result(kind, M, eigs, warm)
        evals, evecs, drift = next(warm)
        return (evals, evecs), ~(drift.amax() <= self.drift_limit)  # NaN: drifted


def _settled(result: Any, kind: str, rank_bound: int | None) -> Any:
    """A full eigh's side result with its null-space basis made unique (where the factor may
    be rank-deficient)."""
    (evals, evecs), drift = result
    if kind != FULL or rank_bound is None or evecs is None:
        return result
    return (evals, settle_null_space(evals, evecs, rank_bound)), drift


def _sides(d: Due, A: Tensor, G: Tensor) -> list[tuple[Tensor, Tensor | None]]:
    """Each side's factor (as the route decomposes it) and its current eigenvectors: A, G,
    and the tap factor K of a split input side."""
    sides = [(A, d.factors.evec_A), (G, d.factors.evec_G)]
    K = d.factors.safe_tap_factor()
    return sides if K is None else [*sides, (K, d.factors.evec_K)]


def _decompose_alone(factors: KroneckerFactors, accept: Tensor | None) -> Tensor:
    """A full eigh of one block (after a batched eigh failed even in float64)."""
    factors.drifted, factors.full_next = (None, None, None), [False, False, False]
    return factors.refresh(InverseMethod.EIGH, 0.0, 0, accept)


class NewtonRoute(Route):
    """Warm-started Newton–Schulz inverses of the factored-damped factors
    ``(A + π√γ I)⁻¹`` and ``(G + √γ/π I)⁻¹`` (π balances the factors' mean eigenvalues):
    matmuls only. The damping is the one of the last refresh."""

    name = "newton"
    damping = 100.0
    fallback_lr = 0.1
    ring_rho = 10.0

    def refresh(self, due: list[Due], accept: Tensor | None) -> list[Tensor]:
        failed = []
        for d in due:
            size = d.block.n_in * d.block.n_out
            gamma, ratio = kronecker_damping(d.factors.mean_eigenvalue(), size, d.damping)
            failed.append(d.factors.refresh(InverseMethod.NEWTON, gamma, self.newton_iters, accept))
            d.factors.damping_ratio = ratio
        return failed

    def direction(
        self,
        block: KroneckerBlock,
        factors: KroneckerFactors,
        V: Tensor,
        damping: DampingArgs,
        beta1: float = 0.0,
        rows: TouchedRows | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        return factors.precondition(V, 0.0), factors.damping_ratio


ROUTES: dict[str, type[Route]] = {
    r.name: r for r in (EigenRoute, WarmEigenRoute, EighRoute, NewtonRoute)
}


def route_for(
    owner: str,
    preconditioner: Preconditioner,
    inverse: InverseMethod | None,
    default: Any,
    refresh: BasisRefresh = BasisRefresh.EIGH,
) -> type[Route]:
    """The route of ``preconditioner``, ``inverse`` (None: ``default``, the optimizer's
    inverse for the kfac mode) and ``refresh``; the eigen mode needs the eigenbasis, so eigh
    only, and only the eigen mode can keep its basis by a warm start."""
    if preconditioner is Preconditioner.EIGEN:
        if inverse not in (None, InverseMethod.EIGH):
            raise ValueError(
                f"{owner}: preconditioner='eigen' needs the eigenbasis of A and G, so "
                f"inverse={inverse.value!r} is not possible; use inverse='eigh' (or leave "
                "it None), or preconditioner='kfac' for the Newton–Schulz route."
            )
        return WarmEigenRoute if refresh is BasisRefresh.WARM else EigenRoute
    if refresh is BasisRefresh.WARM:
        raise ValueError(
            f"{owner}: refresh='warm' keeps the eigen mode's eigenbasis by a warm start, but "
            "preconditioner='kfac' needs exact eigenvalues (or Newton–Schulz inverses); use "
            "preconditioner='eigen' with it, or refresh='eigh'."
        )
    return ROUTES[InverseMethod(inverse or default).value]


def check_basis_options(
    owner: str, route: type[Route], stagger_first: int | None, max_factor: int | None
) -> tuple[int | None, int | None]:
    """``(stagger_first, max_factor)`` checked: None or a width >= 1, for an eigh-based route
    (a stand-in basis and a diagonal factor are eigenbases; Newton–Schulz has none)."""
    values = {"stagger_first": stagger_first, "max_factor": max_factor}
    for key, value in values.items():
        if value is None:
            continue
        values[key] = check_int(owner, key, value)
        refuse_without_eigenbasis(owner, f"{key}={value}", route, f"leave {key}=None")
    return values["stagger_first"], values["max_factor"]


def refuse_without_eigenbasis(owner: str, setting: str, route: type[Route], instead: str) -> None:
    """A basis option (``setting``, e.g. ``"max_factor=64"``) refused on the Newton–Schulz
    route, which keeps no eigenbasis of the factors."""
    if route is NewtonRoute:
        raise ValueError(
            f"{owner}: {setting} acts on the eigenbasis of the factors, which the "
            "Newton–Schulz route does not keep; use inverse='eigh' (or the eigen mode) "
            f"with it, or {instead}."
        )
