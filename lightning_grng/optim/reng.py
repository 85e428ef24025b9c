"""RENG: natural gradient of the explicitly gradient-regularized loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_grng.optim.base import GROUP_RANGES, RHO_RANGE, ParamsT, _device_total
from lightning_grng.optim.kfac import KFAC
from lightning_grng.optim.validation import check_choice, check_range


class GRMode(str, Enum):
    DOUBLE_BACKPROP = "double_backprop"
    FINITE_DIFFERENCE = "finite_difference"


class RENG(KFAC):
    """Regularized Explicit Natural Gradient: the Kronecker preconditioner applied to ``∇ℓ_G``.

    ``∇ℓ_G = g + ρ·H g`` is the gradient of ``ℓ + ρ/2‖∇ℓ‖²``; it enters the default
    ``preconditioner="eigen"`` stage (``Q (D + γ)^(−½) Qᵀ ∇ℓ_G``, D the second moment of the
    rotated regularized gradient) or the paper's ``(A ⊗ G + λI)⁻¹ ∇ℓ_G``
    (``preconditioner="kfac"``). The curvature statistics come from the plain loss's backward
    only.

    * ``gr_mode="double_backprop"`` (default): exact ``Hg`` by differentiating ½‖g‖². In plain
      PyTorch call ``loss.backward(create_graph=True)`` before ``step()`` (or
      :func:`regularized_backward`); in Lightning :class:`~lightning_grng.GRNGStrategy` does it.
    * ``gr_mode="finite_difference"``: ``Hg ≈ (∇ℓ(θ + εg) − g)/ε`` with ``ε = fd_eps/‖g‖``, one
      extra forward/backward on the same batch and no double backward (works with BatchNorm
      and kernels without double backward). Needs ``step(closure)``; buffers such as BatchNorm
      running statistics are restored after the extra pass.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: momentum on the preconditioned update, in [0, 1) (an EMA in ``"eigen"``
            mode, heavy ball in ``"kfac"`` mode).
        weight_decay: decoupled weight decay, >= 0.
        damping: Tikhonov damping λ > 0, in the units of ``damping_mode``; None: the mode's
            default (1e-4 ``"eigen"``, 100 ``"kfac"``, relative units).
        damping_mode: ``"relative"`` (default) or ``"absolute"``; see :class:`~lightning_grng.KFAC`.
        rho: gradient-regularization strength ρ >= 0.
        ema_decay: decay of the factor moving averages, in [0, 1).
        curvature_every: refresh the factor statistics every this many steps.
        inverse_every: refresh the inverse representation every this many steps.
        inverse: ``"eigh"`` (None: default) or ``"newton"`` (``"kfac"`` mode only).
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
        gr_mode: ``"double_backprop"`` or ``"finite_difference"``.
        fd_eps: finite-difference step length ``ε‖g‖`` (> 0).
    """

    group_ranges: ClassVar[dict[str, tuple[float, float | None, bool, bool]]] = {
        **GROUP_RANGES,
        **RHO_RANGE,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float | None = None,
        damping_mode: str = "relative",
        rho: float = 0.1,
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
        gr_mode: str = "double_backprop",
        fd_eps: float = 1e-3,
        preconditioner: str = "eigen",
        beta2: float = 0.95,
        power: float = 0.5,
    ) -> None:
        name = type(self).__name__
        self.gr_mode = check_choice(name, "gr_mode", gr_mode, GRMode)
        self.fd_eps = check_range(name, "fd_eps", fd_eps, 0.0, low_open=True)
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
        self._add_group_default("rho", self._check_group_value("rho", rho))
        self._grads_regularized = False

    @property
    def regularizes(self) -> bool:
        return any(group["rho"] > 0.0 for group in self.param_groups)

    def _rho_of(self) -> dict[Tensor, float]:
        return {p: group["rho"] for group in self.param_groups for p in group["params"]}

    def _gradients(
        self, params: list[Tensor], closure: Callable[[], Any] | None
    ) -> tuple[Any, list[Tensor]]:
        if self.gr_mode is GRMode.FINITE_DIFFERENCE and self.regularizes:
            return self._finite_difference_gradients(closure)
        loss, _ = super()._gradients(params, closure)  # runs the closure (Lightning's backward)
        params = [p for p in self.flat_params() if p.grad is not None]
        grads = [p.grad for p in params]
        if self._grads_regularized:  # regularized_backward() already produced ∇ℓ_G
            self._grads_regularized = False
            return loss, [g.detach() for g in grads]
        graph = [(p, g) for p, g in zip(params, grads, strict=True) if g.requires_grad]
        if self.regularizes and not graph:
            raise RuntimeError(
                f"{type(self).__name__}(gr_mode='double_backprop') needs the graph of the "
                "gradient: call `loss.backward(create_graph=True)` (or "
                "`lightning_grng.regularized_backward(loss, optimizer)`) before `step()`; in "
                "Lightning use `strategy=GRNGStrategy()`; or choose "
                "gr_mode='finite_difference' and pass a closure to `step()`."
            )
        self._record_plain_grad_norm(grads)
        if not graph or not self.regularizes:
            for p in params:
                p.grad = p.grad.detach()
            return loss, [p.grad for p in params]
        with torch.enable_grad(), self._gate.paused():
            penalty = 0.5 * sum(g.pow(2).sum() for _, g in graph)
            hvps = torch.autograd.grad(penalty, [p for p, _ in graph], allow_unused=True)
        hvp_of = {p: h for (p, _), h in zip(graph, hvps, strict=True) if h is not None}
        rho_of = self._rho_of()
        out = []
        for p in params:
            p.grad = p.grad.detach()  # frees the double-backward graph (and its ref cycle)
            g = p.grad
            if p in hvp_of:
                g = g + rho_of[p] * hvp_of[p]
            out.append(g)
        return loss, out

    def _finite_difference_gradients(
        self, closure: Callable[[], Any] | None
    ) -> tuple[Any, list[Tensor]]:
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}(gr_mode='finite_difference') re-evaluates the batch: "
                "call `optimizer.step(closure)` with a closure that zeroes the gradients, "
                "computes the loss and calls `loss.backward()`."
            )
        with torch.enable_grad():
            loss = closure()
        params = [p for p in self.flat_params() if p.grad is not None]
        grads = [p.grad.detach().clone() for p in params]
        # The extra pass needs ε on the host: one more read-back in this mode.
        norm = math.sqrt(float(self._record_plain_grad_norm(grads)))
        if norm == 0.0 or not math.isfinite(norm):
            return loss, grads
        eps = self.fd_eps / norm
        originals = [p.detach().clone() for p in params]
        model = self._model
        buffers = [b.detach().clone() for b in model.buffers()] if model is not None else []
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=eps)
        with torch.enable_grad(), self._gate.paused():
            closure()
        shifted = [
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params
        ]
        for p, original, g in zip(params, originals, grads, strict=True):
            p.copy_(original)
            p.grad = g
        if model is not None:
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
        rho_of = self._rho_of()
        return loss, [
            g + (rho_of[p] / eps) * (s - g) for p, g, s in zip(params, grads, shifted, strict=True)
        ]

    def _record_plain_grad_norm(self, grads: list[Tensor]) -> Tensor:
        """‖g‖² of the plain gradient, kept on the device (reported as ``grad_norm``)."""
        sq = _device_total(g.detach().double().pow(2).sum() for g in grads)
        self.plain_grad_sq = sq
        return sq


def gradient_penalty(loss: Tensor, optimizer: RENG, loss_scale: float = 1.0) -> Tensor | None:
    """The penalty whose gradient is ``ρ·H g``, built from an out-of-place inner gradient.

    ``loss`` is ``loss_scale · ℓ`` (e.g. ``1/N`` under gradient accumulation over N
    micro-batches, times the AMP loss scale). The inner ``autograd.grad(..., create_graph=True)``
    is the plain loss's backward: its output gradients are the curvature statistics, committed
    by the ordinary backward of the regularized loss that follows. The returned penalty
    ``ρ/(2c)·‖∇(cℓ)‖²`` has gradient ``c·ρ·Hg``, so adding its backward to the loss's gives
    ``c·∇(ℓ + ρ/2‖∇ℓ‖²)`` for this micro-batch. Returns None when ρ = 0 everywhere.
    """
    if not optimizer.regularizes:
        return None
    rho_of = optimizer._rho_of()
    params = [p for p in optimizer.flat_params() if p.requires_grad]
    with optimizer._gate.statistics_pass():
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
    optimizer._record_plain_grad_norm([g.detach() / loss_scale for _, g in used])
    return sum(0.5 / loss_scale * rho_of[p] * g.pow(2).sum() for p, g in used)  # type: ignore[return-value]


def regularized_backward(loss: Tensor, optimizer: RENG, loss_scale: float = 1.0) -> None:
    """One ordinary backward that accumulates ``∇(ℓ + ρ/2‖∇ℓ‖²)`` into ``.grad``.

    The inner gradient is taken out of place (see :func:`gradient_penalty`), then a single
    backward of the regularized loss follows: this is the backward DDP can synchronize. With
    gradient accumulation, pass ``loss_scale=1/N`` for losses divided by N: the penalty is then
    formed per micro-batch, accumulating ``∇(ℓ_i + ρ/2‖∇ℓ_i‖²)/N``.
    """
    penalty = gradient_penalty(loss, optimizer, loss_scale)
    if penalty is None:
        loss.backward()
        return
    with optimizer._gate.paused():
        (loss + penalty).backward()
    optimizer._grads_regularized = True
