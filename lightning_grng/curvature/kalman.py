"""RKalman's filter: one block's Kronecker covariance factors and their update, never inverted.

:class:`KalmanFactors` holds the state and runs one filter update (predict, floor, measure,
guards) from the identities of :mod:`lightning_grng.curvature.kalman_identities`, in two halves
around the optimizer's single host read-back: :meth:`~KalmanFactors.prepare` returns a
:class:`FilterPlan` (a :class:`FloorPlan` per filtered factor) whose
:meth:`~FilterPlan.readback` tensors are read back with the step's flags, and
:meth:`~KalmanFactors.commit` applies it given those host values. The measurement
(:class:`Measurement`, :class:`KalmanAccumulator`) comes from
:mod:`lightning_grng.curvature.kalman_measurement`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_grng.curvature.inverse import symmetrize
from lightning_grng.curvature.kalman_identities import (
    add_floor,
    floor_terms,
    inf_norm,
    predict,
    relative_floor,
    woodbury_update,
)

# Re-exported: the optimizer and the collectives import the measurement types from here.
from lightning_grng.curvature.kalman_measurement import (
    KalmanAccumulator as KalmanAccumulator,
)
from lightning_grng.curvature.kalman_measurement import Measurement as Measurement
from lightning_grng.curvature.kalman_measurement import (
    MeasurementMethod as MeasurementMethod,
)

#: Largest ``c‖P‖`` one floor piece may have; larger increments are split into pieces.
MAX_FLOOR_RATIO = 0.5
#: Increments needing more than this many pieces (``c/lo > 1.5⁶ − 1 ≈ 10``) reset the factor.
MAX_FLOOR_PIECES = 6


# ---------------------------------------------------------------------------- plans
def _flatten(named: dict[str, list[Tensor]]) -> list[Tensor]:
    """The tensors of ``named``, name after name: the order :func:`_unflatten` reads."""
    return [tensor for tensors in named.values() for tensor in tensors]


def _unflatten(named: dict[str, list[Tensor]], values: Sequence[float]) -> dict[str, list[float]]:
    """``{name: host values}`` from ``values[i] = _flatten(named)[i]`` read back to the host.

    The only place that knows a read-back is a flat list: every name gets as many values as
    it has tensors, in :func:`_flatten`'s order, and no value may be left over or missing.
    """
    if len(values) != sum(len(tensors) for tensors in named.values()):
        raise ValueError(f"{len(values)} read-back values for fields {list(named)}")
    rest = iter(values)
    return {name: [next(rest) for _ in tensors] for name, tensors in named.items()}


@dataclass(frozen=True)
class FloorReadback:
    """The host values of one :class:`FloorPlan`: which pieces to add, their ``c_j/lo_j``."""

    active: list[bool]
    ratios: list[float]
    resets: int


@dataclass
class FloorPlan:
    """One factor's ``Λ̄ ← Λ̄ + cI`` split into pieces, and its measurement, until the commit.

    Attributes:
        P: the predicted covariance, already reset to ``I/(lo + c)`` in groups whose increment
            exceeds what :data:`MAX_FLOOR_PIECES` pieces can add.
        lo: the bound ``λ_min(Λ̄) >= lo`` once every piece is added.
        pieces: :data:`MAX_FLOOR_PIECES` per-group increments ``c_j`` with ``Σ_j c_j = c``.
        active: per piece, whether any group still adds a floor (0-dim bool, read back).
        ratios: per piece, ``max c_j/lo_j``, which sets its series length (0-dim, read back).
        resets: groups reset (0-dim, read back).
        U: the factor's measurement vectors ``(groups, n, k)``.
    """

    P: Tensor
    lo: Tensor
    pieces: list[Tensor]
    active: list[Tensor]
    ratios: list[Tensor]
    resets: Tensor
    U: Tensor

    def _fields(self) -> dict[str, list[Tensor]]:
        """The read-back tensors by name: ``decode`` reads the same names back."""
        return {"active": self.active, "ratios": self.ratios, "resets": [self.resets]}

    def readback(self) -> list[Tensor]:
        """The device values the commit needs on the host (decoded by :meth:`decode`)."""
        return _flatten(self._fields())

    def decode(self, values: Sequence[float]) -> FloorReadback:
        """The host values of :meth:`readback`, by field."""
        host = _unflatten(self._fields(), values)
        active = [bool(on) for on in host["active"]]
        return FloorReadback(active, host["ratios"], round(host["resets"][0]))

    def floored(self, host: FloorReadback, tol: float) -> tuple[Tensor, int]:
        """``(P⁻¹ + Σ_j c_j I)⁻¹`` over the active pieces by :func:`add_floor`, each to the
        relative accuracy ``tol``; returns it and the number of pieces added."""
        P, added = self.P, 0
        for piece, on, ratio in zip(self.pieces, host.active, host.ratios, strict=True):
            if not on:
                break
            P = add_floor(P, piece, floor_terms(ratio, tol))
            added += 1
        return P, added


@dataclass(frozen=True)
class FilterReadback:
    """The host values of one :class:`FilterPlan`."""

    sane: bool
    count: float
    prior_count: float
    floors: dict[str, FloorReadback]


@dataclass
class FilterPlan:
    """One block's filter update between :meth:`KalmanFactors.prepare` and its commit.

    Attributes:
        base: the state the update starts from, by :attr:`KalmanFactors.TENSORS` name (the
            stored state, or the prior where that is corrupted).
        mean_A, mean_G: the updated mean eigenvalues.
        gain: γ, the measurement's weight, in the factors' dtype.
        sides: the filtered factors' plans, ``"A"`` and (unless the noise is known) ``"G"``.
        sane: whether the stored state was sane (0-dim bool, read back).
        count, prior_count: the updated N and N₀ (0-dim float64, read back).
        count_before, floor_pieces, floor_resets: what :meth:`KalmanFactors.commit` booked,
            for :meth:`KalmanFactors.finish` to undo.
    """

    base: dict[str, Tensor | None]
    mean_A: Tensor  # noqa: N815 (named as the state attribute it becomes)
    mean_G: Tensor | None  # noqa: N815
    gain: Tensor
    sides: dict[str, FloorPlan]
    sane: Tensor
    count: Tensor
    prior_count: Tensor
    count_before: float = 0.0
    floor_pieces: int = 0
    floor_resets: int = 0

    def _fields(self) -> dict[str, list[Tensor]]:
        """The read-back tensors by name, each factor's under its side (``"A"``, ``"G"``)."""
        own = {"sane": [self.sane], "count": [self.count], "prior_count": [self.prior_count]}
        return own | {side: floor.readback() for side, floor in self.sides.items()}

    def readback(self) -> list[Tensor]:
        """The device values :meth:`KalmanFactors.commit` needs on the host, to be read back
        with the step's flags and passed to it in this order."""
        return _flatten(self._fields())

    def decode(self, values: Sequence[float]) -> FilterReadback:
        """The host values of :meth:`readback`, by field."""
        host = _unflatten(self._fields(), values)
        floors = {side: floor.decode(host[side]) for side, floor in self.sides.items()}
        return FilterReadback(
            bool(host["sane"][0]), host["count"][0], host["prior_count"][0], floors
        )


def _plan_floor(P: Tensor, lo: Tensor, c: Tensor, U: Tensor) -> FloorPlan:
    """The device half of ``Λ̄ ← Λ̄ + cI`` given ``‖P‖ <= 1/lo`` (:meth:`FloorPlan.floored`
    is the host half); ``U``, the factor's measurement, rides along to the commit.

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
    return FloorPlan(P, lo, pieces, active, ratios, reset.sum(), U)


# ---------------------------------------------------------------------------- filter state
class KalmanFactors:
    """The filter state of one block: per-unit covariance factors and the information count.

    The block's posterior precision is ``Λ = N · Λ̄_A ⊗ Λ̄_G`` (column-major vec of the
    ``(n_out, n_in)`` weight matrix), stored as ``P_A = Λ̄_A⁻¹`` ``(groups, n_in, n_in)``,
    ``P_G = Λ̄_G⁻¹`` ``(groups, n_out, n_out)`` and the count ``N``; the covariance is
    ``P_A ⊗ P_G / N``. One update (:meth:`prepare`, :meth:`commit`) with information c,
    gain ``γ = c/N'`` (``N' = εN + c``) and prior weight ``β = (1−ε)·N₀/N'`` realizes, for each
    factor,

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

    # ------------------------------------------------------------------ the update
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
    ) -> FilterPlan:
        """The device half of one filter update: predict, floors to add and their piece plan,
        the corrupted-state restart (decided by mask). No host read-back; the host values it
        needs are the tensors of :meth:`FilterPlan.readback`, to be passed to :meth:`commit`."""
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

        sides: dict[str, FloorPlan] = {}
        for side, U, inc in (("A", U_A, inc_A), ("G", U_G, inc_G)):
            if U is None or inc is None:
                continue
            P, lo = predict(base[f"P_{side}"], keep_), base[f"lo_{side}"] * keep_
            # The relative floor is kept as a hard lower bound of λ_min(Λ̄).
            hard = relative_floor(U.shape[-2], dtype) * (mean_A if side == "A" else mean_G)
            sides[side] = _plan_floor(P, lo, torch.maximum(inc, hard - lo), U)
        return FilterPlan(base, mean_A, mean_G, gain_, sides, sane, count, prior_n)

    def commit(self, plan: FilterPlan, values: Sequence[float], floor_tol: float) -> Tensor:
        """The second half of the update, given the host ``values`` of
        :meth:`FilterPlan.readback`: applies the floor pieces, the measurement, and keeps the last
        good state where the result is not sane (decided on the device). Returns that flag; pass
        its host value to :meth:`finish`."""
        host = plan.decode(values)
        if not host.sane:
            self.failures += 1
        plan.count_before = self.count if host.sane else host.prior_count
        self.count, self.prior_count = host.count, host.prior_count
        base = plan.base
        new: dict[str, Tensor | None] = {"mean_A": plan.mean_A, "mean_G": plan.mean_G}
        if "G" not in plan.sides:
            new["P_G"], new["lo_G"] = base["P_G"], base["lo_G"]
        pieces = resets = 0
        for side, floor in plan.sides.items():
            P, added = floor.floored(host.floors[side], floor_tol)
            pieces += added
            resets += host.floors[side].resets
            new[f"P_{side}"] = symmetrize(woodbury_update(P, floor.U, 1.0 / plan.gain))
            new[f"lo_{side}"] = floor.lo
        ok = _sane_mask(new["P_A"]) & _sane_mask(new["P_G"])
        for key, value in new.items():
            old = base[key]
            kept = value if old is None else torch.where(_expand(ok, value), value, old)
            setattr(self, key, kept)
        # Booked as a success now; finish() undoes it if the flag turns out False.
        plan.floor_pieces, plan.floor_resets = pieces, resets
        self.updates += 1
        self.floor_pieces += pieces
        self.floor_resets += resets
        return ok

    def finish(self, plan: FilterPlan, ok: bool) -> bool:
        """Books the update once its result flag is known on the host: on failure, the
        counters and the count go back to before the update (:meth:`commit` kept the state)."""
        if not ok:
            self.updates -= 1
            self.floor_pieces -= plan.floor_pieces
            self.floor_resets -= plan.floor_resets
            self.failures += 1
            self.count = plan.count_before
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
