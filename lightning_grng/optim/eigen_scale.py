"""The eigen mode's arithmetic between the two rotations, as one function (``docs/algorithms.md``
§8): Adam's second moment of the rotated gradient ``R``, the damped curvature
``D + γ + ρ·GR`` and its power, and, with the gradient's first moment kept in the eigenbasis,
that moment. A dozen elementwise passes over a block's ``(groups, n_out, n_in)`` entries.

Eager by default. ``compile=True`` (the optimizers' option) runs the same function through
``torch.compile``, which fuses the passes into one or two loops: the stage that dominates a
step on a large embedding or on a GPU (many small kernels per block). When compiling fails
(no C++ compiler, an unsupported backend), the optimizer says so once and stays eager: the
moments are only changed by a call that runs, and a failed compile runs nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_grng.numerics import all_finite_each
from lightning_grng.optim.damping import GRForm, eigen_curvature_of

#: The backend handed to ``torch.compile`` (a test swaps in a failing one).
BACKEND: str | Callable[..., Any] = "inductor"


def eigen_scale(
    R: Tensor,
    moment: Tensor,
    first: Tensor | None,
    ratio: Tensor,
    corrections: tuple[float, float],
    beta2: float,
    beta1: float,
    relative: bool,
    rho: float,
    form: GRForm,
    power: float,
    outside: Tensor | None = None,
    numel: int | None = None,
) -> Tensor:
    """``X (D + γ + ρ·GR)^(−power)`` in the eigenbasis, ``X`` the bias-corrected first moment
    (``first`` given) or ``R`` itself; ``moment`` and ``first`` absorb ``R`` in place.

    ``ratio`` is γ's λ·boost per group (relative: times the block's mean D), ``corrections``
    Adam's bias corrections ``(1 − β₂ᵗ, 1 − β₁ᵗ)``. A non-finite ``R∘R`` leaves both moments
    unchanged (decided on the device; the template then drops the direction).

    ``R``, ``moment`` and ``first`` may be ``k`` same-shaped blocks stacked ``(k, groups,
    n_out, n_in)`` (``optim/batching.py``; ``ratio`` and ``corrections`` then hold for all):
    every mean, every finiteness decision is per block.

    ``R``, ``moment`` and ``first`` may be the gathered touched rows of a block
    (``optim/lazy_rows.py``): ``outside`` is then the sum of the block's second moment over
    the entries left out (per group, ``(g, 1, 1)``), ``numel`` the block's entries per group,
    so that the block's mean D, and with it γ, is the whole block's."""
    square = R * R
    ok = all_finite_each(square)  # per block where k same-shaped blocks come stacked
    _ema_(moment, square, 1.0 - beta2, ok)
    D = moment / corrections[0]
    mean_D = None
    if outside is not None:
        mean_D = (moment.sum(dim=(-2, -1), keepdim=True) + outside) / (numel * corrections[0])
    curvature = eigen_curvature_of(D, R, ratio, relative, rho, form, mean_D, numel)
    scale = curvature.rsqrt_() if power == 0.5 else curvature.pow_(-power)
    if first is None:
        return R * scale
    _ema_(first, R.to(first.dtype), 1.0 - beta1, ok)
    return (first / corrections[1]).to(R.dtype) * scale


def _ema_(m: Tensor, x: Tensor, weight: float, ok: Tensor) -> None:
    """``m ← m + weight·(x − m)`` in place where ``ok`` (bool, per block); else ``m`` stays: the
    target is then ``m`` itself, so no NaN of ``x`` reaches it."""
    m.lerp_(torch.where(ok, x, m), weight)


class EigenScale:
    """:func:`eigen_scale`, compiled or eager; a failed compile falls back to eager for good."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self._fn: Callable[..., Tensor] | None = None

    def __call__(self, *args: Any) -> Tensor:
        if self.compiled:
            if self._fn is None:
                self._fn = torch.compile(eigen_scale, backend=BACKEND)
            try:
                return self._fn(*args)
            except (torch._dynamo.exc.TorchDynamoException, _inductor_error()) as error:
                self.compiled, self._fn = False, None
                warnings.warn(
                    f"compile=True: torch.compile failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); the eigen mode's "
                    "per-block update runs eagerly from here on (same results, slower).",
                    stacklevel=3,
                )
        return eigen_scale(*args)


def _inductor_error() -> type[Exception]:
    """Inductor's compile error type (a stand-in where this torch has none)."""
    import torch._inductor.exc as exc

    return getattr(exc, "InductorError", torch._dynamo.exc.TorchDynamoException)
