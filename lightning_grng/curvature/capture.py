"""Hooks that turn the training forward/backward into Kronecker factor statistics.

Capture follows three rules:

* **Gated.** Statistics are taken only while the owning optimizer wants them (a curvature step),
  the module is in training mode and autograd is recording. The optimizer closes the gate
  (:meth:`CaptureGate.paused`) around its own extra passes (RENG's double backward or its
  finite-difference re-evaluation), so they never leak into G.
* **First backward wins.** Each forward call installs a tensor hook on its output that records the
  output gradient of the *first* backward pass through it only; a second, double-backward pass
  through the same graph is ignored even if the gate is open.
* **Averaged at the step boundary.** Several forwards/backwards before one optimizer step
  (gradient accumulation) add up; :meth:`FactorAccumulator.averaged` turns the sums into the
  batch factors (see ``docs/algorithms.md`` for the scale convention).

The output hook is a tensor hook rather than a module backward hook: it is safe with in-place
activations and is not confused by ``create_graph=True``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.inverse import working_dtype


class LossReduction(str, Enum):
    MEAN = "mean"
    SUM = "sum"


class FisherType(str, Enum):
    EMPIRICAL = "empirical"
    MC = "mc"


class CaptureGate:
    """Decides whether a pass feeds the statistics.

    Attributes:
        wanted: set by the optimizer: the next step refreshes the curvature.
        fisher: where G comes from: the loss's own backward (empirical) or a separate pass with
            labels sampled from the model (:meth:`mc_pass`).
        grad_scaler: an AMP ``GradScaler`` whose scale the backward's gradients carry; the
            captured output gradients are divided by it (its scale changes only at
            ``update()``, after the step, so the current scale is the one the backward used).
    """

    def __init__(self, fisher: FisherType = FisherType.EMPIRICAL) -> None:
        self.wanted = True
        self.fisher = fisher
        self.grad_scaler: Any = None
        self._paused = 0
        self._in_mc_pass = False

    def unscale(self, grad: Tensor) -> Tensor:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return grad
        return grad / scaler.get_scale()

    @property
    def forward_open(self) -> bool:
        return self.wanted and self._paused == 0 and torch.is_grad_enabled()

    @property
    def backward_open(self) -> bool:
        if not self.wanted or self._paused:
            return False
        return self._in_mc_pass if self.fisher is FisherType.MC else not self._in_mc_pass

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No statistics inside: used around the optimizer's own extra passes."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextmanager
    def mc_pass(self) -> Iterator[None]:
        """Marks the backward of a sampled-label loss (Monte-Carlo Fisher)."""
        self._in_mc_pass = True
        try:
            yield
        finally:
            self._in_mc_pass = False


class FactorAccumulator:
    """Sums ``ā āᵀ`` and ``δ δᵀ`` over the passes of one optimizer step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.a_sum: Tensor | None = None
        self.a_rows = 0
        self.g_sum: Tensor | None = None
        self.g_samples = 0

    @property
    def complete(self) -> bool:
        return self.a_sum is not None and self.g_sum is not None

    @staticmethod
    def _gram(rows: Tensor) -> Tensor:
        rows = rows.to(working_dtype(rows.dtype))
        return rows.transpose(-1, -2) @ rows

    def add_input(self, rows: Tensor, batch_size: int) -> None:
        gram = self._gram(rows)
        self.a_sum = gram if self.a_sum is None else self.a_sum + gram
        self.a_rows += rows.shape[-2]

    def add_output_grad(self, rows: Tensor, batch_size: int) -> None:
        gram = self._gram(rows)
        self.g_sum = gram if self.g_sum is None else self.g_sum + gram
        self.g_samples += batch_size

    def averaged(self, reduction: LossReduction) -> tuple[Tensor, Tensor]:
        """Batch factors ``(A, G)``.

        ``A`` is the mean of ``ā āᵀ`` over all rows. The captured output gradients of a
        mean-reduced loss carry a factor ``1/N`` (N samples, all micro-batches together), so
        ``G = N · Σ δ δᵀ`` is the per-sample Fisher factor (positions of a conv or sequence
        summed, as in KFC); for a sum-reduced loss ``G = Σ δ δᵀ`` is the Fisher of the sum.
        """
        assert self.a_sum is not None and self.g_sum is not None
        A = self.a_sum / max(self.a_rows, 1)
        G = self.g_sum * self.g_samples if reduction is LossReduction.MEAN else self.g_sum
        return A, G


class CurvatureCapture:
    """Forward and output-gradient hooks on the blocks of one optimizer.

    Args:
        blocks: the blocks to observe, keyed by the optimizer's block key.
        accumulators: one statistics sink per block (same keys); anything with ``add_input`` and
            ``add_output_grad`` methods.
        gate: the gate shared with the optimizer.
    """

    def __init__(
        self,
        blocks: dict[str, KroneckerBlock],
        accumulators: dict[str, Any],
        gate: CaptureGate,
    ) -> None:
        self.blocks = blocks
        self.accumulators = accumulators
        self.gate = gate
        self.fired_forward: set[str] = set()
        self.fired_backward: set[str] = set()
        self._handles: list[RemovableHandle] = []

    def register(self) -> None:
        for key, block in self.blocks.items():
            self._handles.append(
                block.module.register_forward_hook(self._forward_hook(key), with_kwargs=True)
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def registered(self) -> bool:
        return bool(self._handles)

    def reset(self) -> None:
        """Drops the statistics gathered since the last step."""
        for acc in self.accumulators.values():
            acc.reset()
        self.fired_forward.clear()
        self.fired_backward.clear()

    def _forward_hook(self, key: str):
        block = self.blocks[key]
        acc = self.accumulators[key]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            if not (self.gate.forward_open and module.training):
                return
            x = args[0] if args else kwargs["input"]
            batch = block.batch_size(x)
            acc.add_input(block.input_rows(x.detach()), batch)
            self.fired_forward.add(key)
            if isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(self._output_hook(key, batch))

        return hook

    def _output_hook(self, key: str, batch: int):
        block = self.blocks[key]
        acc = self.accumulators[key]
        seen = False

        def hook(grad: Tensor) -> None:
            nonlocal seen
            if seen or not self.gate.backward_open:
                return
            seen = True
            rows = block.output_grad_rows(self.gate.unscale(grad.detach()))
            acc.add_output_grad(rows, batch)
            self.fired_backward.add(key)

        return hook
