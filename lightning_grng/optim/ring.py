"""RING: the gradient regularizer enters the update direction as adaptive damping."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.kronecker import InverseMethod
from lightning_grng.optim.base import GROUP_RANGES, RHO_RANGE, ParamsT
from lightning_grng.optim.kfac import KFAC, Preconditioner

#: RING's default ρ per preconditioner mode (``docs/defaults.md``): relative units in
#: ``"kfac"`` mode (§3), a dimensionless weight of the current gradient's square in ``"eigen"``.
MODE_RHO = {Preconditioner.KFAC: 10.0, Preconditioner.EIGEN: 0.1}


class RING(KFAC):
    """Regularized Implicit Natural Gradient: gradient regularization as adaptive damping.

    In the default ``preconditioner="eigen"`` mode ``U = Q (D + γ + ρ R∘R)^(−½) Qᵀ g``: the GR
    curvature ``ρ g gᵀ`` projected on the diagonal of the Kronecker eigenbasis (R = Qᵀ g, the
    rotated gradient), like the Fisher itself (``docs/algorithms.md`` §8.3); ρ is dimensionless
    there. In ``preconditioner="kfac"`` mode, the paper's ``U = (A ⊗ G + (λ + ρ‖g‖²) I)⁻¹ g``:

    Gradient regularization ``ℓ + ρ/2‖∇ℓ‖²`` enters the quadratic model as extra curvature
    ``ρ ggᵀ`` (the squared directional derivative along the step), majorized by ``ρ‖g‖² I`` so
    the Kronecker structure survives. The result is damping that is large where gradients are
    large (a conservative, SGD-like step) and vanishes near flat minima (pure natural gradient).
    ‖g‖ is the global gradient norm over all parameters of the optimizer. One backward pass per
    step. ``RING(rho=0)`` is exactly :class:`KFAC` in the eigen mode, and
    ``RING(rho=0, inverse="eigh", preconditioner="kfac")`` is ``KFAC(preconditioner="kfac")``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: momentum on the preconditioned update, in [0, 1) (an EMA in ``"eigen"``
            mode, heavy ball in ``"kfac"`` mode).
        weight_decay: decoupled weight decay, >= 0.
        damping: base Tikhonov damping λ > 0, in the units of ``damping_mode``; None: the
            mode's default (1e-4 ``"eigen"``, 100 ``"kfac"``, relative units).
        damping_mode: ``"relative"`` (default, γ in units of each block's mean eigenvalue of
            A ⊗ G) or ``"absolute"``; see :class:`~lightning_grng.KFAC`.
        rho: gradient-regularization strength ρ >= 0; None: the mode's default (0.1 in
            ``"eigen"`` mode, dimensionless; 10 in ``"kfac"`` mode, relative units).
        ema_decay: decay of the factor moving averages, in [0, 1).
        curvature_every: refresh the factor statistics every this many steps.
        inverse_every: refresh the inverse representation every this many steps.
        inverse: None: ``"eigh"`` in ``"eigen"`` mode (the only route there), ``"newton"`` in
            ``"kfac"`` mode: warm-started Newton–Schulz inverses of factored-damped factors, the
            adaptive damping refreshed with them every ``inverse_every`` steps; ``"eigh"`` there
            applies the exact adaptive damping every step. Newton measured better on
            Fashion-MNIST in ``"kfac"`` mode (``docs/defaults.md``).
        newton_iters: maximum Newton–Schulz iterations per refresh.
        kl_clip: bound on the step's predicted KL change; None disables it.
        fisher: ``"empirical"`` or ``"mc"``.
        loss_reduction: ``"mean"`` or ``"sum"``.
        fallback: ``"adam"`` (default) or ``"sgd"``: the update of parameters without a block.
        fallback_lr: the Adam fallback's lr as a multiple of the group's ``lr``; None: the
            mode's default (1 for ``"eigen"``, 0.1 for ``"kfac"``).
        preconditioner: ``"eigen"`` (default) or ``"kfac"``; see :class:`~lightning_grng.KFAC`.
        beta2: ``"eigen"`` mode: decay of the second moment, in [0, 1).
        power: ``"eigen"`` mode: the step is ``(D + γ + C_GR)^(−power)`` in the eigenbasis.
    """

    group_ranges: ClassVar[dict[str, tuple[float, float | None, bool, bool]]] = {
        **GROUP_RANGES,
        **RHO_RANGE,
    }
    default_inverse: ClassVar[InverseMethod] = InverseMethod.NEWTON

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float | None = None,
        damping_mode: str = "relative",
        rho: float | None = None,
        ema_decay: float = 0.95,
        curvature_every: int = 5,
        inverse_every: int = 20,
        inverse: str | None = None,
        newton_iters: int = 30,
        kl_clip: float | None = 1e-2,
        fisher: str = "empirical",
        loss_reduction: str = "mean",
        fallback: str = "adam",
        fallback_lr: float | None = None,
        preconditioner: str = "eigen",
        beta2: float = 0.95,
        power: float = 0.5,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            damping=damping,
            damping_mode=damping_mode,
            ema_decay=ema_decay,
            curvature_every=curvature_every,
            inverse_every=inverse_every,
            inverse=inverse,
            newton_iters=newton_iters,
            kl_clip=kl_clip,
            fisher=fisher,
            loss_reduction=loss_reduction,
            fallback=fallback,
            fallback_lr=fallback_lr,
            preconditioner=preconditioner,
            beta2=beta2,
            power=power,
        )
        if rho is None:
            rho = MODE_RHO[self.preconditioner]
        self._add_group_default("rho", self._check_group_value("rho", rho))

    def _effective_damping(self, group: dict[str, Any], grad_sq_norm: float | Tensor) -> Any:
        return (group["damping"] + group["rho"] * grad_sq_norm) * self.damping_boost

    def _relative_damping(
        self, block: KroneckerBlock, group: dict[str, Any], scale: Tensor
    ) -> Tensor:
        """``λ + ρ‖g_b‖² / tr(A ⊗ G)``: the trace-matched share ``ρ‖g_b‖²/n_b`` of the GR
        curvature ``ρ g gᵀ`` on this block, in units of its mean eigenvalue (§3)."""
        grad_sq = self._block_grad_sq(block).to(scale.dtype)
        trace = scale.sum() * (block.n_in * block.n_out)  # tr(A⊗G) over the block's groups
        gr = group["rho"] * grad_sq / trace.clamp_min(torch.finfo(scale.dtype).tiny)
        return group["damping"] + gr.expand_as(scale)

    def _eigen_gr_curvature(
        self, block: KroneckerBlock, group: dict[str, Any], R: Tensor
    ) -> Tensor | float:
        """``ρ R²``: the diagonal of the GR curvature ``ρ g gᵀ`` in the eigenbasis, the same
        projection the eigen-corrected mode applies to the Fisher (§8). Exact, no majorizer."""
        return group["rho"] * (R * R) if group["rho"] > 0.0 else 0.0
