"""Kalman (information-filter) recursions on Kronecker covariance factors, without inversion.

RKalman keeps, per Kronecker block, covariance factors ``P_A = Λ_A⁻¹`` and ``P_G = Λ_G⁻¹``
directly and never forms, inverts or decomposes a precision ``Λ``. Every change to ``Λ`` is
additive, and each one has an inversion-free counterpart on ``P``:

==========================  ==========================  ==========================================
precision (information)     covariance (what is stored)  function
==========================  ==========================  ==========================================
``Λ ← s·Λ``                 ``P ← P / s``                :func:`predict` (forgetting, process noise
                                                         ``Q = (1/s − 1)·P``)
``Λ ← Λ + c·I``             ``P ← P (I + cP)⁻¹``         :func:`add_floor` (truncated power series,
                                                         needs ``c‖P‖ < 1``)
``Λ ← Λ + u uᵀ / c``        ``P − (Pu)(Pu)ᵀ/(c+uᵀPu)``   :func:`sherman_morrison_update`
``Λ ← Λ + U Uᵀ / c``        k scalar innovations         :func:`woodbury_update` (blocked)
==========================  ==========================  ==========================================

Everything is batched over leading dimensions (the block's groups) and is plain matrix
arithmetic: no ``linalg.inv``/``solve``/``cholesky``/``eigh``/``pinv`` and no Newton iteration.
The derivation, the error bounds and the measured candidates are in ``docs/algorithms.md §7``.

:class:`KalmanAccumulator` turns the capture hooks' rows into the measurement (a sign sketch
or a row sample, :class:`MeasurementMethod`), and :class:`KalmanFactors` holds one block's filter
state and runs one filter update (predict, floor, measure, guards).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from lightning_grng.curvature.inverse import symmetrize, working_dtype

#: Largest ``c‖P‖`` one floor piece may have; larger increments are split into pieces.
MAX_FLOOR_RATIO = 0.5
#: Increments needing more than this many pieces (``c/lo > 1.5⁶ − 1 ≈ 10``) reset the factor.
MAX_FLOOR_PIECES = 6


class MeasurementMethod(str, Enum):
    """How a factor's batch statistic ``S = XᵀX / R`` is turned into k measurement vectors."""

    SKETCH = "sketch"
    ROWS = "rows"


# ---------------------------------------------------------------------------- the identities
def predict(P: Tensor, retain: float | Tensor) -> Tensor:
    """Predict step with forgetting: ``P / s``, i.e. ``Λ ← s·Λ`` for ``s = retain`` in (0, 1].

    Equivalent to additive process noise proportional to the covariance,
    ``P + Q`` with ``Q = (1/s − 1)·P`` (Ollivier 2019: the EKF with this noise is online natural
    gradient with a constant step).
    """
    if isinstance(retain, Tensor):
        return P / retain[..., None, None]
    return P / retain


def add_floor(P: Tensor, c: float | Tensor, terms: int) -> Tensor:
    """``(P⁻¹ + cI)⁻¹ = P (I + cP)⁻¹`` by the power series ``P Σ_{k=0..K} (−cP)^k``.

    Converges when ``c‖P‖₂ < 1``. In the eigenbasis of P, with ``x = c·p`` for an eigenvalue p
    of P and ``λ = 1/p``, the truncated result is the inverse of
    ``(λ + c) / (1 − (−x)^{K+1})`` instead of ``λ + c``: the precision added differs from c by
    the relative error ``(1 + x)·x^K / (1 − (−x)^{K+1})``. For odd K it is never less than c (the
    floor is never under-applied), so the result stays SPD and ``≤ P``. Evaluated by Horner's
    rule, K matmuls; every factor is a polynomial in P, so the result is symmetric up to
    rounding.

    Args:
        P: SPD ``(..., n, n)``.
        c: the precision to add, a scalar or one per leading index.
        terms: K >= 1.
    """
    c_ = c[..., None, None] if isinstance(c, Tensor) else c
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    T = eye - c_ * P
    for _ in range(terms - 1):
        T = eye - c_ * (P @ T)
    return P @ T


def floor_terms(ratio: float, tol: float) -> int:
    """Smallest odd K with ``(1 + r)·r^K / (1 − r^{K+1}) <= tol``: the terms :func:`add_floor`
    needs for a relative error ``tol`` on the added precision when ``c‖P‖ <= r < 1``."""
    if ratio <= 0.0:
        return 1
    k = 1
    while (1.0 + ratio) * ratio**k / (1.0 - ratio ** (k + 1)) > tol and k < 99:
        k += 2
    return k


def sherman_morrison_update(P: Tensor, u: Tensor, c: float | Tensor) -> Tensor:
    """``(P⁻¹ + u uᵀ / c)⁻¹ = P − (Pu)(Pu)ᵀ / (c + uᵀPu)``: one scalar measurement.

    ``u`` is a measurement vector ``(..., n)`` and ``c > 0`` its observation noise (the scalar
    innovation variance is ``c + uᵀPu``). ``uᵀPu`` is clamped at 0, so the innovation never drops
    below the noise. O(n²).
    """
    v = (P @ u[..., None])[..., 0]
    q = (u * v).sum(-1).clamp_min(0.0)
    s = q + c
    return P - v[..., :, None] * v[..., None, :] / s[..., None, None]


def woodbury_update(P: Tensor, U: Tensor, c: float | Tensor) -> Tensor:
    """``(P⁻¹ + U Uᵀ / c)⁻¹`` for k measurement vectors, the columns of U ``(..., n, k)``.

    Exactly k sequential :func:`sherman_morrison_update` calls (scalar innovations, in column
    order), evaluated *blocked*: the sequential gains ``v_j = P_{j−1} u_j`` are kept for all
    columns at once in ``W = P U`` and, after each scalar innovation ``s_j = c + u_jᵀ v_j``,
    the remaining columns are updated like modified Gram–Schmidt,
    ``w_i ← w_i − v_j (v_jᵀ u_i) / s_j`` (that is ``P_j u_i``), so P itself is touched by two
    matmuls only: ``W = PU`` and ``P − V Vᵀ`` with ``V = [v_j / √s_j]``. The result equals
    Woodbury's ``P − PU (cI + UᵀPU)⁻¹ UᵀP`` without any k×k inverse or linear solve.

    O(2n²k + nk²) flops. Rounding matches sequential Sherman–Morrison (relative error about
    ``eps·uᵀPu/c``), whereas eliminating on ``UᵀPU`` directly squares that factor (measured in
    ``docs/algorithms.md §7``).
    """
    W = (P @ U).clone()  # column i holds P_{j} u_i as j advances
    k = U.shape[-1]
    c_ = c[..., None] if isinstance(c, Tensor) else c
    V = torch.empty_like(W)
    for j in range(k):
        v = W[..., :, j]
        u = U[..., :, j]
        s = (u * v).sum(-1, keepdim=True).clamp_min(0.0) + c_  # innovation, >= c
        if j + 1 < k:
            rest = U[..., :, j + 1 :]
            coeff = (v[..., :, None] * rest).sum(-2) / s
            W[..., :, j + 1 :] -= v[..., :, None] * coeff[..., None, :]
        V[..., :, j] = v / s.sqrt()
    return P - V @ V.transpose(-1, -2)


def inf_norm(P: Tensor) -> Tensor:
    """``max_i Σ_j |P_ij|`` per leading index: an upper bound of ‖P‖₂ for symmetric P."""
    return P.abs().sum(-1).amax(-1)


def relative_floor(n: int, dtype: torch.dtype) -> float:
    """Smallest damping, relative to a factor's mean eigenvalue, that keeps it representable.

    ``100·n·eps``: the precision's condition number is then at most about ``1/(100·eps)``
    whatever the scale of the gradients (for a 1000-wide factor: 2e-11 of the mean eigenvalue
    in float64, 1.2e-2 in float32). It binds only when the statistics dwarf the configured
    damping (huge gradients).
    """
    return 100.0 * n * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------- measurements
@dataclass
class Measurement:
    """One filter update's data for one block.

    Attributes:
        U_A: ``(groups, n_in, k)`` with ``E[U_A U_Aᵀ] = S_A``, the mean of ``ā āᵀ`` over rows.
        U_G: ``(groups, n_out, k)`` with ``E[U_G U_Gᵀ] = S_G``, the per-sample output Fisher
            (KFAC's G for a mean-reduced loss), or None when the output noise is known.
        trace_a: ``tr S_A`` per group (exact, from all rows).
        trace_g: ``tr S_G`` per group (exact), or None.
        n_out: output-factor size.
        samples: samples in the step (all micro-batches).
    """

    U_A: Tensor
    U_G: Tensor | None
    trace_a: Tensor
    trace_g: Tensor | None
    n_out: int
    samples: int

    def finite(self) -> bool:
        parts = [self.U_A, self.trace_a]
        if self.U_G is not None and self.trace_g is not None:
            parts += [self.U_G, self.trace_g]
        return all(bool(torch.isfinite(p).all()) for p in parts)


class KalmanAccumulator:
    """Keeps what the measurement step needs: k compressed rows per factor, and exact traces.

    ``"sketch"``: every pass adds ``Xᵀ Ω`` with ``Ω`` an ``(R, k)`` sign sketch (row r has one
    random ±1, in column r mod k), so ``E[U Uᵀ] = Σ XᵀX`` over the passes (unbiased, k columns
    whatever R; O(R·n) work).
    ``"rows"``: every pass keeps k of its R rows drawn without replacement, scaled by
    ``sqrt(R/k)`` (also unbiased); all rows, unscaled, when ``R <= k``, so the measurement is
    exactly the batch statistic for a linear layer whose batch has at most k rows.

    Random draws come from a generator seeded by ``seed_fn()`` (a function of the optimizer's
    seed, step and block), so a resumed run draws the same sketches as an uninterrupted one.

    Args:
        method: ``"sketch"`` or ``"rows"``.
        size: k, the measurement vectors per factor and pass.
        seed_fn: returns the base seed of the current step.
        need_g: False when the output noise is known (output gradients are only counted).
    """

    def __init__(
        self,
        method: MeasurementMethod | str,
        size: int,
        seed_fn: Callable[[], int],
        need_g: bool = True,
    ) -> None:
        self.method = MeasurementMethod(method)
        self.size = size
        self.seed_fn = seed_fn
        self.need_g = need_g
        self.reset()

    def reset(self) -> None:
        self.a_parts: list[Tensor] = []
        self.a_trace: Tensor | None = None
        self.a_rows = 0
        self.g_parts: list[Tensor] = []
        self.g_trace: Tensor | None = None
        self.g_samples = 0
        self.n_out = 0
        self._draws = 0
        #: Backward passes committed since the last reset (micro-batches of the window).
        self.passes = 0

    @property
    def complete(self) -> bool:
        return self.a_trace is not None and self.g_samples > 0

    def _generator(self, device: torch.device) -> torch.Generator:
        seed = (self.seed_fn() * 1_000_003 + self._draws * 7_919) % (2**62)
        self._draws += 1
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen

    def _compress(self, rows: Tensor) -> Tensor:
        """``(groups, n, k')`` with ``E[U Uᵀ] = rowsᵀ rows``."""
        n_rows, k = rows.shape[-2], self.size
        if self.method is MeasurementMethod.SKETCH:
            # Signed bucket sums: column b adds the rows r ≡ b (mod k), each with a random sign.
            # The signs alone make E[U Uᵀ] = XᵀX (cross terms have mean zero); the work is one
            # multiply and one reduction over R·n entries, where a dense Gaussian Ω costs R·k
            # normals and 2R·n·k flops (the draws alone were most of RKalman's own conv time).
            gen = self._generator(rows.device)
            sign = torch.randint(2, (n_rows, 1), generator=gen, device=rows.device)
            signed = rows * sign.to(rows.dtype).mul_(2.0).sub_(1.0)
            whole = n_rows // k * k
            lead, n = rows.shape[:-2], rows.shape[-1]
            out = signed[..., :whole, :].reshape(*lead, n_rows // k, k, n).sum(-3)
            out[..., : n_rows - whole, :] += signed[..., whole:, :]
            return out.transpose(-1, -2)
        if n_rows <= k:
            return rows.transpose(-1, -2)
        gen = self._generator(rows.device)
        idx = torch.randperm(n_rows, generator=gen, device=rows.device)[:k]
        return rows[..., idx, :].transpose(-1, -2) * math.sqrt(n_rows / k)

    def add_input(self, rows: Tensor, samples: int) -> None:
        rows = rows.to(working_dtype(rows.dtype))
        trace = rows.pow(2).sum((-2, -1))
        self.a_trace = trace if self.a_trace is None else self.a_trace + trace
        self.a_rows += rows.shape[-2]
        self.a_parts.append(self._compress(rows))

    def add_output_grad(self, rows: Tensor, samples: int) -> None:
        self.g_samples += samples
        self.n_out = rows.shape[-1]
        if not self.need_g:
            return
        rows = rows.to(working_dtype(rows.dtype))
        trace = rows.pow(2).sum((-2, -1))
        self.g_trace = trace if self.g_trace is None else self.g_trace + trace
        self.g_parts.append(self._compress(rows))

    def scale_output_grads(self, factor: float) -> None:
        """Multiplies the output-gradient statistic by ``factor`` (its vectors by the root)."""
        if self.g_trace is not None:
            self.g_trace = self.g_trace * factor
        root = math.sqrt(factor)
        self.g_parts = [part * root for part in self.g_parts]

    def _join(self, parts: list[Tensor]) -> Tensor:
        if len(parts) == 1:
            return parts[0]
        if self.method is MeasurementMethod.SKETCH:
            # Σ_p X_pᵀ Ω_p with independent Ω_p keeps E[UUᵀ] = Σ_p X_pᵀ X_p in k columns.
            return torch.stack(parts).sum(0)
        return torch.cat(parts, dim=-1)

    def measurement(self, mean_reduction: bool) -> Measurement:
        """The step's measurement, in the scale convention of :meth:`FactorAccumulator.averaged`:
        ``S_A`` is the mean of ``ā āᵀ`` over rows; ``S_G`` is the per-sample output Fisher
        (``N·Σ δδᵀ`` for a mean-reduced loss over N samples, ``Σ δδᵀ / N`` for a sum)."""
        assert self.a_trace is not None
        rows = max(self.a_rows, 1)
        U_A = self._join(self.a_parts) / math.sqrt(rows)
        trace_A = self.a_trace / rows
        U_G = trace_G = None
        if self.need_g:
            assert self.g_trace is not None
            n = max(self.g_samples, 1)
            scale = float(n) if mean_reduction else 1.0 / n
            U_G = self._join(self.g_parts) * math.sqrt(scale)
            trace_G = self.g_trace * scale
        return Measurement(U_A, U_G, trace_A, trace_G, self.n_out, self.g_samples)


# ---------------------------------------------------------------------------- filter state
class KalmanFactors:
    """The filter state of one block: per-unit covariance factors and the information count.

    The block's posterior precision is ``Λ = N · Λ̄_A ⊗ Λ̄_G`` (column-major vec of the
    ``(n_out, n_in)`` weight matrix), stored as ``P_A = Λ̄_A⁻¹`` ``(groups, n_in, n_in)``,
    ``P_G = Λ̄_G⁻¹`` ``(groups, n_out, n_out)`` and the count ``N``; the covariance is
    ``P_A ⊗ P_G / N``. One :meth:`update` with information c, gain ``γ = c/N'``
    (``N' = εN + c``) and prior weight ``β = (1−ε)·N₀/N'`` realizes, for each factor,

        ``Λ̄ ← (1 − γ)·Λ̄ + β·δ(λ)·I + γ·(S + [δ(λ + r) − δ(λ)]·I)``

    as predict (``P/(1−γ)``), floor (:func:`add_floor`) and measurement (``+γ U Uᵀ``,
    :func:`woodbury_update`): ``δ(λ)`` is the factor's share of the damping λ (the prior,
    re-injected by stabilized forgetting) and ``r = ρ‖g‖²`` the gradient regularizer's
    curvature, absorbed with the batch. At ``ε = 1`` this is exact Bayesian updating with prior
    precision ``N₀ · Λ̄_A,0 ⊗ Λ̄_G,0``; for ``ε < 1`` and ``N₀ = c/(1−ε)`` it is KFAC's moving
    average with damping, ``Λ̄ ← εΛ̄ + (1−ε)(S + δ(λ + r)I)``, and the floor survives
    forgetting: ``λ_min(Λ̄)`` never falls below the smallest floor applied.

    Args:
        dtype: storage dtype of the factors (float32 or better).

    Attributes:
        P_A, P_G: the per-unit covariance factors (None before the first update). With known
            output noise σ², ``P_G = σ²I`` and is not filtered.
        count: N, the information count in loss units (1 per update for a mean-reduced loss,
            samples for a sum-reduced one).
        prior_count: N₀.
        mean_A, mean_G: running mean eigenvalues ``tr S / n`` of the statistics (they set the
            π split of the damping and the relative floor).
        lo_A, lo_G: running lower bounds of ``λ_min(Λ̄)``, so ``‖P‖₂ <= 1/lo``.
        updates, failures, floor_pieces, floor_resets: counters.
    """

    TENSORS = ("P_A", "P_G", "mean_A", "mean_G", "lo_A", "lo_G")
    COUNTERS = ("updates", "failures", "floor_pieces", "floor_resets")

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.P_A: Tensor | None = None
        self.P_G: Tensor | None = None
        self.mean_A: Tensor | None = None
        self.mean_G: Tensor | None = None
        self.lo_A: Tensor | None = None
        self.lo_G: Tensor | None = None
        self.count = 0.0
        self.prior_count = 0.0
        self.updates = 0
        self.failures = 0
        self.floor_pieces = 0
        self.floor_resets = 0

    @property
    def ready(self) -> bool:
        return self.P_A is not None and self.P_G is not None

    # ------------------------------------------------------------------ floors
    def floors(
        self,
        damping: float,
        observation_noise: float | None,
        mean_A: Tensor,
        mean_G: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-group floors ``(δ_A, δ_G)`` for the product damping λ = ``damping``.

        Estimated output noise: ``δ_A = π√λ`` and ``δ_G = √λ/π`` with
        ``π = sqrt(mean_A / mean_G)`` (Martens & Grosse 2015, §6.3), so ``δ_A·δ_G = λ``. Known
        noise σ²: ``Λ̄_G = I/σ²`` and ``δ_A = λσ²``, because
        ``(Λ̄_A + λσ²I) ⊗ I/σ² = Λ̄_A ⊗ I/σ² + λI``.
        """
        tiny = torch.finfo(self.dtype).tiny
        if observation_noise is not None:
            return torch.full_like(mean_A, damping * observation_noise).clamp_min(tiny), None
        assert mean_G is not None
        pi = torch.sqrt(mean_A.clamp_min(tiny) / mean_G.clamp_min(tiny))
        root = math.sqrt(damping)
        return (pi * root).clamp_min(tiny), (root / pi).clamp_min(tiny)

    def _apply_floor(
        self, P: Tensor, lo: Tensor, c: Tensor, tol: float
    ) -> tuple[Tensor, Tensor, int, int]:
        """``Λ̄ ← Λ̄ + cI`` given ``‖P‖ <= 1/lo``; returns ``(P, lo, pieces, resets)``.

        The increment is split into pieces with ``c_j·‖P_j‖ <= 1/2`` (the bound improves by
        ``c_j`` after each), each applied by :func:`add_floor` with :func:`floor_terms` terms.
        A group whose increment exceeds what :data:`MAX_FLOOR_PIECES` pieces can add (the floor
        jumps ~10x at once: the statistics changed scale abruptly, so the old information is
        inconsistent with the new floor anyway) is reset to ``I/(lo + c)`` and counted.
        """
        # ‖P‖₂ <= 1/lo holds in exact arithmetic; ‖P‖_∞ keeps it valid under rounding, and
        # no valid bound exceeds 1/max diag(P).
        diag_max = torch.diagonal(P, dim1=-2, dim2=-1).amax(-1)
        lo = torch.minimum(torch.maximum(lo, 1.0 / inf_norm(P)), 1.0 / diag_max)
        growth = (1.0 + MAX_FLOOR_RATIO) ** MAX_FLOOR_PIECES - 1.0
        reset = c > growth * lo
        resets = int(reset.sum())
        if resets:
            eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
            fresh = eye / (lo + c)[..., None, None]
            P = torch.where(reset[..., None, None], fresh, P)
            lo = torch.where(reset, lo + c, lo)
            c = torch.where(reset, torch.zeros_like(c), c)
        pieces = 0
        while bool((c > 0).any()):
            piece = torch.minimum(c, MAX_FLOOR_RATIO * lo)
            ratio = float((piece / lo).max())
            P = add_floor(P, piece, floor_terms(ratio, tol))
            lo, c = lo + piece, c - piece
            pieces += 1
            if pieces >= MAX_FLOOR_PIECES:  # only rounding can leave a remainder here
                break
        return P, lo, pieces, resets

    # ------------------------------------------------------------------ the update
    def update(
        self,
        meas: Measurement,
        *,
        information: float,
        forgetting: float,
        damping: float,
        gr_damping: float = 0.0,
        prior_count: float | None = None,
        observation_noise: float | None = None,
        floor_tol: float = 1e-3,
    ) -> bool:
        """One filter update. Returns False and keeps the last good state when the result is
        not finite or has a non-positive diagonal (counted in ``failures``); a state that is
        itself corrupted (e.g. loaded from a bad checkpoint) restarts from the prior.

        Args:
            meas: the step's measurement.
            information: c > 0, the information of the step in loss units.
            forgetting: ε in (0, 1].
            damping: the product damping λ (the prior's, re-injected with weight β).
            gr_damping: r = ρ‖g‖², curvature of the gradient regularizer absorbed with the
                batch (weight γ); 0 for the plain filter.
            prior_count: N₀ > 0, used at the first update; None: ``c/(1−ε)``, the stationary
                count (needs ε < 1).
            observation_noise: σ² when the output noise is known (then ``P_G = σ²I``).
            floor_tol: relative accuracy of each floor increment (see :func:`add_floor`).
        """
        dtype = self.dtype
        known = observation_noise is not None
        U_A, trace_A = meas.U_A.to(dtype), meas.trace_a.to(dtype)
        groups, n_in, n_out = U_A.shape[0], U_A.shape[-2], meas.n_out
        U_G = trace_G = None
        if not known:
            assert meas.U_G is not None and meas.trace_g is not None
            U_G, trace_G = meas.U_G.to(dtype), meas.trace_g.to(dtype)
        if self.ready and not (_sane(self.P_A) and _sane(self.P_G)):  # type: ignore[arg-type]
            # A corrupted state cannot heal by updates (NaN stays NaN): restart from the prior.
            self.failures += 1
            self.P_A = self.P_G = None
        if not self.ready:
            self._initialize(
                trace_A, trace_G, groups, n_in, n_out, information, forgetting, damping,
                prior_count, observation_noise,
            )  # fmt: skip
        assert self.P_A is not None and self.P_G is not None
        assert self.mean_A is not None and self.lo_A is not None

        count = forgetting * self.count + information
        gain = information / count
        keep = 1.0 - gain
        prior_weight = (1.0 - forgetting) * self.prior_count / count
        mean_A = keep * self.mean_A + gain * trace_A / n_in
        mean_G = None
        if not known:
            assert self.mean_G is not None and trace_G is not None
            mean_G = keep * self.mean_G + gain * trace_G / n_out
        prior_A, prior_G = self.floors(damping, observation_noise, mean_A, mean_G)
        total_A, total_G = self.floors(damping + gr_damping, observation_noise, mean_A, mean_G)
        inc_A = prior_weight * prior_A + gain * (total_A - prior_A)
        inc_G = None
        if prior_G is not None and total_G is not None:
            inc_G = prior_weight * prior_G + gain * (total_G - prior_G)

        new: dict[str, Any] = {"mean_A": mean_A, "mean_G": mean_G}
        pieces = resets = 0
        for side, U, inc in (("A", U_A, inc_A), ("G", U_G, inc_G)):
            if U is None or inc is None:
                continue
            P, lo = predict(getattr(self, f"P_{side}"), keep), getattr(self, f"lo_{side}") * keep
            # The relative floor is kept as a hard lower bound of λ_min(Λ̄).
            hard = relative_floor(U.shape[-2], dtype) * new[f"mean_{side}"]
            c = torch.maximum(inc, hard - lo)
            P, lo, n_pieces, n_resets = self._apply_floor(P, lo, c, floor_tol)
            pieces, resets = pieces + n_pieces, resets + n_resets
            new[f"P_{side}"] = symmetrize(woodbury_update(P, U, 1.0 / gain))
            new[f"lo_{side}"] = lo

        if not all(_sane(new[k]) for k in ("P_A", "P_G") if k in new):
            self.failures += 1
            return False
        for key, value in new.items():
            setattr(self, key, value)
        self.count = count
        self.updates += 1
        self.floor_pieces += pieces
        self.floor_resets += resets
        return True

    def _initialize(
        self,
        trace_A: Tensor,
        trace_G: Tensor | None,
        groups: int,
        n_in: int,
        n_out: int,
        information: float,
        forgetting: float,
        damping: float,
        prior_count: float | None,
        observation_noise: float | None,
    ) -> None:
        """The prior: ``Λ̄_A,0 = δ_A I``, ``Λ̄_G,0 = δ_G I`` (floors of the first statistics) and
        ``N = N₀``, i.e. prior precision ``N₀ δ_A δ_G = N₀ λ`` on the weights."""
        if prior_count is None:
            if forgetting >= 1.0:
                raise ValueError("prior_count is required when forgetting = 1")
            prior_count = information / (1.0 - forgetting)
        self.prior_count = self.count = float(prior_count)
        device = trace_A.device
        self.mean_A = trace_A / n_in
        self.mean_G = None if trace_G is None else trace_G / n_out
        delta_A, delta_G = self.floors(damping, observation_noise, self.mean_A, self.mean_G)
        delta_A = torch.maximum(delta_A, relative_floor(n_in, self.dtype) * self.mean_A)
        if delta_G is not None and self.mean_G is not None:
            delta_G = torch.maximum(delta_G, relative_floor(n_out, self.dtype) * self.mean_G)
        eye_A = torch.eye(n_in, dtype=self.dtype, device=device).expand(groups, n_in, n_in)
        eye_G = torch.eye(n_out, dtype=self.dtype, device=device).expand(groups, n_out, n_out)
        self.P_A = eye_A / delta_A[..., None, None]
        self.lo_A = delta_A.clone()
        if observation_noise is not None:
            self.P_G = eye_G * float(observation_noise)
            self.lo_G = None
        else:
            assert delta_G is not None
            self.P_G = eye_G / delta_G[..., None, None]
            self.lo_G = delta_G.clone()

    # ------------------------------------------------------------------ use
    def precondition(self, V: Tensor) -> Tensor:
        """``P_G · V · P_A`` for V ``(groups, n_out, n_in)`` (the covariance up to 1/N)."""
        assert self.P_A is not None and self.P_G is not None
        return (self.P_G @ V.to(self.P_A.dtype) @ self.P_A).to(V.dtype)

    def covariance(self) -> Tensor:
        """Dense ``P_A ⊗ P_G / N`` per group (column-major vec of the weight matrix); for tests
        and inspection of small blocks."""
        assert self.P_A is not None and self.P_G is not None
        return (
            torch.stack([torch.kron(a, g) for a, g in zip(self.P_A, self.P_G, strict=True)])
            / self.count
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"count": self.count, "prior_count": self.prior_count}
        state.update({key: getattr(self, key) for key in self.COUNTERS})
        for key in self.TENSORS:
            value = getattr(self, key)
            if value is not None:
                state[key] = value
        return state

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.count = float(state.get("count", 0.0))
        self.prior_count = float(state.get("prior_count", 0.0))
        for key in self.COUNTERS:
            setattr(self, key, int(state.get(key, 0)))
        for key in self.TENSORS:
            value = state.get(key)
            # Keep the saved dtype: checkpoints must not silently downcast the filter.
            setattr(self, key, None if value is None else value.to(device))
        if self.P_A is not None:
            self.dtype = self.P_A.dtype


def _sane(P: Tensor) -> bool:
    """Finite with a positive diagonal: necessary for SPD, O(n²), no decomposition."""
    return bool(torch.isfinite(P).all()) and bool((torch.diagonal(P, dim1=-2, dim2=-1) > 0).all())
