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
        return bool(self.finite_mask())

    def finite_mask(self) -> Tensor:
        """Whether every part is finite, as a 0-dim bool tensor on the device (no sync)."""
        parts = [self.U_A, self.trace_a]
        if self.U_G is not None and self.trace_g is not None:
            parts += [self.U_G, self.trace_g]
        return torch.stack([torch.isfinite(p).all() for p in parts]).all()


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
        damping: float | Tensor,
        observation_noise: float | None,
        mean_A: Tensor,
        mean_G: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-group floors ``(δ_A, δ_G)`` for the product damping λ = ``damping``.

        Estimated output noise: ``δ_A = π√λ`` and ``δ_G = √λ/π`` with
        ``π = sqrt(mean_A / mean_G)`` (Martens & Grosse 2015, §6.3), so ``δ_A·δ_G = λ``. Known
        noise σ²: ``Λ̄_G = I/σ²`` and ``δ_A = λσ²``, because
        ``(Λ̄_A + λσ²I) ⊗ I/σ² = Λ̄_A ⊗ I/σ² + λI``. ``damping`` may be a 0-dim tensor.
        """
        tiny = torch.finfo(self.dtype).tiny
        if observation_noise is not None:
            return (torch.ones_like(mean_A) * (damping * observation_noise)).clamp_min(tiny), None
        assert mean_G is not None
        pi = torch.sqrt(mean_A.clamp_min(tiny) / mean_G.clamp_min(tiny))
        root = torch.sqrt(damping) if isinstance(damping, Tensor) else math.sqrt(damping)
        return (pi * root).clamp_min(tiny), (root / pi).clamp_min(tiny)

    @staticmethod
    def _plan_floor(P: Tensor, lo: Tensor, c: Tensor) -> dict[str, Any]:
        """The device half of ``Λ̄ ← Λ̄ + cI`` given ``‖P‖ <= 1/lo`` (see :meth:`_apply_floor`).

        The increment is split into pieces with ``c_j·‖P_j‖ <= 1/2`` (the bound improves by
        ``c_j`` after each). A group whose increment exceeds what :data:`MAX_FLOOR_PIECES`
        pieces can add (the floor jumps ~10x at once: the statistics changed scale abruptly,
        so the old information is inconsistent with the new floor anyway) is reset to
        ``I/(lo + c)`` here. All :data:`MAX_FLOOR_PIECES` candidate pieces are computed (tiny
        per-group vectors); which ones are needed, and each one's ratio (its series length),
        are host values read back with the optimizer's step flags.
        """
        # ‖P‖₂ <= 1/lo holds in exact arithmetic; ‖P‖_∞ keeps it valid under rounding, and
        # no valid bound exceeds 1/max diag(P).
        diag_max = torch.diagonal(P, dim1=-2, dim2=-1).amax(-1)
        lo = torch.minimum(torch.maximum(lo, 1.0 / inf_norm(P)), 1.0 / diag_max)
        growth = (1.0 + MAX_FLOOR_RATIO) ** MAX_FLOOR_PIECES - 1.0
        reset = c > growth * lo
        eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
        P = torch.where(reset[..., None, None], eye / (lo + c)[..., None, None], P)
        lo = torch.where(reset, lo + c, lo)
        c = torch.where(reset, torch.zeros_like(c), c)
        pieces, active, ratios = [], [], []
        for _ in range(MAX_FLOOR_PIECES):
            piece = torch.minimum(c, MAX_FLOOR_RATIO * lo)
            active.append((c > 0).any())
            ratios.append((piece / lo).max())
            pieces.append(piece)
            lo, c = lo + piece, c - piece
        return {"P": P, "lo": lo, "pieces": pieces, "active": active, "ratios": ratios,
                "resets": reset.sum()}  # fmt: skip

    def _apply_floor(
        self, P: Tensor, lo: Tensor, c: Tensor, tol: float
    ) -> tuple[Tensor, Tensor, int, int]:
        """``Λ̄ ← Λ̄ + cI`` given ``‖P‖ <= 1/lo``; returns ``(P, lo, pieces, resets)``.

        Host-synchronous convenience form of :meth:`_plan_floor` + :func:`add_floor` (one
        read-back); the optimizer reads the plan with its step flags instead.
        """
        plan = self._plan_floor(P, lo, c)
        values = torch.stack(
            [torch.stack(plan["active"]).to(plan["lo"].dtype), torch.stack(plan["ratios"])]
        ).tolist()
        P, n = plan["P"], 0
        for piece, active, ratio in zip(plan["pieces"], values[0], values[1], strict=True):
            if not active:
                break
            P = add_floor(P, piece, floor_terms(ratio, tol))
            n += 1
        return P, plan["lo"], n, int(plan["resets"])

    # ------------------------------------------------------------------ the update
    def update(
        self,
        meas: Measurement,
        *,
        information: float | Tensor,
        forgetting: float,
        damping: float | Tensor,
        gr_damping: float | Tensor = 0.0,
        prior_count: float | None = None,
        observation_noise: float | None = None,
        floor_tol: float = 1e-3,
    ) -> bool:
        """One filter update. Returns False and keeps the last good state when the result is
        not finite or has a non-positive diagonal (counted in ``failures``); a state that is
        itself corrupted (e.g. loaded from a bad checkpoint) restarts from the prior.

        Host-synchronous convenience form of :meth:`prepare`, :meth:`commit` and
        :meth:`finish` (the optimizer reads the plan back with its step's flags instead).

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
        plan = self.prepare(
            meas, information=information, forgetting=forgetting, damping=damping,
            gr_damping=gr_damping, prior_count=prior_count,
            observation_noise=observation_noise,
        )  # fmt: skip
        values = torch.stack([t.to(torch.float64) for t in plan["readback"]]).tolist()
        ok = self.commit(plan, values, floor_tol)
        return self.finish(plan, bool(ok))

    def prepare(
        self,
        meas: Measurement,
        *,
        information: float | Tensor,
        forgetting: float,
        damping: float | Tensor,
        gr_damping: float | Tensor = 0.0,
        prior_count: float | None = None,
        observation_noise: float | None = None,
    ) -> dict[str, Any]:
        """The device half of one filter update: predict, floors to add and their piece plan,
        the corrupted-state restart (decided by mask). No host read-back; the host values it
        needs are the tensors in ``plan["readback"]``, to be passed to :meth:`commit`."""
        dtype = self.dtype
        known = observation_noise is not None
        U_A, trace_A = meas.U_A.to(dtype), meas.trace_a.to(dtype)
        groups, n_in, n_out = U_A.shape[0], U_A.shape[-2], meas.n_out
        device = U_A.device
        U_G = trace_G = None
        if not known:
            assert meas.U_G is not None and meas.trace_g is not None
            U_G, trace_G = meas.U_G.to(dtype), meas.trace_g.to(dtype)
        f64 = torch.float64
        # Host numbers enter as fills (a kernel argument), not copies: an H2D copy of a host
        # tensor would synchronize on CUDA.
        info = (
            information.to(device=device, dtype=f64)
            if isinstance(information, Tensor)
            else torch.full((), float(information), dtype=f64, device=device)
        )
        if prior_count is None:
            if forgetting >= 1.0:
                raise ValueError("prior_count is required when forgetting = 1")
            fresh_count = info / (1.0 - forgetting)
        else:
            fresh_count = torch.full((), float(prior_count), dtype=f64, device=device)
        prior = self._prior_state(trace_A, trace_G, groups, n_in, n_out, damping, observation_noise)
        if self.ready:
            assert self.P_A is not None and self.P_G is not None
            # A corrupted state cannot heal by updates (NaN stays NaN): restart from the prior.
            sane = _sane_mask(self.P_A) & _sane_mask(self.P_G)
            base = {
                k: (None if v is None else torch.where(_expand(sane, v), getattr(self, k), v))
                for k, v in prior.items()
            }
            prior_n = torch.where(sane, self.prior_count, fresh_count)
            count_n = torch.where(sane, self.count, fresh_count)
        else:
            sane = torch.ones((), dtype=torch.bool, device=device)
            base, prior_n, count_n = prior, fresh_count, fresh_count

        count = forgetting * count_n + info
        gain = info / count
        keep = 1.0 - gain
        prior_weight = (1.0 - forgetting) * prior_n / count
        gain_, keep_, prior_weight_ = (x.to(dtype) for x in (gain, keep, prior_weight))
        mean_A = keep_ * base["mean_A"] + gain_ * trace_A / n_in
        mean_G = None
        if not known:
            assert base["mean_G"] is not None and trace_G is not None
            mean_G = keep_ * base["mean_G"] + gain_ * trace_G / n_out
        prior_A, prior_G = self.floors(damping, observation_noise, mean_A, mean_G)
        total_A, total_G = self.floors(damping + gr_damping, observation_noise, mean_A, mean_G)
        inc_A = prior_weight_ * prior_A + gain_ * (total_A - prior_A)
        inc_G = None
        if prior_G is not None and total_G is not None:
            inc_G = prior_weight_ * prior_G + gain_ * (total_G - prior_G)

        sides: dict[str, Any] = {}
        readback = [sane, count, prior_n]
        for side, U, inc in (("A", U_A, inc_A), ("G", U_G, inc_G)):
            if U is None or inc is None:
                continue
            P, lo = predict(base[f"P_{side}"], keep_), base[f"lo_{side}"] * keep_
            # The relative floor is kept as a hard lower bound of λ_min(Λ̄).
            hard = relative_floor(U.shape[-2], dtype) * (mean_A if side == "A" else mean_G)
            floor = self._plan_floor(P, lo, torch.maximum(inc, hard - lo))
            sides[side] = {"U": U, **floor}
            readback += [*floor["active"], *floor["ratios"], floor["resets"]]
        return {"base": base, "mean_A": mean_A, "mean_G": mean_G, "gain": gain_, "sides": sides,
                "readback": readback}  # fmt: skip

    def commit(self, plan: dict[str, Any], values: list[float], floor_tol: float) -> Tensor:
        """The second half of :meth:`update`, given the host ``values`` of
        ``plan["readback"]``: applies the floor pieces, the measurement, and keeps the last good
        state where the result is not sane (decided on the device). Returns that flag; pass
        its host value to :meth:`finish`."""
        sane, count, prior_n, *rest = values
        if not sane:
            self.failures += 1
        plan["count_before"] = self.count if sane else prior_n
        self.count, self.prior_count = count, prior_n
        base = plan["base"]
        new: dict[str, Any] = {"mean_A": plan["mean_A"], "mean_G": plan["mean_G"]}
        if "G" not in plan["sides"]:
            new["P_G"], new["lo_G"] = base["P_G"], base["lo_G"]
        pieces = resets = 0
        offset = 0
        for side, floor in plan["sides"].items():
            active = rest[offset : offset + MAX_FLOOR_PIECES]
            ratios = rest[offset + MAX_FLOOR_PIECES : offset + 2 * MAX_FLOOR_PIECES]
            resets += round(rest[offset + 2 * MAX_FLOOR_PIECES])
            offset += 2 * MAX_FLOOR_PIECES + 1
            P = floor["P"]
            for piece, on, ratio in zip(floor["pieces"], active, ratios, strict=True):
                if not on:
                    break
                P = add_floor(P, piece, floor_terms(ratio, floor_tol))
                pieces += 1
            new[f"P_{side}"] = symmetrize(woodbury_update(P, floor["U"], 1.0 / plan["gain"]))
            new[f"lo_{side}"] = floor["lo"]
        ok = _sane_mask(new["P_A"]) & _sane_mask(new["P_G"])
        for key, value in new.items():
            old = base[key]
            kept = value if old is None else torch.where(_expand(ok, value), value, old)
            setattr(self, key, kept)
        # Booked as a success now; finish() undoes it if the flag turns out False.
        plan["counters"] = (pieces, resets)
        self.updates += 1
        self.floor_pieces += pieces
        self.floor_resets += resets
        return ok

    def finish(self, plan: dict[str, Any], ok: bool) -> bool:
        """Books the update once its result flag is known on the host: on failure, the
        counters and the count go back to before the update (:meth:`commit` kept the state)."""
        if not ok:
            self.updates -= 1
            self.floor_pieces -= plan["counters"][0]
            self.floor_resets -= plan["counters"][1]
            self.failures += 1
            self.count = plan["count_before"]
        return ok

    def _prior_state(
        self,
        trace_A: Tensor,
        trace_G: Tensor | None,
        groups: int,
        n_in: int,
        n_out: int,
        damping: float | Tensor,
        observation_noise: float | None,
    ) -> dict[str, Tensor | None]:
        """The prior: ``Λ̄_A,0 = δ_A I``, ``Λ̄_G,0 = δ_G I`` (floors of the first statistics);
        with ``N = N₀`` the prior precision on the weights is ``N₀ δ_A δ_G = N₀ λ``."""
        device = trace_A.device
        mean_A = trace_A / n_in
        mean_G = None if trace_G is None else trace_G / n_out
        delta_A, delta_G = self.floors(damping, observation_noise, mean_A, mean_G)
        delta_A = torch.maximum(delta_A, relative_floor(n_in, self.dtype) * mean_A)
        if delta_G is not None and mean_G is not None:
            delta_G = torch.maximum(delta_G, relative_floor(n_out, self.dtype) * mean_G)
        eye_A = torch.eye(n_in, dtype=self.dtype, device=device).expand(groups, n_in, n_in)
        eye_G = torch.eye(n_out, dtype=self.dtype, device=device).expand(groups, n_out, n_out)
        state: dict[str, Tensor | None] = {"mean_A": mean_A, "mean_G": mean_G}
        state["P_A"], state["lo_A"] = eye_A / delta_A[..., None, None], delta_A.clone()
        if observation_noise is not None:
            state["P_G"], state["lo_G"] = eye_G * float(observation_noise), None
        else:
            assert delta_G is not None
            state["P_G"], state["lo_G"] = eye_G / delta_G[..., None, None], delta_G.clone()
        return state

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


def _sane_mask(P: Tensor) -> Tensor:
    """Finite with a positive diagonal (0-dim bool on the device): necessary for SPD, O(n²),
    no decomposition."""
    return torch.isfinite(P).all() & (torch.diagonal(P, dim1=-2, dim2=-1) > 0).all()


def _expand(flag: Tensor, like: Tensor) -> Tensor:
    """A 0-dim flag viewed with as many dimensions as ``like`` (for ``torch.where``)."""
    return flag.reshape((1,) * like.dim())
