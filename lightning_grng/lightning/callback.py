"""``GRNGCallback``: attaches the curvature hooks of every GRNG optimizer of a Trainer."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BatchSizeFinder, Callback, LearningRateFinder
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_grng.attach import CurvatureHandle, attach
from lightning_grng.lightning.checkpoint_io import NamedErrorsCheckpointIO
from lightning_grng.lightning.strategy import (
    RegularizedBackwardMixin,
    double_backprop_optimizer,
    loss_scale_of,
)
from lightning_grng.optim.base import GRNGOptimizer

#: Callbacks that run training steps from their own ``on_fit_start``.
_TUNERS = (LearningRateFinder, BatchSizeFinder)
#: Strategies that shard the parameters and gradients or hand the optimizer flattened copies.
_SHARDING = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


class GRNGCallback(Callback):
    """Registers the Fisher/Kalman hooks at fit start and removes them at teardown.

    It finds every lightning_grng optimizer in ``trainer.optimizers``, maps its parameters to the
    LightningModule's layers and attaches the hooks; it is inert when no such optimizer is
    configured. Installing lightning-grng registers it through Lightning's
    ``lightning.pytorch.callbacks_factory`` entry point, so it need not be added by hand; adding
    it as well is harmless (only the first instance acts). It keeps no checkpoint state: the
    curvature state lives in the optimizers' ``state_dict``.

    The hooks are attached at fit start. The tuner callbacks (``LearningRateFinder``, also
    behind ``Tuner.lr_find``, and ``BatchSizeFinder``) run training steps from their own
    ``on_fit_start`` with only their own callback in place, so at ``setup`` the callback moves
    itself ahead of them. Under automatic optimization the callback tells the optimizers
    ``accumulate_grad_batches``, so the last, partial accumulation window of an epoch gets the
    G of the batches it saw. A checkpoint that cannot be read is named in one sentence (the
    strategy's ``CheckpointIO`` is wrapped from ``setup`` to ``teardown``).

    When a double-backprop RENG trains under a strategy that does not drive it (anything but
    :class:`GRNGStrategy` / ``GRNGDDPStrategy``), the callback forms the regularization term in
    ``on_before_backward`` with one extra local backward and says so once.

    Args:
        log_diagnostics: log ``grng/loss`` (the training-step loss), ``grng/grad_norm``,
            ``grng/damping``, ``grng/kl_scale``, ``grng/skipped_steps`` and
            ``grng/rejected_statistics`` through the Trainer's loggers after each optimizer step.
    """

    def __init__(self, log_diagnostics: bool = True) -> None:
        self.log_diagnostics = log_diagnostics
        self._handles: list[CurvatureHandle] = []
        self._active = False
        self._announced_fallback = False
        self._logged_step: dict[int, int] = {}

    @staticmethod
    def grng_optimizers(trainer: pl.Trainer) -> list[GRNGOptimizer]:
        return [
            o
            for o in (getattr(o, "optimizer", o) for o in trainer.optimizers)
            if isinstance(o, GRNGOptimizer)
        ]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, NamedErrorsCheckpointIO):
            trainer.strategy.checkpoint_io = NamedErrorsCheckpointIO(io)
        self._run_before_tuners(trainer)

    @staticmethod
    def _run_before_tuners(trainer: pl.Trainer) -> None:
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        tuners = [i for i, cb in enumerate(callbacks) if isinstance(cb, _TUNERS)]
        ours = [i for i, cb in enumerate(callbacks) if isinstance(cb, GRNGCallback)]
        if not tuners or ours[0] < tuners[0]:
            return
        rest = [cb for cb in callbacks if not isinstance(cb, GRNGCallback)]
        mine = [callbacks[i] for i in ours]
        trainer.callbacks = rest[: tuners[0]] + mine + rest[tuners[0] :]  # type: ignore[attr-defined]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        first = next(cb for cb in trainer.callbacks if isinstance(cb, GRNGCallback))  # type: ignore[attr-defined]
        self._active = first is self
        if not self._active:
            return
        self._refuse_sharding(trainer)
        # fp16 AMP: the precision plugin's GradScaler scales the loss the hooks see.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Lightning divides each micro-batch's loss by accumulate_grad_batches (automatic
        # optimization only), also in an epoch's last, partial window.
        micro_batches = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        self._check_tuners_can_regularize(trainer)
        for optimizer in self.grng_optimizers(trainer):
            optimizer.micro_batches = micro_batches
            if any(h.optimizer is optimizer for h in self._handles):
                continue
            handle = attach(pl_module, optimizer, grad_scaler=scaler, report=trainer.is_global_zero)
            self._handles.append(handle)

    @staticmethod
    def _refuse_sharding(trainer: pl.Trainer) -> None:
        """FSDP, DeepSpeed and ModelParallel split each weight and its gradient across processes
        (or give the optimizer flattened copies), so no Kronecker block would see a layer whole:
        refused before the first step rather than trained wrong."""
        if not isinstance(trainer.strategy, _SHARDING):
            return
        found = []
        for optimizer in trainer.optimizers:
            seen: set[int] = set()  # DeepSpeed nests the client optimizer in its own
            while not isinstance(optimizer, GRNGOptimizer) and id(optimizer) not in seen:
                seen.add(id(optimizer))
                optimizer = getattr(optimizer, "optimizer", optimizer)
            if isinstance(optimizer, GRNGOptimizer):
                found.append(type(optimizer).__name__)
        if found:
            raise MisconfigurationException(
                f"{' and '.join(found)} cannot train under {type(trainer.strategy).__name__}, "
                "which splits every weight and gradient across processes, so no Kronecker block "
                "would see a whole layer: use strategy=lightning_grng.GRNGDDPStrategy() for "
                "several processes (GRNGStrategy, or the default strategy, on one device)."
            )

    def _check_tuners_can_regularize(self, trainer: pl.Trainer) -> None:
        """A tuner's steps run without callbacks, so this callback cannot add RENG's
        regularization term there; only a strategy that drives it can."""
        if isinstance(trainer.strategy, RegularizedBackwardMixin):
            return
        tuners = [cb for cb in trainer.callbacks if isinstance(cb, _TUNERS)]  # type: ignore[attr-defined]
        if tuners and double_backprop_optimizer(None, self.grng_optimizers(trainer)) is not None:
            raise MisconfigurationException(
                f"{type(tuners[0]).__name__} runs its training steps without callbacks, so "
                "GRNGCallback cannot add RENG's gradient-regularization term there: use "
                "Trainer(strategy=lightning_grng.GRNGStrategy()) (or GRNGDDPStrategy), or "
                "RENG(gr_mode='finite_difference')."
            )

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if not self._active or isinstance(trainer.strategy, RegularizedBackwardMixin):
            return
        reng = double_backprop_optimizer(None, self.grng_optimizers(trainer))
        if reng is None:
            return
        if not self._announced_fallback:
            self._announced_fallback = True
            rank_zero_info(
                f"lightning_grng: strategy {type(trainer.strategy).__name__} does not drive "
                "RENG's double backprop, so GRNGCallback adds the gradient-regularization term "
                "with one extra local backward per step; use strategy=GRNGStrategy() (or "
                "GRNGDDPStrategy) to avoid it."
            )
        # The penalty's gradient ρ·Hg is accumulated now; Lightning's own backward adds g.
        reng.regularized_backward(loss, loss_scale_of(trainer.strategy), include_loss=False)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if not (self._active and self.log_diagnostics):
            return
        optimizers = [h.optimizer for h in self._handles]
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        for i, opt in enumerate(optimizers):
            if self._logged_step.get(id(opt)) == opt.grng_step or not opt.diagnostics:
                continue  # no optimizer step since the last log (gradient accumulation)
            self._logged_step[id(opt)] = opt.grng_step
            prefix = "grng/" if len(optimizers) == 1 else f"grng/{i}/"
            values = {prefix + k: float(v) for k, v in opt.diagnostics.items()}
            if isinstance(loss, Tensor):  # the training loss even if the module logs nothing
                values["grng/loss"] = float(loss.detach())
            pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.optimizer.micro_batches = 1
            handle.remove()
        self._handles.clear()
        self._logged_step.clear()
        io = trainer.strategy.checkpoint_io
        if isinstance(io, NamedErrorsCheckpointIO):
            trainer.strategy.checkpoint_io = io.inner


def callbacks_factory() -> list[Callback]:
    """Entry point ``lightning.pytorch.callbacks_factory``: one GRNGCallback per Trainer."""
    return [GRNGCallback()]
