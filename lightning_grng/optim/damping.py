"""The damping and gradient-regularization rule: the one place where ρ enters the curvature.

Every preconditioner route calls one of these functions with explicit arguments (the block's
statistics, its group's hyperparameters, its ‖g‖²); nothing is read from optimizer state.
``docs/algorithms.md`` §3 (kfac mode), §8.3 (eigen mode) and §7 (RKalman) derive each form.

Where ρ enters, per optimizer:

* RING: as curvature, here (:func:`kronecker_damping`, :func:`eigen_curvature`).
* RENG: in the gradient, ``g + ρHg`` (``optim/reng.py``); its damping here has ρ = 0.
* KFAC: nowhere (ρ = 0).
* RKalman: in the filter's information (:func:`kalman_gr`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor


class DampingMode(str, Enum):
    """Units of ``damping`` (``docs/algorithms.md`` §2)."""

    #: γ = λ · (the block's mean curvature): scale-free, the same default means the same thing
    #: on any model.
    RELATIVE = "relative"
    #: γ = λ in the units of the Fisher (the loss's units squared over the parameters').
    ABSOLUTE = "absolute"


@dataclass(frozen=True)
class DampingArgs:
    """What the rule reads for one block at one step.

    Attributes:
        damping: λ of the block's param group.
        rho: the ρ that enters as curvature (RING's group ρ; 0 for KFAC and RENG).
        boost: the failure boost (doubled after a failure, halved on each good step).
        mode: the units of λ.
        block_grad_sq: ``‖g_b‖²`` of the block's parameters this step (0-dim, on the device);
            called only where the rule needs it.
        total_grad_sq: ``‖g‖²`` over every parameter of the optimizer (the absolute kfac mode's
            GR term: the paper's global norm).
    """

    damping: float
    rho: float
    boost: float
    mode: DampingMode
    block_grad_sq: Callable[[], Tensor]
    total_grad_sq: Tensor | float


def kronecker_damping(mean_eigenvalue: Tensor, size: int, args: DampingArgs) -> tuple[Any, Tensor]:
    """γ of one block for ``(A ⊗ G + γI)⁻¹`` (the kfac mode), and γ / mean eigenvalue.

    ``mean_eigenvalue`` is ``(tr A / n_A)(tr G / n_G)`` per group ``(groups,)`` and ``size`` is
    ``n_A·n_G``. Relative mode: ``γ = (λ + ρ‖g_b‖² / tr(A ⊗ G))·boost · mean eigenvalue``, the
    trace-matched share ``ρ‖g_b‖²/n_b`` of the GR curvature ``ρ g gᵀ`` (§3). Absolute mode:
    ``γ = (λ + ρ‖g‖²)·boost``.
    """
    tiny = torch.finfo(mean_eigenvalue.dtype).tiny
    if args.mode is DampingMode.ABSOLUTE:
        gr = args.rho * args.total_grad_sq if args.rho > 0.0 else 0.0
        gamma = (args.damping + gr) * args.boost
        return gamma, gamma / mean_eigenvalue.clamp_min(tiny)
    ratio = torch.full_like(mean_eigenvalue, args.damping)
    if args.rho > 0.0:
        grad_sq = args.block_grad_sq().to(mean_eigenvalue.dtype)
        trace = mean_eigenvalue.sum() * size  # tr(A ⊗ G) over the block's groups
        gr = args.rho * grad_sq / trace.clamp_min(tiny)
        ratio = args.damping + gr.expand_as(mean_eigenvalue)
    ratio = ratio * args.boost
    return ratio * mean_eigenvalue, ratio


def eigen_curvature(D: Tensor, R: Tensor, args: DampingArgs) -> tuple[Tensor, Tensor]:
    """The eigen mode's per-direction curvature ``D + γ + ρ R∘R``, and γ / mean(D) per group.

    ``D`` is the bias-corrected second moment of the rotated gradient ``R`` (both
    ``(groups, n_out, n_in)``). γ is ``λ·boost·mean(D)`` (relative) or ``λ·boost``
    (absolute). ``ρ R∘R`` is the exact diagonal of the GR curvature ``ρ g gᵀ`` in the
    eigenbasis, the projection the mode applies to the Fisher itself (§8.3); ρ is dimensionless.
    Clamped at the smallest normal number, so its negative power is finite.
    """
    ratio = torch.full((D.shape[0],), args.damping * args.boost, dtype=D.dtype, device=D.device)
    relative = args.mode is DampingMode.RELATIVE
    gamma = ratio * D.mean(dim=(-2, -1)) if relative else ratio
    gr = args.rho * (R * R) if args.rho > 0.0 else 0.0
    curvature = D + gamma[:, None, None] + gr
    return curvature.clamp_min(torch.finfo(curvature.dtype).tiny), ratio


class RhoMode(str, Enum):
    """Where the gradient regularizer enters RKalman's filter."""

    #: ρ‖g‖² is curvature absorbed with the batch (the floor becomes λ + ρ·avg‖g‖²).
    DAMPING = "damping"
    #: the batch's observation noise is inflated by 1 + ρ‖g‖².
    NOISE = "noise"


def kalman_gr(rho: float, mode: RhoMode, grad_sq: Tensor | float) -> tuple[Any, Any]:
    """RKalman's GR terms ``(information weight, curvature)`` for one batch (§7).

    ``"damping"``: weight 1, curvature ``ρ‖g‖²``. ``"noise"``: weight ``1/(1 + ρ‖g‖²)`` (on the
    batch's information and on the mean step), curvature 0. ``ρ = 0``: ``(1, 0)``.
    """
    if rho <= 0.0:
        return 1.0, 0.0
    if mode is RhoMode.NOISE:
        return 1.0 / (1.0 + rho * grad_sq), 0.0
    return 1.0, rho * grad_sq
