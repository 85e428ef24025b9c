"""The statistics stage of the template: the window's curvature statistics, absorbed into each
block's state, with the failures said once (non-finite statistics, hooks that never fired,
a layer unfrozen after attach)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.capture import CurvatureCapture, FisherType


class StatisticsStage(Optimizer):
    """The statistics half of :class:`~lightning_grng.GRNGOptimizer`; subclasses absorb one
    block's statistics in ``_update_block``."""

    # Provided by GRNGOptimizer; declared here for readers.
    _blocks: dict[str, KroneckerBlock]
    _gate: Any
    _sharding: Any
    _warned: set[str]
    _frozen_at_attach: dict[Tensor, str]
    fisher: FisherType
    fallback_description: str
    grng_step: int
    rejected_statistics: int

    # ------------------------------------------------------------------ statistics
    def _absorb_statistics(self, capture: CurvatureCapture, grads: Any) -> None:
        self._complete_partial_window(capture)
        if self._sharding is not None and self._blocks:
            self._reduce_statistics(capture)
        for key, block in self._blocks.items():
            if not self._owns(key):
                continue
            acc = capture.accumulators[key]
            if block.weight not in grads.of:
                continue  # its gradient was cleared (or never came): so are its statistics
            if not acc.complete:
                self._warn_silent_block(key, block, capture)
                continue
            accepted = self._update_block(key, block, acc, grads)
            if isinstance(accepted, Tensor):
                self._note(~accepted, self._rejection_counter(block))
            elif not accepted:
                self._reject_statistics(block)
        capture.reset()

    def _rejection_counter(self, block: KroneckerBlock) -> Callable[[float], None]:
        def count(rejected: float) -> None:
            if rejected:
                self._reject_statistics(block)

        return count

    def _complete_partial_window(self, capture: CurvatureCapture) -> None:
        """Rescales G of a window that ended after fewer backward passes than the loop divides
        each loss by (Lightning's last, partial accumulation window of an epoch).

        With a loss divided by ``d`` but only ``k < d`` passes, the output gradients are
        ``k/d`` times those of the mean loss over the samples seen; ``(d/k)²`` undoes it.
        """
        divisor = self._gate.micro_batches
        if divisor <= 1:
            return
        for acc in capture.accumulators.values():
            if 0 < acc.passes < divisor:
                acc.scale_output_grads((divisor / acc.passes) ** 2)

    def _reject_statistics(self, block: KroneckerBlock) -> None:
        """Non-finite statistics (overflow): dropped, counted, said once."""
        self.rejected_statistics += 1
        if self.rejected_statistics == 1:
            warnings.warn(
                f"{type(self).__name__}: the curvature statistics of module '{block.name}' at "
                f"step {self.grng_step} are not finite (overflow?) and were dropped; the last "
                "good curvature is kept. Further rejections are counted in "
                "diagnostics['rejected_statistics'] (logged as grng/rejected_statistics).",
                RuntimeWarning,
                stacklevel=4,
            )

    def _warn_silent_block(
        self, key: str, block: KroneckerBlock, capture: CurvatureCapture
    ) -> None:
        if self.fisher is FisherType.MC and key in capture.fired_forward:
            raise RuntimeError(
                f"{type(self).__name__}(fisher='mc') got no sampled-label backward for module "
                f"'{block.name}': call `optimizer.mc_fisher_backward(outputs)` after the forward "
                "pass and before `loss.backward()`, or use fisher='empirical'."
            )
        if f"silent:{key}" in self._warned:
            return
        self._warned.add(f"silent:{key}")
        if key in capture.eval_forward:
            warnings.warn(
                f"{type(self).__name__}: module '{block.name}' ran in eval mode during the "
                "training step (model.eval()?), and curvature statistics are taken in training "
                f"mode only; it gets the fallback update ({self.fallback_description}) until "
                "then. Call model.train() before the training forward.",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        warnings.warn(
            f"{type(self).__name__}: the curvature hooks of module '{block.name}' "
            f"({type(block.module).__name__}) never fired although its parameters have "
            "gradients; it is probably called through a functional path (e.g. "
            "F.linear(x, layer.weight) instead of layer(x)). It gets the fallback update "
            f"({self.fallback_description}) until statistics arrive; exclude it with "
            f"attach(..., skip_modules=['{block.name}']) to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _warn_unfrozen(self) -> None:
        """Names a layer that was frozen at attach and trains now (it has no block)."""
        for p, name in self._frozen_at_attach.items():
            if p.grad is None or f"unfrozen:{name}" in self._warned:
                continue
            self._warned.add(f"unfrozen:{name}")
            warnings.warn(
                f"{type(self).__name__}: module '{name}' was frozen when the curvature hooks "
                f"were attached and now has gradients, so it gets the fallback update "
                f"({self.fallback_description}); re-attach after unfreezing (handle.remove(), "
                "then attach(model, optimizer)) to give it a Kronecker block.",
                RuntimeWarning,
                stacklevel=3,
            )
