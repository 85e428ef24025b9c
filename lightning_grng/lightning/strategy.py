"""Strategies that drive RENG's double backprop from ``Strategy.backward``.

``Strategy.backward`` is the one place that sees every backward of a LightningModule: automatic
optimization's closure and ``self.manual_backward(loss)`` alike, after the precision plugin has
scaled the loss. Overriding it lets an unmodified module train with RENG.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_grng.curvature.sdpa import math_only_sdpa
from lightning_grng.distributed.collectives import Sharding
from lightning_grng.optim.base import GRNGOptimizer
from lightning_grng.optim.reng import RENG


def double_backprop_optimizer(optimizer: Any, optimizers: list[Optimizer]) -> RENG | None:
    """The RENG optimizer this backward must regularize, if any.

    ``optimizer`` is None under manual optimization; then the single double-backprop RENG among
    the strategy's optimizers is used.
    """
    candidates = [optimizer] if optimizer is not None else list(optimizers)
    candidates = [getattr(o, "optimizer", o) for o in candidates]  # unwrap LightningOptimizer
    found = [o for o in candidates if isinstance(o, RENG) and o.needs_double_backward]
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
    """Replaces the precision plugin's backward by RENG's regularized backward when needed.
    (An unreadable checkpoint is named by ``GRNGCallback``, whatever the strategy.)"""

    def _regularized_backward(self, loss: Tensor, reng: RENG, loss_scale: float) -> None:
        reng.regularized_backward(loss, loss_scale)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """With a double-backprop RENG, attention anywhere in the step runs the math SDPA
        kernel, whose backward can be differentiated again (``curvature/sdpa.py``)."""
        if double_backprop_optimizer(None, self.optimizers) is None:  # type: ignore[attr-defined]
            return super().training_step(*args, **kwargs)  # type: ignore[misc]
        with math_only_sdpa():
            return super().training_step(*args, **kwargs)  # type: ignore[misc]

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


class GRNGDDPStrategy(RegularizedBackwardMixin, DDPStrategy):
    """DDP with sharded curvature: each Kronecker block has one owner rank.

    Every GRNG optimizer of the run gets a :class:`~lightning_grng.distributed.Sharding` at
    setup. At a curvature step the blocks' statistics are *reduced to their owner* (one
    ``reduce`` per owner rank, never all-reduced), the owner alone keeps the EMA / Kalman
    factors, inverts them and preconditions the block's DDP-averaged gradient, and one
    ``all_reduce`` of a flat buffer gives every rank every block's direction; KL-clip,
    momentum and weight decay then run identically everywhere. Factor memory per rank is about
    1/world of the single-process total. Checkpoints are consolidated on rank 0 (all blocks)
    and re-sharded on load, also onto another world size. ``docs/distributed.md`` has the
    design and the diagram.

    RENG's double backprop runs as a local ``autograd.grad(..., create_graph=True)`` followed by
    one ordinary backward that DDP synchronizes (DDP cannot ``backward(create_graph=True)``).
    The penalty is the *global* one, ``ρ/2‖∇ℓ‖²`` of the loss averaged over ranks: one extra
    all-reduce of gradient size per backward.

    Select it with ``Trainer(strategy=GRNGDDPStrategy())``, ``strategy="grng_ddp"`` (after
    importing lightning_grng) or ``trainer.strategy.class_path: lightning_grng.GRNGDDPStrategy``
    in YAML. Arguments are those of :class:`~lightning.pytorch.strategies.DDPStrategy`
    (extra keyword arguments go to ``DistributedDataParallel``). ``static_graph=True`` with
    gradient accumulation is rejected (torch issue #143580).
    """

    strategy_name = "grng_ddp"

    @override
    def setup_environment(self) -> None:
        self._check_static_graph()
        super().setup_environment()

    def _check_static_graph(self) -> None:
        if not self._ddp_kwargs.get("static_graph", False):
            return
        module = self.lightning_module
        trainer = None if module is None else module._trainer
        accumulate = 1 if trainer is None else trainer.accumulate_grad_batches
        if accumulate > 1:
            raise MisconfigurationException(
                f"GRNGDDPStrategy(static_graph=True) cannot be combined with "
                f"Trainer(accumulate_grad_batches={accumulate}): DDP's static graph fails under "
                "gradient accumulation (PyTorch issue #143580, also with plain SGD). Remove "
                "static_graph=True or set accumulate_grad_batches=1."
            )

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_static_graph()
        super().setup(trainer)
        for optimizer in self.optimizers:
            optimizer = getattr(optimizer, "optimizer", optimizer)
            if isinstance(optimizer, GRNGOptimizer):
                optimizer.use_sharding(Sharding(self.global_rank, self.world_size))

    @override
    def _regularized_backward(self, loss: Tensor, reng: RENG, loss_scale: float) -> None:
        # The penalty is the global one: one extra all-reduce of gradient size per backward.
        average = None
        if self.world_size > 1:
            average = Sharding(self.global_rank, self.world_size).all_reduce_mean
        reng.regularized_backward(loss, loss_scale, average)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="DDP with sharded GRNG curvature and RENG double backprop",
            )


GRNGDDPStrategy.register_strategies(StrategyRegistry)
