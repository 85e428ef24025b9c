"""Preconditioner routes: how a Kronecker block's factors become a step direction.

Each route is one class with one interface: its defaults, its momentum style, how it refreshes
the factors' representation (:meth:`Route.refresh`) and how it turns a gradient into a
direction (:meth:`Route.direction`). The damping comes in as an explicit argument and goes
through the one rule of ``optim/damping.py``.

=========  ==========================================  ===========================================
route      refresh                                     direction
=========  ==========================================  ===========================================
eigen      batched eigh of A and G                     ``Q (D + γ + ρR∘R)^(−p) Qᵀ g``, D a running
                                                       second moment of R = Qᵀ g (§8)
eigh       batched eigh of A and G                     ``(A ⊗ G + γI)⁻¹ g`` exactly, γ per step
newton     warm Newton–Schulz inverses of the          ``(A + π√γ I)⁻¹`` ⊗ ``(G + √γ/π I)⁻¹``, γ
           factored-damped factors (matmuls only)      frozen at the refresh
=========  ==========================================  ===========================================

A new route (e.g. a warm-started basis) is one more subclass, listed in :func:`route_for`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.inverse import batched_spd_eigh
from lightning_grng.curvature.kronecker import InverseMethod, KroneckerFactors
from lightning_grng.optim.damping import DampingArgs, eigen_curvature, kronecker_damping


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


@dataclass
class Due:
    """A block whose representation is refreshed this step, with its damping (the routes that
    fold the damping into the representation read it; the others ignore it)."""

    block: KroneckerBlock
    factors: KroneckerFactors
    damping: DampingArgs


class Route(ABC):
    """One preconditioner route. Subclasses set the defaults and implement the two stages.

    Args:
        beta2: decay of the eigen route's second moment.
        power: the eigen route's exponent p in ``(D + γ)^(−p)``.
        newton_iters: the Newton route's iterations from a cold start.
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

    def __init__(self, beta2: float, power: float, newton_iters: int) -> None:
        self.beta2, self.power, self.newton_iters = beta2, power, newton_iters

    @abstractmethod
    def refresh(self, due: list[Due], accept: Tensor | None) -> list[Tensor]:
        """Recomputes the representation of every due block on the device, keeping the last
        good one where a result is not finite or ``accept`` (the step's flag) is False.
        Returns one failure flag (0-dim bool) per block."""

    @abstractmethod
    def direction(
        self, block: KroneckerBlock, factors: KroneckerFactors, V: Tensor, damping: DampingArgs
    ) -> tuple[Tensor, Tensor | None]:
        """The preconditioned ``(groups, n_out, n_in)`` matrix of gradient ``V`` and the damping
        used, in the route's units (γ / mean curvature per group; None if unknown)."""


class EighRoute(Route):
    """``(A ⊗ G + γI)⁻¹ g`` from the eigendecompositions of A and G: exact damping for any γ,
    so RING's per-step damping costs no extra decomposition."""

    name = "eigh"
    damping = 100.0
    fallback_lr = 0.1
    ring_rho = 10.0

    def refresh(self, due: list[Due], accept: Tensor | None) -> list[Tensor]:
        """All due factors decomposed by :func:`batched_spd_eigh`, one call per size."""
        factors = [d.factors for d in due]
        inputs = [f.eigh_inputs() for f in factors]
        # A diagonal A (an embedding's) is its own eigendecomposition: only G is decomposed.
        matrices = [
            m
            for (A, G, _), f in zip(inputs, factors, strict=True)
            for m in (A, G)
            if not (m is A and f.a_is_diagonal)
        ]
        try:
            eigs = iter(batched_spd_eigh(matrices))
        except torch.linalg.LinAlgError:  # even the float64 retry: one block at a time
            return [f.refresh(InverseMethod.EIGH, 0.0, 0, accept) for f in factors]
        failed = []
        for f, (A, _, ok) in zip(factors, inputs, strict=True):
            eig_A = (A.clamp_min(0.0), None) if f.a_is_diagonal else next(eigs)
            failed.append(f.install_eigh(eig_A, next(eigs), ok, accept))
        return failed

    def direction(
        self, block: KroneckerBlock, factors: KroneckerFactors, V: Tensor, damping: DampingArgs
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

    def direction(
        self, block: KroneckerBlock, factors: KroneckerFactors, V: Tensor, damping: DampingArgs
    ) -> tuple[Tensor, Tensor | None]:
        """Absorbs this step's ``R`` into D (the route's per-step state), then scales R."""
        R = factors.to_eigenbasis(V)
        D = factors.update_moment(R, self.beta2)
        curvature, ratio = eigen_curvature(D, R, damping)
        scale = curvature.rsqrt() if self.power == 0.5 else curvature.pow(-self.power)
        return factors.from_eigenbasis(R * scale, V.dtype), ratio


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
        self, block: KroneckerBlock, factors: KroneckerFactors, V: Tensor, damping: DampingArgs
    ) -> tuple[Tensor, Tensor | None]:
        return factors.precondition(V, 0.0), factors.damping_ratio


ROUTES: dict[str, type[Route]] = {r.name: r for r in (EigenRoute, EighRoute, NewtonRoute)}


def route_for(
    owner: str, preconditioner: Preconditioner, inverse: InverseMethod | None, default: Any
) -> type[Route]:
    """The route of ``preconditioner`` and ``inverse`` (None: ``default``, the optimizer's
    inverse for the kfac mode); the eigen mode needs the eigenbasis, so eigh only."""
    if preconditioner is Preconditioner.EIGEN:
        if inverse not in (None, InverseMethod.EIGH):
            raise ValueError(
                f"{owner}: preconditioner='eigen' needs the eigenbasis of A and G, so "
                f"inverse={inverse.value!r} is not possible; use inverse='eigh' (or leave "
                "it None), or preconditioner='kfac' for the Newton–Schulz route."
            )
        return EigenRoute
    return ROUTES[InverseMethod(inverse or default).value]
