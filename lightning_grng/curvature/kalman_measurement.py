"""The measurement side of RKalman: a block's batch statistics as k measurement vectors.

:class:`KalmanAccumulator` turns the capture hooks' rows into a :class:`Measurement` (a sign
sketch or a row sample, :class:`MeasurementMethod`) with ``E[U Uᵀ] = S``, the statistic KFAC
would form densely; :mod:`lightning_grng.curvature.kalman` absorbs it into the filter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from lightning_grng.curvature.inverse import working_dtype


class MeasurementMethod(str, Enum):
    """How a factor's batch statistic ``S = XᵀX / R`` is turned into k measurement vectors."""

    SKETCH = "sketch"
    ROWS = "rows"


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

    def join(self, parts: list[Tensor]) -> Tensor:
        """One pass's vectors from several parts (passes or ranks): sketches are summed,
        sampled rows concatenated."""
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
        U_A = self.join(self.a_parts) / math.sqrt(rows)
        trace_A = self.a_trace / rows
        U_G = trace_G = None
        if self.need_g:
            assert self.g_trace is not None
            n = max(self.g_samples, 1)
            scale = float(n) if mean_reduction else 1.0 / n
            U_G = self.join(self.g_parts) * math.sqrt(scale)
            trace_G = self.g_trace * scale
        return Measurement(U_A, U_G, trace_A, trace_G, self.n_out, self.g_samples)
