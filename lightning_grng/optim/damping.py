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


class GRForm(str, Enum):
    """How RING's GR curvature ``ρ g gᵀ`` enters the eigen mode (``docs/algorithms.md`` §8.3).

    Each form is ``ρ·s_b·S`` per block: a shape S in the eigenbasis and a scalar s_b that says
    which gradient norm the penalty measures."""

    #: S = R∘R, the exact diagonal of ``ρ g gᵀ`` in the eigenbasis; s = 1 (the raw squared norm).
    DIAGONAL = "diagonal"
    #: S = mean(R∘R)·1, the trace-matched isotropic term: the paper's majorizer ``ρ‖g‖² I``
    #: made relative, as the kfac mode places it (§3).
    ISOTROPIC = "isotropic"
    #: S = R∘R, s = √(mean D / mean R∘R): the unsquared norm ρ‖∇ℓ‖ (Zhao et al. 2022), whose
    #: curvature is ``ρ g gᵀ/‖g‖``, made dimensionless by the block's running gradient scale.
    UNSQUARED = "unsquared"
    #: S = R∘R, s = Σ(R²/√D)/ΣR² · √mean D: the penalty on the preconditioned norm gᵀPg with
    #: Adam's metric P = D^(−½), whose GN curvature is ``ρ (gᵀPg/gᵀg) g gᵀ`` (the Rayleigh
    #: quotient of P along g), normalized by its value for an isotropic D.
    PRECONDITIONED = "preconditioned"


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
    gr_form: GRForm = GRForm.DIAGONAL


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
    ``args.gr_form`` selects another placement (:class:`GRForm`). Clamped at the smallest
    normal number, so its negative power is finite.
    """
    ratio, relative = eigen_damping(args, D)
    return eigen_curvature_of(D, R, ratio, relative, args.rho, args.gr_form), ratio


def eigen_damping(args: DampingArgs, like: Tensor) -> tuple[Tensor, bool]:
    """The eigen mode's damping parts for a block shaped like ``like`` ``(groups, n_out,
    n_in)``: λ·boost per group (on ``like``'s device) and whether γ is relative to mean(D)."""
    lam = args.damping * args.boost
    ratio = torch.full((like.shape[0],), lam, dtype=like.dtype, device=like.device)
    return ratio, args.mode is DampingMode.RELATIVE


def eigen_curvature_of(
    D: Tensor,
    R: Tensor,
    ratio: Tensor,
    relative: bool,
    rho: float,
    form: GRForm,
    mean_D: Tensor | None = None,
    numel: int | None = None,
) -> Tensor:
    """:func:`eigen_curvature` from its parts (``ratio``: λ·boost per group), as a new tensor;
    plain tensors and constants only, so that ``torch.compile`` traces it whole.

    ``D`` and ``R`` may be a gathered part of the block (an embedding's touched rows,
    ``optim/lazy_rows.py``): ``mean_D`` is then the whole block's (per group, ``(g, 1, 1)``) and
    ``numel`` its entries per group, the divisor of the GR forms' block means (the entries left
    out have R = 0)."""
    if mean_D is None:
        mean_D = D.mean(dim=(-2, -1), keepdim=True)
    gamma = ratio[:, None, None] * mean_D if relative else ratio[:, None, None]
    curvature = D + gamma  # the one new tensor; the rest is in place
    if rho > 0.0 and form is GRForm.DIAGONAL:
        curvature.addcmul_(R, R, value=rho)  # ρ R∘R without a temporary
    elif rho > 0.0:
        curvature.add_(gr_curvature(D, R, mean_D, rho, form, numel))
    return curvature.clamp_min_(torch.finfo(curvature.dtype).tiny)


def gr_curvature(
    D: Tensor, R: Tensor, mean_D: Tensor, rho: float, form: GRForm, numel: int | None = None
) -> Tensor:
    """RING's GR term ``ρ·s_b·S`` in the eigenbasis, per :class:`GRForm` (§8.3); block means
    over ``numel`` entries per group (default: R's own)."""
    tiny = torch.finfo(D.dtype).tiny
    square = R * R
    if form is GRForm.DIAGONAL:
        return rho * square
    count = numel if numel is not None else R.shape[-2] * R.shape[-1]
    mean_sq = square.sum(dim=(-2, -1), keepdim=True) / count
    if form is GRForm.ISOTROPIC:
        return (rho * mean_sq).expand_as(D)
    if form is GRForm.UNSQUARED:
        return rho * square * (mean_D / mean_sq.clamp_min(tiny)).sqrt()
    weighted = (square * D.clamp_min(tiny).rsqrt()).sum(dim=(-2, -1), keepdim=True)
    quotient = weighted / square.sum(dim=(-2, -1), keepdim=True).clamp_min(tiny)
    return rho * square * quotient * mean_D.sqrt()


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
