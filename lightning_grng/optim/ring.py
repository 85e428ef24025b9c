"""RING: the gradient regularizer enters the update direction as adaptive damping."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

from lightning_grng.curvature.kronecker import InverseMethod
from lightning_grng.optim.arguments import documented, hyperparameters
from lightning_grng.optim.base import GROUP_RANGES, RHO_RANGE, ParamsT
from lightning_grng.optim.damping import GRForm
from lightning_grng.optim.kfac import KFAC
from lightning_grng.optim.routes import Preconditioner
from lightning_grng.optim.validation import check_choice


@documented
class RING(KFAC):
    """Regularized Implicit Natural Gradient: gradient regularization as adaptive damping.

    Gradient regularization l + rho/2 |grad l|^2 enters the quadratic model as extra curvature
    rho g g^T (the squared directional derivative along the step). In the default eigen mode it
    is projected, like the Fisher itself, on the diagonal of the Kronecker eigenbasis:
    U = Q (D + gamma + rho R*R)^(-1/2) Q^T g with R = Q^T g the rotated gradient; rho is
    dimensionless there (docs/algorithms.md section 8.3). In the kfac mode (the paper's route)
    it is majorized by rho |g_b|^2 I so the Kronecker structure survives:
    U = (A x G + (gamma + rho |g_b|^2 / n_b) I)^-1 g. The result is damping that is large where
    gradients are large (a conservative, SGD-like step) and vanishes near flat minima (pure
    natural gradient). One backward pass per step. RING(rho=0) is exactly KFAC.
    The damping rule, where rho enters, is lightning_grng/optim/damping.py.
    """

    group_ranges: ClassVar[dict[str, tuple[float, float | None, bool, bool]]] = {
        **GROUP_RANGES,
        **RHO_RANGE,
    }
    #: The kfac mode's inverse when None is given: Newton–Schulz measured better on
    #: Fashion-MNIST there (``docs/defaults.md``).
    kfac_inverse: ClassVar[InverseMethod] = InverseMethod.NEWTON
    gr_as_damping: ClassVar[bool] = True
    ARGUMENTS: ClassVar[dict[str, str]] = {
        "rho": "gradient-regularization strength rho >= 0. None: the route's default, 0.1 in "
        "the eigen mode (dimensionless) and 10 in the kfac mode (relative units).",
        "inverse": "how the kfac mode represents its inverse: 'newton' (warm-started "
        "Newton-Schulz inverses, the adaptive damping refreshed with them every inverse_every "
        "steps) or 'eigh' (the exact adaptive damping every step). The eigen mode needs "
        "'eigh'. None: 'eigh' in the eigen mode, 'newton' in the kfac mode.",
        "gr_form": "where the GR curvature rho g g^T enters the eigen mode (docs/algorithms.md "
        "section 8.3): 'diagonal' (rho R*R, its exact diagonal in the eigenbasis: the raw "
        "squared norm), 'isotropic' (rho mean(R*R): the paper's majorizer made relative), "
        "'unsquared' (the penalty rho |grad l|, Zhao et al. 2022) or 'preconditioned' (the "
        "penalty on Adam's preconditioned norm). The kfac mode's placement is fixed (section 3).",
    }

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
        curvature_every: int | None = None,
        inverse_every: int | None = None,
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
        gr_form: str = "diagonal",
    ) -> None:
        self._configure(params, hyperparameters(locals()))

    def _configure(self, params: ParamsT, hp: dict[str, Any]) -> None:
        rho = hp.pop("rho")
        gr_form = check_choice("RING", "gr_form", hp.pop("gr_form"), GRForm)
        super()._configure(params, hp)
        if gr_form is not GRForm.DIAGONAL and self.preconditioner is not Preconditioner.EIGEN:
            raise ValueError(
                f"RING: gr_form={gr_form.value!r} places the GR curvature in the eigen mode's "
                "basis; the kfac mode's placement is fixed (the trace-matched isotropic term, "
                "docs/algorithms.md section 3). Use preconditioner='eigen', or leave gr_form at "
                "'diagonal'."
            )
        self.gr_form = gr_form
        rho = self.route.ring_rho if rho is None else rho
        self._add_group_default("rho", self._check_group_value("rho", rho))
        for group in self.param_groups:
            self._warn_if_frozen(group["rho"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "route"):  # not while the constructor builds the groups
            self._warn_if_frozen(self.param_groups[-1].get("rho", 0.0))

    def _warn_if_frozen(self, rho: float) -> None:
        """A ρ 10⁴ times the route's default makes the GR term dominate the curvature, so the
        step shrinks toward nothing (in the eigen mode like ``1/sqrt(1 + ρ·R²/D)``)."""
        typical = self.route.ring_rho
        if rho <= 1e4 * typical:
            return
        warnings.warn(
            f"RING: rho={rho:g} is {rho / typical:.0e} times the default {typical:g} of the "
            f"{self.route.name} route: the gradient-regularization curvature then dominates "
            f"the damping and shrinks every step (by about {1 / math.sqrt(1 + rho):.0e} in the "
            "eigen mode), so training would stand still; typical values are 0.01-1 (eigen) "
            "or 1-100 (kfac).",
            UserWarning,
            stacklevel=4,
        )
