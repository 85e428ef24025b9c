"""Strategies that drive RENG's double backprop from ``Strategy.backward``.

``Strategy.backward`` is the one place that sees every backward of a LightningModule: automatic
optimization's closure and ``self.manual_backward(loss)`` alike, after the precision plugin has
scaled the loss. Overriding it lets an unmodified module train with RENG.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_grng.optim.reng import RENG, GRMode, gradient_penalty


def double_backprop_optimizer(optimizer: Any, optimizers: list[Optimizer]) -> RENG | None:
    """The RENG optimizer this backward must regularize, if any.

    ``optimizer`` is None under manual optimization; then the single double-backprop RENG among
    the strategy's optimizers is used.
    """
    candidates = [optimizer] if optimizer is not None else list(optimizers)
    candidates = [getattr(o, "optimizer", o) for o in candidates]  # unwrap LightningOptimizer
    found = [
        o
        for o in candidates
        if isinstance(o, RENG) and o.gr_mode is GRMode.DOUBLE_BACKPROP and o.regularizes
    ]
    if len(found) > 1:
        raise RuntimeError(
            "manual_backward() with several double-backprop RENG optimizers is ambiguous: call "
            "lightning_grng.regularized_backward(loss, optimizer) for the one you mean."
        )
    return found[0] if found else None


def loss_scale_of(strategy: Any) -> float:
    """Factor between the loss given to backward and the per-batch loss: 1/N under gradient
    accumulation over N micro-batches (automatic optimization), times an AMP scaler's scale."""
    module = strategy.lightning_module
    scale = 1.0
    if module is not None and module.automatic_optimization and module._trainer is not None:
        scale /= module.trainer.accumulate_grad_batches
    scaler = getattr(strategy.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        scale *= float(scaler.get_scale())
    return scale


class RegularizedBackwardMixin:
    """Replaces the precision plugin's backward by RENG's regularized backward when needed,
    and names the file when a checkpoint cannot be read."""

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise RuntimeError(
                f"Cannot read the checkpoint {checkpoint_path}: it is corrupted or truncated "
                f"({error})"
            ) from error

    def _regularized_backward(self, loss: Tensor, reng: RENG, loss_scale: float) -> None:
        penalty = gradient_penalty(loss, reng, loss_scale)
        with reng._gate.paused():
            (loss if penalty is None else loss + penalty).backward()
        reng._grads_regularized = True

    @override
    def backward(  # type: ignore[override]
        self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any
    ) -> Tensor:
        reng = double_backprop_optimizer(optimizer, self.optimizers)  # type: ignore[attr-defined]
        if reng is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        self.pre_backward(closure_loss)  # type: ignore[attr-defined]
        module = self.lightning_module  # type: ignore[attr-defined]
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)  # type: ignore[attr-defined]
        self._regularized_backward(closure_loss, reng, loss_scale_of(self))
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)  # type: ignore[attr-defined]
        self.post_backward(closure_loss)  # type: ignore[attr-defined]
        return closure_loss


class GRNGStrategy(RegularizedBackwardMixin, SingleDeviceStrategy):
    """Single-device strategy that gives RENG its double backprop for unmodified modules.

    Any other optimizer trains exactly as with ``SingleDeviceStrategy``. Select it with
    ``Trainer(strategy=GRNGStrategy())``, ``strategy="grng"`` (after importing lightning_grng),
    or in YAML ``trainer.strategy.class_path: lightning_grng.GRNGStrategy``.

    Args:
        device: the device to train on; None picks ``cuda:0`` when CUDA is available, else CPU.
    """

    strategy_name = "grng"

    def __init__(self, device: str | torch.device | None = None, **kwargs: Any) -> None:
        if device is None:
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        super().__init__(device=device, **kwargs)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name, cls, description="Single device with RENG double backprop"
            )


GRNGStrategy.register_strategies(StrategyRegistry)
