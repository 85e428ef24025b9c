"""The update template shared by every GRNG optimizer.

One step reads as a short chain of stages::

    gradients (RENG: regularized)           _gradients
    → curvature statistics                  _absorb_statistics → _update_block, per block
    → device half of the curvature work     _prepare   (refresh on schedule; notes host values)
    → the step's ONE host read-back         _settle    (skip on a non-finite gradient)
    → host half of the curvature work       _commit    (RKalman's filter update)
    → precondition per block                _precondition_block (fallback: Adam)
    → KL-clip → momentum → decoupled weight decay → lr

Subclasses differ only where the math differs. Checkpoints live in ``optim/checkpoint.py``,
the read-back ledger and the damping boost in ``optim/readback.py``, the damping rule in
``optim/damping.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.capture import (
    CaptureGate,
    CurvatureCapture,
    FisherType,
    LossReduction,
)
from lightning_grng.numerics import all_finite, squared_norm
from lightning_grng.optim.attachment import AttachmentMixin
from lightning_grng.optim.checkpoint import CheckpointMixin
from lightning_grng.optim.fallback import FallbackMode, describe
from lightning_grng.optim.lazy_rows import RowUpdate
from lightning_grng.optim.mc_fisher import sampled_label_loss
from lightning_grng.optim.readback import DampingBoost, ReadBack
from lightning_grng.optim.statistics import StatisticsStage
from lightning_grng.optim.update import (
    KLBindCounter,
    apply_directions,
    apply_fallback,
    device_total,
    kl_clip_scale,
)
from lightning_grng.optim.validation import check_choice, check_int, check_range

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
#: One block of the precondition stage: ``(key, block, gradient matrix, param group)``.
BlockItem = tuple[str, KroneckerBlock, Tensor, dict[str, Any]]

#: Per-group hyperparameters and their allowed ranges ``(low, high, low_open, high_open)``;
#: checked in ``__init__`` and for every param group (also ``add_param_group``).
GROUP_RANGES: dict[str, tuple[float, float | None, bool, bool]] = {
    "lr": (0.0, None, False, False),
    "momentum": (0.0, 1.0, False, True),
    "weight_decay": (0.0, None, False, False),
    "damping": (0.0, None, True, False),
}
#: The gradient-regularization strength of RING, RENG and RKalman.
RHO_RANGE = {"rho": (0.0, None, False, False)}


@dataclass
class StepGradients:
    """This step's gradients (parameter -> the gradient the step preconditions) and their
    squared norm ‖g‖² (float64, on the device); handed to every stage that needs them."""

    of: dict[Tensor, Tensor]
    sq: Tensor
    #: Block -> its gradient matrix, built once per step (statistics, touched rows and the
    #: precondition stage all read it).
    _matrices: dict[KroneckerBlock, Tensor] = field(default_factory=dict)

    @classmethod
    def of_params(cls, grads: dict[Tensor, Tensor]) -> StepGradients:
        return cls(grads, device_total(squared_norm(g) for g in grads.values()))

    def matrix(self, block: KroneckerBlock) -> Tensor:
        """The block's gradient as its ``(groups, n_out, n_in)`` matrix (every parameter of
        the block must have a gradient)."""
        V = self._matrices.get(block)
        if V is None:
            V = self._matrices[block] = block.to_matrix(*[self.of[p] for p in block.params()])
        return V

    def block_sq(self, block: KroneckerBlock) -> Tensor:
        """``‖g_b‖²`` of one block's parameters (0-dim, no host sync)."""
        grads = [self.of[p] for p in block.params() if p in self.of]
        return torch.stack([squared_norm(g) for g in grads]).sum()


class GRNGOptimizer(AttachmentMixin, StatisticsStage, CheckpointMixin):
    """Base class: the update template, the hooks' attachment, failure handling.

    Not used directly; see :class:`~lightning_grng.KFAC`, :class:`~lightning_grng.RING`,
    :class:`~lightning_grng.RENG` and :class:`~lightning_grng.RKalman`.

    Curvature statistics accumulate exactly like gradients (``curvature/capture.py``):
    :meth:`zero_grad` clears them with the gradients, and only backward passes that reach the
    parameters' ``.grad`` count.
    """

    #: Per-group hyperparameters this optimizer checks (subclasses add ``rho``).
    group_ranges: ClassVar[dict[str, tuple[float, float | None, bool, bool]]] = GROUP_RANGES
    #: Momentum style of the update (the eigen route's is an EMA; see ``optim/routes.py``).
    momentum_ema = False

    def _configure(self, params: ParamsT, hp: dict[str, Any]) -> None:
        """Checks and stores the arguments every GRNG optimizer takes (subclasses take theirs
        out of ``hp`` first), then builds the param groups."""
        name = type(self).__name__
        defaults = {k: self._check_group_value(k, hp.pop(k)) for k in GROUP_RANGES}
        self.curvature_every = check_int(name, "curvature_every", hp.pop("curvature_every"))
        kl_clip = hp.pop("kl_clip")
        if kl_clip is not None:
            kl_clip = check_range(name, "kl_clip", kl_clip, 0.0, low_open=True)
        self.kl_clip = kl_clip
        self.fisher = check_choice(name, "fisher", hp.pop("fisher"), FisherType)
        self.loss_reduction = check_choice(
            name, "loss_reduction", hp.pop("loss_reduction"), LossReduction
        )
        self.fallback = check_choice(name, "fallback", hp.pop("fallback"), FallbackMode)
        self.fallback_lr = check_range(
            name, "fallback_lr", hp.pop("fallback_lr"), 0.0, low_open=True
        )
        if hp:
            raise TypeError(f"{name}: arguments {sorted(hp)} are not handled")
        super().__init__(params, defaults)

        self._gate = CaptureGate(self.fisher)
        self._capture: CurvatureCapture | None = None
        self._blocks: dict[str, KroneckerBlock] = {}
        self._model: nn.Module | None = None
        self._handles: list[Any] = []
        self._model_hooks: list[Any] = []  # hooks on the model besides the capture
        #: Parameters of supported layers that were frozen at attach -> module name.
        self._frozen_at_attach: dict[Tensor, str] = {}
        self._warned: set[str] = set()  # what was said once (silent blocks, unfrozen layers)
        #: Which rank owns which block under DDP (:class:`~lightning_grng.distributed.Sharding`,
        #: set by :meth:`use_sharding`); None in a single process.
        self._sharding: Any = None
        self._pending_state: Any = None
        self._consolidated: dict[str, Any] | None = None
        self.grng_step = 0
        self.skipped_steps = 0
        #: Block statistics refused because they were not finite (e.g. overflow), all steps.
        self.rejected_statistics = 0
        self._boost = DampingBoost()
        self._readback = ReadBack()
        self.diagnostics = {}
        #: Module name -> the damping of its block this step, in its route's units.
        self._damping_ratios: dict[str, Tensor] = {}
        self._kl_binding = KLBindCounter()

    # ------------------------------------------------------------------ hyperparameters
    @property
    def damping_boost(self) -> float:
        """The failure boost of the damping: doubled by each failure, halved by each good
        step (``optim/readback.py``)."""
        return self._boost.value

    @damping_boost.setter
    def damping_boost(self, value: float) -> None:
        self._boost.value = value

    @property
    def diagnostics(self) -> dict[str, float]:
        """Values of the last step, for loggers: grad_norm, damping (in the units of the
        active route), kl_scale, skipped_steps, rejected_statistics, damping_ratio/<module>.
        Values the step left on the device are read back here (outside ``step()``), once."""
        values = self._diagnostics
        keys = [k for k, v in values.items() if isinstance(v, Tensor)]
        if keys:
            stacked = torch.stack([values[k].detach().to(torch.float64).reshape(()) for k in keys])
            for k, v in zip(keys, stacked.cpu().tolist(), strict=True):
                values[k] = float(v)
        return values  # type: ignore[return-value]

    @diagnostics.setter
    def diagnostics(self, values: dict[str, float | Tensor]) -> None:
        self._diagnostics = dict(values)

    def _add_group_default(self, key: str, value: Any) -> None:
        """A per-group hyperparameter of a subclass (e.g. ``rho``); explicit group values win."""
        self.defaults[key] = value
        for group in self.param_groups:
            group.setdefault(key, value)

    def _check_group_value(self, key: str, value: Any) -> float:
        low, high, low_open, high_open = self.group_ranges[key]
        return check_range(type(self).__name__, key, value, low, high, low_open, high_open)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group; its hyperparameters are checked like the constructor's."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for key in self.group_ranges:
                if key in group:
                    group[key] = self._check_group_value(key, group[key])
        except ValueError:
            self.param_groups.pop()
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients and, with them, the curvature statistics of the window."""
        super().zero_grad(set_to_none)
        # The optimizer's own re-evaluations (RENG's finite-difference closure) zero the
        # gradients inside step(); the statistics of the step must survive them.
        if self._capture is not None and not self._gate.paused_now:
            self._capture.reset()

    def __getstate__(self) -> dict[str, Any]:
        name = type(self).__name__
        raise TypeError(
            f"{name} cannot be copied or pickled (it is bound to its model's hooks): save "
            f"optimizer.state_dict(), which holds all curvature state, and load it into a new "
            f"{name} with load_state_dict()."
        )

    def flat_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def fallback_description(self) -> str:
        """How the fallback update is named in messages."""
        return describe(self.fallback)

    @property
    def micro_batches(self) -> int:
        """How many backward passes the training loop divides each loss by (gradient
        accumulation); the last, partial window of an epoch is completed accordingly."""
        return self._gate.micro_batches

    @micro_batches.setter
    def micro_batches(self, value: int) -> None:
        self._gate.micro_batches = int(value)

    # ------------------------------------------------------------------ the template
    def _curvature_due(self) -> bool:
        return self.grng_step % self.curvature_every == 0

    def _gradients(self, closure: Callable[[], Any] | None) -> tuple[Any, dict[Tensor, Tensor]]:
        """``(loss, parameter -> gradient)``: evaluates the closure, reads ``.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        return loss, {p: p.grad.detach() for p in self.flat_params() if p.grad is not None}

    def _update_block(
        self, key: str, block: KroneckerBlock, accumulator: Any, grads: StepGradients
    ) -> bool | Tensor:
        """Absorbs the step's statistics into the block's curvature state; False if rejected.

        May return a device flag (0-dim bool) instead, read back with the step's; the update
        must then be masked with the step's flag (``self._readback.step_ok``)."""
        raise NotImplementedError

    def _prepare(self, grads: StepGradients) -> None:
        """Device half of the step's curvature work (e.g. refreshing on schedule); host values
        it needs go through :meth:`_note`."""

    def _commit(self, grads: StepGradients) -> None:
        """Host half of the curvature work, after the read-back (RKalman's filter update)."""

    def _precondition_block(
        self,
        key: str,
        block: KroneckerBlock,
        V: Tensor,
        group: dict[str, Any],
        grads: StepGradients,
    ) -> Tensor | RowUpdate | None:
        """Preconditioned ``(groups, n_out, n_in)`` matrix (or an embedding's touched rows,
        ``optim/lazy_rows.py``), or None while no curvature exists."""
        raise NotImplementedError

    def _precondition_blocks(
        self, owned: list[BlockItem], grads: StepGradients
    ) -> list[Tensor | RowUpdate | None]:
        """:meth:`_precondition_block` of each ``(key, block, V, group)``, in order (the eigen
        mode batches same-shaped blocks here)."""
        return [self._precondition_block(*item, grads) for item in owned]

    def _momentum_carried(self, directions: dict[Tensor, Tensor]) -> set[Tensor]:
        """Parameters whose direction already holds a first moment (no momentum added)."""
        return set()

    def _reported_damping(self, group: dict[str, Any]) -> float | Tensor:
        """The step's damping in the units of the active route, for ``diagnostics``."""
        return group["damping"] * self.damping_boost

    def _reported_grad_sq(self) -> float | Tensor:
        """‖g‖² reported as ``grad_norm`` (RENG: of the plain, unregularized gradient)."""
        return self._readback.grad_sq_host

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Performs one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (it must call ``backward``).
                Required by ``RENG(gr_mode="finite_difference")``, optional otherwise.
        """
        capture = self._require_attached()
        self._warn_unfrozen()
        # The stages run in profiler ranges "grng.<stage>" (a trace shows where a step goes;
        # ``benchmarks/step_cost.py --stages``); a range costs microseconds when not profiling.
        with record_function("grng.gradients"):
            loss, grad_of = self._gradients(closure)
            grads = StepGradients.of_params(grad_of)
        # ‖g‖² stays on the device; whether the step is skipped (non-finite gradient) is read
        # back once, with every other flag of the step, in _settle().
        self._readback.open(grads.sq)
        self._boost.begin_step()
        self._damping_ratios = {}
        if self._curvature_due():
            with record_function("grng.statistics"):
                self._absorb_statistics(capture, grads)
        with record_function("grng.refresh"):
            self._prepare(grads)
        with record_function("grng.readback"):
            settled = self._settle()
        if not settled:
            return loss
        with record_function("grng.commit"):
            self._commit(grads)

        with record_function("grng.precondition"):
            directions, fallback = self._directions(grads)
        with record_function("grng.update"):
            group_of = {p: group for group in self.param_groups for p in group["params"]}
            used = {p: grad_of[p] for p in directions}
            scale = kl_clip_scale(self.kl_clip, directions, used, group_of)
            binding = self._kl_binding.count(scale)
            carried = self._momentum_carried(directions)
            apply_directions(
                self.param_groups, self.state, directions, scale, self.momentum_ema, carried
            )
            apply_fallback(fallback, self.state, grad_of, group_of, self.fallback_lr)

        self.grng_step += 1
        self._gate.wanted = self._curvature_due()
        self.diagnostics = {
            "grad_norm": self._reported_grad_sq() ** 0.5,
            "damping": self._reported_damping(self.param_groups[0]),
            "kl_scale": scale,
            **binding,
            "skipped_steps": float(self.skipped_steps),
            "rejected_statistics": float(self.rejected_statistics),
            **{f"damping_ratio/{name}": r for name, r in self._damping_ratios.items()},
        }
        return loss

    def _directions(self, grads: StepGradients) -> tuple[dict[Tensor, Tensor], list[Tensor]]:
        """Each block's preconditioned direction (DDP: from its owner), and the parameters
        left to the fallback update."""
        grad_of = grads.of
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        owned = [
            (key, block, grads.matrix(block), group_of[block.weight])
            for key, block in self._blocks.items()
            # Unused this step (or bias frozen): the fallback handles the rest. Not owned
            # (DDP): its owner preconditions it; the result arrives below.
            if all(p in grad_of for p in block.params()) and self._owns(key)
        ]
        preconditioned: dict[str, Tensor | RowUpdate] = {}
        for (key, _, V, _), U in zip(owned, self._precondition_blocks(owned, grads), strict=True):
            if U is None:
                continue
            # Non-finite direction: identity preconditioner for this block (on the device).
            if isinstance(U, RowUpdate):  # an embedding's touched rows (lazy_rows)
                preconditioned[key] = U.finite_or_gradient()
            else:
                preconditioned[key] = torch.where(all_finite(U), U, V.to(U.dtype))
        if self._sharding is not None and self._blocks:
            preconditioned = {
                key: U.dense().mT.unsqueeze(0) if isinstance(U, RowUpdate) else U
                for key, U in preconditioned.items()
            }
            preconditioned = self._share_directions(preconditioned, list(grad_of.values()))
        directions: dict[Tensor, Tensor | RowUpdate] = {}
        for key, U in preconditioned.items():
            block = self._blocks[key]
            if isinstance(U, RowUpdate):
                directions[block.weight] = U  # in the weight's layout already
            else:
                directions.update(zip(block.params(), block.from_matrix(U), strict=True))
        fallback = [p for p in grad_of if p not in directions]
        if self.fallback is FallbackMode.SGD:
            directions.update((p, grad_of[p]) for p in fallback)
            fallback = []
        return directions, fallback

    # ------------------------------------------------------------------ one read-back per step
    def _note(self, value: Tensor, on_host: Callable[[float], None]) -> None:
        """Registers a device value of this step; ``on_host(value)`` runs at the read-back
        (see :class:`~lightning_grng.optim.readback.ReadBack`)."""
        self._readback.note(value, on_host)

    def _settle(self) -> bool:
        """The step's single host synchronisation: reads ‖g‖² and every value noted so far,
        runs their host callbacks (counters, warnings, the damping boost) and returns whether
        the step goes on (False: non-finite gradient, the step is skipped)."""
        late, current = self._readback.settle()
        doublings = self._boost.doublings
        for on_host, value in late:
            on_host(value)  # the previous step's late values (e.g. a rejected filter result)
        self._boost.carry_late(doublings)
        ok = math.isfinite(current[0][1])
        self._readback.step_ok_host = ok
        if not ok:
            self._boost.restore()
            self._skip_step(self._require_attached())
            return False
        for on_host, value in current[1:]:
            on_host(value)
        return True

    def _raise_damping(self) -> None:
        """After a failure: double the damping boost (it halves again on each good step)."""
        self._boost.double()

    def _share_directions(self, owned: dict[str, Tensor], grads: list[Tensor]) -> dict[str, Tensor]:
        """DDP: every block's direction on every rank (one all-reduce), and the same damping
        boost everywhere (the owners' failures of this step, counted over all ranks)."""
        dtype = grads[0].dtype if grads else next(iter(self._blocks.values())).weight.dtype
        for g in grads:
            dtype = torch.promote_types(dtype, g.dtype)
        sharding = self._sharding_bound()
        shared, total = sharding.share_directions(
            self._blocks, owned, self._boost.take_doublings(), dtype
        )
        self._boost.agree(total)
        return shared

    def _skip_step(self, capture: CurvatureCapture) -> None:
        """Non-finite gradients: no update, statistics dropped, damping raised, counted."""
        capture.reset()
        self.skipped_steps += 1
        self._raise_damping()
        self.diagnostics = {
            "grad_norm": float("nan"),
            "damping": self._reported_damping(self.param_groups[0]),
            "kl_scale": 0.0,
            "skipped_steps": float(self.skipped_steps),
            "rejected_statistics": float(self.rejected_statistics),
        }
        warnings.warn(
            f"{type(self).__name__}: non-finite gradient at step {self.grng_step}; the step was "
            f"skipped ({self.skipped_steps} so far) and damping raised {self.damping_boost:g}x.",
            RuntimeWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------ Monte-Carlo Fisher
    def mc_fisher_backward(self, outputs: Tensor, likelihood: str = "categorical") -> None:
        """Backward of a loss with labels sampled from the model (``fisher="mc"``).

        Call after the forward pass and before ``loss.backward()``; it retains the graph and
        leaves ``.grad`` untouched. ``likelihood="categorical"`` treats ``outputs`` as logits
        (last dimension = classes); ``"gaussian"`` as the mean of a unit-variance Gaussian
        (loss ``½‖y − outputs‖²`` per row). The reduction follows ``loss_reduction``.
        """
        if self._capture is None or not self._gate.wanted:
            return
        with torch.enable_grad(), self._gate.mc_pass():
            loss = sampled_label_loss(outputs, likelihood, self.loss_reduction)
            inputs = [p for p in self.flat_params() if p.requires_grad]
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
