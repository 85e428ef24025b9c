"""RENG: natural gradient of the explicitly gradient-regularized loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_grng.curvature.sdpa import use_math_sdpa
from lightning_grng.optim.arguments import documented, hyperparameters
from lightning_grng.optim.base import GROUP_RANGES, RHO_RANGE, ParamsT
from lightning_grng.optim.kfac import KFAC
from lightning_grng.optim.update import device_total
from lightning_grng.optim.validation import check_choice, check_range

#: Averages gradients over DDP ranks (``Sharding.all_reduce_mean``).
Average = Callable[[list[Tensor]], list[Tensor]]


class GRNorm(str, Enum):
    """Which gradient norm RENG penalizes (``docs/algorithms.md`` §4)."""

    #: ρ/2‖∇ℓ‖² (the paper's): the extra gradient is ρHg; ρ has units of parameters² per loss.
    SQUARED = "squared"
    #: ρ‖∇ℓ‖ (Zhao et al. 2022): ρHg/‖g‖; ρ is a length in parameter space, like SAM's radius,
    #: and the step is invariant to the loss scale.
    UNSQUARED = "unsquared"


class GRMode(str, Enum):
    """How RENG forms ``Hg``."""

    DOUBLE_BACKPROP = "double_backprop"
    FINITE_DIFFERENCE = "finite_difference"


@documented
class RENG(KFAC):
    """Regularized Explicit Natural Gradient: the Kronecker preconditioner applied to the
    gradient of the regularized loss, grad l_G = g + rho*H g, the gradient of
    l + rho/2 |grad l|^2. It enters the default eigen-mode stage (D is then the second moment of
    the rotated regularized gradient) or the paper's (A x G + lambda*I)^-1 grad l_G
    (preconditioner='kfac'). The curvature statistics come from the plain loss's backward only.

    * gr_mode='double_backprop' (default): exact Hg by differentiating |g|^2/2. In plain
      PyTorch call loss.backward(create_graph=True) before step() (or
      lightning_grng.regularized_backward(loss, optimizer)); in Lightning GRNGStrategy does it.
    * gr_mode='finite_difference': Hg ~ (grad l(theta + eps*g) - g)/eps with eps = fd_eps/|g|,
      one extra forward/backward on the same batch and no double backward (works with
      BatchNorm and kernels without a double backward). Needs step(closure); buffers such as
      BatchNorm running statistics are restored after the extra pass.
    * gr_norm='unsquared' penalizes rho*|grad l| instead (Zhao et al. 2022): the extra gradient
      is rho*H g/|g| (|g| the global norm), and with finite differences it is Zhao's
      (grad l(theta + fd_eps*g/|g|) - g)*rho/fd_eps.
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
        curvature_every: int | None = None,
        inverse_every: int | None = None,
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
        curvature: str | None = None,
        momentum_on: str | None = None,
        refresh: str = "eigh",
        stagger_first: int | None = None,
        max_factor: int | None = None,
        split_conv: int | None = None,
        one_sided: str | None = None,
        compile: bool = False,
        lazy_rows: bool | None = None,
        batch_blocks: bool = False,
        gr_norm: str = "squared",
    ) -> None:
        self._configure(params, hyperparameters(locals()))

    def _configure(self, params: ParamsT, hp: dict[str, Any]) -> None:
        name = type(self).__name__
        self.gr_mode = check_choice(name, "gr_mode", hp.pop("gr_mode"), GRMode)
        self.fd_eps = check_range(name, "fd_eps", hp.pop("fd_eps"), 0.0, low_open=True)
        self.gr_norm = check_choice(name, "gr_norm", hp.pop("gr_norm"), GRNorm)
        rho = hp.pop("rho")
        super()._configure(params, hp)
        self._add_group_default("rho", self._check_group_value("rho", rho))
        #: The gradients in .grad are already ∇ℓ_G (set by :meth:`regularized_backward`).
        self._grads_regularized = False
        #: ‖g‖² of the plain (unregularized) gradient, on the device; reported as grad_norm.
        self.plain_grad_sq: Tensor | None = None

    @property
    def regularizes(self) -> bool:
        return any(group["rho"] > 0.0 for group in self.param_groups)

    @property
    def needs_double_backward(self) -> bool:
        """Whether the training loop's backward must keep the graph of the gradient."""
        return self.gr_mode is GRMode.DOUBLE_BACKPROP and self.regularizes

    def _hooks_on_model(self, model: nn.Module) -> list[Any]:
        """Double backprop differentiates attention's backward, which the fused SDPA kernels
        cannot: training forwards of ``model`` run the math kernel (``curvature/sdpa.py``)."""
        if self.gr_mode is GRMode.DOUBLE_BACKPROP:
            return [use_math_sdpa(model)]
        return []

    def _rho_of(self) -> dict[Tensor, float]:
        return {p: group["rho"] for group in self.param_groups for p in group["params"]}

    def _reported_grad_sq(self) -> float | Tensor:
        plain = self.plain_grad_sq
        return super()._reported_grad_sq() if plain is None else plain

    # ------------------------------------------------------------------ the public seam
    def gradient_penalty(
        self, loss: Tensor, loss_scale: float = 1.0, average: Average | None = None
    ) -> Tensor | None:
        """The penalty whose gradient is ``c·ρ·Hg``, built from an out-of-place inner gradient.

        ``loss`` is ``c·ℓ`` (``c = loss_scale``: e.g. ``1/N`` under gradient accumulation over
        N micro-batches, times the AMP loss scale). The inner ``autograd.grad(...,
        create_graph=True)`` is the plain loss's backward: its output gradients are the
        curvature statistics. Locally the penalty is ``ρ/(2c)·‖∇(cℓ)‖²``; with ``average``
        (DDP: the mean over ranks, ḡ) it is ``ρ/c·⟨∇(cℓ), ḡ⟩`` with ḡ constant, whose gradient
        averaged by DDP is ``ρ·H̄ḡ``: the global GR. Returns None when ρ = 0 everywhere.
        """
        if not self.regularizes:
            return None
        rho_of = self._rho_of()
        params = [p for p in self.flat_params() if p.requires_grad]
        with self._gate.statistics_pass():
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        if average is None:
            used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
            scale = self._norm_scale(
                self._record_plain_grad_norm([g.detach() / loss_scale for _, g in used])
            )
            return sum(0.5 / loss_scale * rho_of[p] * scale * g.pow(2).sum() for p, g in used)  # type: ignore[return-value]
        local = [
            torch.zeros_like(p) if g is None else g.detach()
            for p, g in zip(params, grads, strict=True)
        ]
        mean = average(local)
        scale = self._norm_scale(self._record_plain_grad_norm([g / loss_scale for g in mean]))
        return sum(  # type: ignore[return-value]
            (rho_of[p] * scale / loss_scale) * (g * m).sum()
            for p, g, m in zip(params, grads, mean, strict=True)
            if g is not None
        )

    def regularized_backward(
        self,
        loss: Tensor,
        loss_scale: float = 1.0,
        average: Average | None = None,
        include_loss: bool = True,
    ) -> None:
        """One backward that accumulates ``c·∇(ℓ + ρ/2‖∇ℓ‖²)`` into ``.grad``: the penalty
        (:meth:`gradient_penalty`), then ONE ordinary backward with the curvature capture
        paused (the statistics came from the inner gradient), and the gradients marked as
        regularized for :meth:`step`. This is the backward DDP can synchronize.

        ``include_loss=False`` backpropagates the penalty only (retaining the graph), for a
        loop whose own backward of the loss follows (Lightning's, under another strategy).
        """
        penalty = self.gradient_penalty(loss, loss_scale, average)
        if penalty is None:
            if include_loss:
                loss.backward()
            return
        with self._gate.paused():
            if include_loss:
                (loss + penalty).backward()
            else:
                penalty.backward(retain_graph=True)
        self._grads_regularized = True

    # ------------------------------------------------------------------ gradients
    def _gradients(self, closure: Callable[[], Any] | None) -> tuple[Any, dict[Tensor, Tensor]]:
        if self.gr_mode is GRMode.FINITE_DIFFERENCE and self.regularizes:
            return self._finite_difference_gradients(closure)
        loss, _ = super()._gradients(closure)  # runs the closure (Lightning's backward)
        params = [p for p in self.flat_params() if p.grad is not None]
        grads = [p.grad for p in params]
        if self._grads_regularized:  # regularized_backward() already produced ∇ℓ_G
            self._grads_regularized = False
            return loss, {p: g.detach() for p, g in zip(params, grads, strict=True)}
        graph = [(p, g) for p, g in zip(params, grads, strict=True) if g.requires_grad]
        if self.regularizes and not graph:
            raise RuntimeError(
                f"{type(self).__name__}(gr_mode='double_backprop') needs the graph of the "
                "gradient: call `loss.backward(create_graph=True)` (or "
                "`lightning_grng.regularized_backward(loss, optimizer)`) before `step()`; in "
                "Lightning use `strategy=GRNGStrategy()`; or choose "
                "gr_mode='finite_difference' and pass a closure to `step()`."
            )
        scale = self._norm_scale(self._record_plain_grad_norm(grads))
        if not graph or not self.regularizes:
            for p in params:
                p.grad = p.grad.detach()
            return loss, {p: p.grad for p in params}
        # The user's backward kept the graph: Hg is the gradient of ½‖g‖² through it.
        with torch.enable_grad(), self._gate.paused():
            penalty = 0.5 * sum(g.pow(2).sum() for _, g in graph)
            hvps = torch.autograd.grad(penalty, [p for p, _ in graph], allow_unused=True)
        hvp_of = {p: h for (p, _), h in zip(graph, hvps, strict=True) if h is not None}
        rho_of = self._rho_of()
        out = {}
        for p in params:
            p.grad = p.grad.detach()  # frees the double-backward graph (and its ref cycle)
            g = p.grad
            if p in hvp_of:
                g = g + rho_of[p] * scale * hvp_of[p]
            out[p] = g
        return loss, out

    def _finite_difference_gradients(
        self, closure: Callable[[], Any] | None
    ) -> tuple[Any, dict[Tensor, Tensor]]:
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
            return loss, dict(zip(params, grads, strict=True))
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
        # Unsquared: ρHg/‖g‖ ≈ (ρ/fd_eps)(∇ℓ(θ + fd_eps·ĝ) − g), Zhao et al.'s form.
        quotient = eps * norm if self.gr_norm is GRNorm.UNSQUARED else eps
        return loss, {
            p: g + (rho_of[p] / quotient) * (s - g)
            for p, g, s in zip(params, grads, shifted, strict=True)
        }

    def _norm_scale(self, grad_sq: Tensor) -> Tensor | float:
        """The factor on ``ρHg``: 1 for the squared penalty, ``1/‖g‖`` for the unsquared one
        (the gradient of ρ‖∇ℓ‖ is ρHg/‖g‖); on the device, no read-back."""
        if self.gr_norm is GRNorm.SQUARED:
            return 1.0
        return grad_sq.clamp_min(torch.finfo(grad_sq.dtype).tiny).rsqrt()

    def _record_plain_grad_norm(self, grads: list[Tensor]) -> Tensor:
        """‖g‖² of the plain gradient, kept on the device (reported as ``grad_norm``)."""
        sq = device_total(g.detach().double().pow(2).sum() for g in grads)
        self.plain_grad_sq = sq
        return sq


def regularized_backward(loss: Tensor, optimizer: RENG, loss_scale: float = 1.0) -> None:
    """``optimizer.regularized_backward(loss, loss_scale)``: one ordinary backward that
    accumulates ``∇(ℓ + ρ/2‖∇ℓ‖²)`` into ``.grad`` (see :meth:`RENG.regularized_backward`).
    With gradient accumulation, pass ``loss_scale=1/N`` for losses divided by N: the penalty is
    then formed per micro-batch, accumulating ``∇(ℓ_i + ρ/2‖∇ℓ_i‖²)/N``."""
    optimizer.regularized_backward(loss, loss_scale)
