"""The update skeleton shared by every GRNG optimizer.

One step reads as a short chain::

    gradients (RENG: regularized) → curvature statistics → precondition per block
    (fallback: identity) → KL-clip → momentum → decoupled weight decay → lr

Subclasses differ only where the math differs: how the gradient is formed (:meth:`_gradients`),
how factors are updated (:meth:`_update_block`) and how a block is preconditioned
(:meth:`_precondition_block`, including the damping rule).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.capture import (
    CaptureGate,
    CurvatureCapture,
    FisherType,
    LossReduction,
)
from lightning_grng.optim.fallback import ADAM_STATE, FallbackMode, adam_direction, describe
from lightning_grng.optim.validation import check_choice, check_int, check_range

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


_MAX_DAMPING_BOOST = 2.0**20

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


def _device_total(values: Iterable[Tensor]) -> Tensor:
    """Sum of scalar tensors as a float64 tensor on the device of the first (no host sync)."""
    items = list(values)
    if not items:
        return torch.zeros((), dtype=torch.float64)
    device = items[0].device
    return torch.stack([v.to(device=device, dtype=torch.float64) for v in items]).sum()


class GRNGOptimizer(Optimizer):
    """Base class: hook bookkeeping, the shared update skeleton, failure handling, checkpoints.

    Not used directly; see :class:`~lightning_grng.KFAC`, :class:`~lightning_grng.RING`,
    :class:`~lightning_grng.RENG` and :class:`~lightning_grng.RKalman`.

    Curvature statistics accumulate exactly like gradients (``curvature/capture.py``):
    :meth:`zero_grad` clears them with the gradients, and only backward passes that reach the
    parameters' ``.grad`` count.
    """

    #: Per-group hyperparameters this optimizer checks (subclasses add ``rho``).
    group_ranges: ClassVar[dict[str, tuple[float, float | None, bool, bool]]] = GROUP_RANGES

    def __init__(
        self,
        params: ParamsT,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        damping: float,
        curvature_every: int,
        kl_clip: float | None,
        fisher: str | FisherType,
        loss_reduction: str | LossReduction,
        fallback: str | FallbackMode = FallbackMode.ADAM,
        fallback_lr: float = 0.1,
    ) -> None:
        name = type(self).__name__
        given = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping)
        defaults = {key: self._check_group_value(key, value) for key, value in given.items()}
        self.curvature_every = check_int(name, "curvature_every", curvature_every)
        if kl_clip is not None:
            kl_clip = check_range(name, "kl_clip", kl_clip, 0.0, low_open=True)
        self.kl_clip = kl_clip
        self.fisher = check_choice(name, "fisher", fisher, FisherType)
        self.loss_reduction = check_choice(name, "loss_reduction", loss_reduction, LossReduction)
        self.fallback = check_choice(name, "fallback", fallback, FallbackMode)
        self.fallback_lr = check_range(name, "fallback_lr", fallback_lr, 0.0, low_open=True)
        #: Momentum as an EMA ``m ← μm + (1 − μ)U`` (the update keeps U's units, as Adam's
        #: first moment does) instead of heavy ball ``m ← μm + U``; the eigen-corrected mode.
        self.momentum_ema = False
        super().__init__(params, defaults)

        self._gate = CaptureGate(self.fisher)
        self._capture: CurvatureCapture | None = None
        self._blocks: dict[str, KroneckerBlock] = {}
        self._model: nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None
        self._warned_silent: set[str] = set()
        #: Parameters of supported layers that were frozen at attach -> module name.
        self._frozen_at_attach: dict[Tensor, str] = {}
        self._warned_unfrozen: set[str] = set()
        self._live_handles: list[Any] = []
        self.grng_step = 0
        self.skipped_steps = 0
        #: Block statistics refused because they were not finite (e.g. overflow), all steps.
        self.rejected_statistics = 0
        self.damping_boost = 1.0
        #: Squared norm of the plain (unregularized) gradient when it differs from the one
        #: preconditioned (RENG); reported as ``grad_norm``.
        self.plain_grad_sq: float | Tensor | None = None
        #: Values of the last step, for loggers: grad_norm, damping, kl_scale, skipped_steps.
        self.diagnostics = {}
        # The step's device flags, read back together once per step (see _settle).
        self._ledger: list[tuple[Tensor, Callable[[float], None]]] = []
        self._deferred: list[tuple[Tensor, Callable[[float], None]]] = []
        self._settled = True
        self._step_ok: Tensor | None = None
        self._grad_sq_host = 0.0
        self._step_ok_host = True
        self._boost_before = 1.0
        #: Set by :class:`~lightning_grng.GRNGDDPStrategy`: which rank owns which block
        #: (:class:`~lightning_grng.distributed.Sharding`); None in a single process.
        self._shard: Any = None
        self._consolidated: dict[str, Any] | None = None
        #: This step's gradients and their squared norm (for per-block damping rules).
        self._step_grads: dict[Tensor, Tensor] = {}
        self._step_grad_sq = 0.0
        #: Module name -> damping-to-curvature ratio γ / (mean eigenvalue of A ⊗ G), this step.
        self._damping_ratios: dict[str, Tensor] = {}
        #: Steps (since construction) whose KL-clip scale was below 1, on the device.
        self._kl_bound_steps: Tensor | None = None
        self._kl_clipped_steps = 0
        # Failures within the current step, so DDP ranks can agree on the damping boost.
        self._doublings = 0
        self._boost_at_start = 1.0

    @property
    def diagnostics(self) -> dict[str, float]:
        """Values of the last step, for loggers: grad_norm, damping, kl_scale, skipped_steps,
        rejected_statistics. Values the step left on the device are read back here (outside
        ``step()``), once per step."""
        values = self._diagnostics
        if any(isinstance(v, Tensor) for v in values.values()):
            keys = [k for k, v in values.items() if isinstance(v, Tensor)]
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

    # ------------------------------------------------------------------ attaching
    @property
    def attached(self) -> bool:
        return self._capture is not None

    @property
    def blocks(self) -> dict[str, KroneckerBlock]:
        """The Kronecker blocks, keyed by the index of their weight in the optimizer."""
        return self._blocks

    def flat_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _new_accumulator(self, block: KroneckerBlock) -> Any:
        raise NotImplementedError

    def _refuses_block(self, block: KroneckerBlock) -> str | None:
        """Why this optimizer cannot use ``block`` (its parameters then get the fallback), or
        None. Every block is usable by default."""
        return None

    # ------------------------------------------------------------------ sharding (DDP)
    @property
    def _sharded(self) -> bool:
        return self._shard is not None and self._shard.world_size > 1

    def _owns(self, key: str) -> bool:
        """Whether this process keeps block ``key``'s curvature (always, in one process)."""
        if not self._sharded:
            return True
        self._shard.bind(self._blocks)
        return bool(self._shard.owns(key))

    def _reduce_statistics(self, capture: CurvatureCapture) -> None:
        """Brings every block's statistics of all ranks to its owner (DDP only)."""
        self._shard.bind(self._blocks)
        self._shard.reduce_factor_statistics(self._blocks, capture.accumulators)

    def factor_bytes(self) -> int:
        """Bytes of the curvature tensors this process holds (factors, inverses, filters)."""
        return sum(
            v.numel() * v.element_size()
            for key in self._blocks
            for v in self._block_state(key).values()
            if isinstance(v, Tensor)
        )

    def _attach(
        self,
        model: nn.Module,
        blocks: dict[str, KroneckerBlock],
        frozen: dict[Tensor, str] | None = None,
    ) -> CurvatureCapture:
        """Called by :func:`lightning_grng.attach`; registers the hooks.

        A curvature state loaded before attaching is applied now; if it does not fit the
        model, nothing is attached and the optimizer is left as it was before that load.
        """
        previous_blocks = self._blocks
        self._blocks = blocks
        if self._pending_state is not None:
            (pending, before), self._pending_state = self._pending_state, None
            try:
                self._load_grng_state(pending)
            except Exception:
                self._blocks = previous_blocks
                self._restore(before)
                raise
        self._model = model
        self._frozen_at_attach = dict(frozen or {})
        accumulators = {key: self._new_accumulator(block) for key, block in blocks.items()}
        self._capture = CurvatureCapture(blocks, accumulators, self._gate, owner=self)
        self._capture.register(model)
        self._gate.wanted = self._curvature_due()
        return self._capture

    def _detach(self) -> None:
        if self._capture is not None:
            self._capture.remove()
        self._capture = None
        self._model = None
        self._live_handles.clear()

    def _release(self, handle: Any) -> None:
        """One handle is removed; the hooks go when no handle of this attachment is left."""
        if handle not in self._live_handles:
            return
        self._live_handles.remove(handle)
        if not self._live_handles:
            self._detach()

    def _require_attached(self) -> CurvatureCapture:
        if self._capture is None:
            name = type(self).__name__
            raise RuntimeError(
                f"{name} has no curvature hooks: call `lightning_grng.attach(model, optimizer)` "
                "before training in plain PyTorch, or add `lightning_grng.GRNGCallback()` to the "
                "Trainer's callbacks (it is added automatically when lightning-grng is installed)."
            )
        return self._capture

    # ------------------------------------------------------------------ the step
    def _curvature_due(self) -> bool:
        return self.grng_step % self.curvature_every == 0

    def _gradients(
        self, params: list[Tensor], closure: Callable[[], Any] | None
    ) -> tuple[Any, list[Tensor]]:
        """``(loss, gradients)`` for ``params``. Base: evaluate the closure, read ``p.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        return loss, [p.grad.detach() if p.grad is not None else None for p in params]  # type: ignore[misc]

    def _update_block(self, key: str, block: KroneckerBlock, accumulator: Any) -> bool | Tensor:
        """Absorb the step's statistics into the block's curvature state; False if rejected.

        May return a device flag (0-dim bool) instead, read back with the step's flags; the
        update must then be masked with ``self._step_ok`` (the step may still be skipped)."""
        raise NotImplementedError

    def _refresh(self, grad_sq_norm: Tensor) -> None:
        """Hook for per-step work after the statistics (e.g. refreshing inverses on schedule)."""

    def _precondition_block(
        self, key: str, block: KroneckerBlock, V: Tensor, group: dict[str, Any], grad_sq: Tensor
    ) -> Tensor | None:
        """Preconditioned ``(groups, n_out, n_in)`` matrix, or None while no curvature exists."""
        raise NotImplementedError

    def _effective_damping(self, group: dict[str, Any], grad_sq_norm: float | Tensor) -> Any:
        """Damping applied this step (KFAC: λ; RING: λ + ρ‖g‖²), times the failure boost."""
        return group["damping"] * self.damping_boost

    def _block_grad_sq(self, block: KroneckerBlock) -> Tensor:
        """``‖g_b‖²`` of one block's parameters this step (a 0-dim tensor, no host sync)."""
        grads = [self._step_grads[p] for p in block.params() if p in self._step_grads]
        return torch.stack([g.double().pow(2).sum() for g in grads]).sum()

    @property
    def _fallback_text(self) -> str:
        return describe(self.fallback)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Performs one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (it must call ``backward``).
                Required by ``RENG(gr_mode="finite_difference")``, optional otherwise.
        """
        capture = self._require_attached()
        self._warn_unfrozen()
        params = [p for p in self.flat_params() if p.grad is not None]
        loss, grads = self._gradients(params, closure)
        # Gradients may have appeared only through the closure.
        params = [p for p in self.flat_params() if p.grad is not None]
        if len(grads) != len(params):
            grads = [p.grad.detach() for p in params]  # type: ignore[union-attr]
        grad_of = {p: g for p, g in zip(params, grads, strict=True)}

        # ‖g‖² stays on the device; whether the step is skipped (non-finite gradient) is read
        # back once, with every other flag of the step, in _settle().
        grad_sq = _device_total(g.double().pow(2).sum() for g in grads)
        self._begin_step(grad_sq)
        self._step_grads, self._step_grad_sq = grad_of, grad_sq
        self._damping_ratios = {}
        if self._curvature_due():
            self._absorb_statistics(capture, grad_of)
        self._refresh(grad_sq)
        if not self._settle():
            return loss

        directions: dict[Tensor, Tensor] = {}
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        preconditioned: dict[str, Tensor] = {}
        for key, block in self._blocks.items():
            block_params = block.params()
            if any(p not in grad_of for p in block_params):
                continue  # unused this step (or bias frozen): fallback below handles the rest
            if not self._owns(key):
                continue  # DDP: its owner preconditions it; the result arrives below
            V = block.to_matrix(*[grad_of[p] for p in block_params])
            group = group_of[block.weight]
            U = self._precondition_block(key, block, V, group, grad_sq)
            if U is None:
                continue
            # Non-finite direction: identity preconditioner for this block (on the device).
            preconditioned[key] = torch.where(torch.isfinite(U).all(), U, V.to(U.dtype))
        if self._sharded and self._blocks:
            preconditioned = self._share_directions(preconditioned, grads)
        for key, U in preconditioned.items():
            block = self._blocks[key]
            directions.update(zip(block.params(), block.from_matrix(U), strict=True))
        fallback = [p for p in grad_of if p not in directions]
        if self.fallback is FallbackMode.SGD:
            directions.update((p, grad_of[p]) for p in fallback)
            fallback = []

        scale = self._kl_scale(directions, {p: grad_of[p] for p in directions}, group_of)
        binding = self._count_kl_binding(scale)
        self._apply(directions, scale)
        self._apply_fallback(fallback, grad_of, group_of)
        self._step_grads = {}

        self.grng_step += 1
        self._gate.wanted = self._curvature_due()
        plain = self.plain_grad_sq
        self.diagnostics = {
            "grad_norm": math.sqrt(self._grad_sq_host) if plain is None else plain**0.5,
            "damping": self._effective_damping(self.param_groups[0], self._grad_sq_host),
            "kl_scale": scale,
            **binding,
            "skipped_steps": float(self.skipped_steps),
            "rejected_statistics": float(self.rejected_statistics),
            **{f"damping_ratio/{name}": r for name, r in self._damping_ratios.items()},
        }
        return loss

    # ------------------------------------------------------------------ one read-back per step
    def _begin_step(self, grad_sq: Tensor) -> None:
        """Opens the step's ledger; the step counts as good until its read-back says not."""
        self._step_ok = torch.isfinite(grad_sq)
        self._ledger = [(grad_sq, self._note_grad_sq)]
        self._settled = False
        # A good step relaxes the boost from earlier failures; failures raise it again when
        # the read-back counts them (a skipped step restores it, then doubles it).
        self._boost_before = self.damping_boost
        self.damping_boost = max(1.0, self.damping_boost * 0.5)
        self._boost_at_start = self.damping_boost
        self._doublings = 0

    def _note(self, flag: Tensor, on_host: Callable[[float], None]) -> None:
        """Registers a device value of this step; ``on_host(value)`` runs at the read-back.

        Before the step's read-back the value is read with it (and ignored if the step is
        skipped); after it, with the next step's read-back (or when :meth:`_flush` is called).
        """
        (self._deferred if self._settled else self._ledger).append((flag, on_host))

    def _note_grad_sq(self, value: float) -> None:
        self._grad_sq_host = value

    def _read_back(self, entries: list[tuple[Tensor, Callable[[float], None]]]) -> list[float]:
        """ONE host synchronisation for all ``entries``."""
        if not entries:
            return []
        device = entries[0][0].device
        stacked = torch.stack(
            [t.detach().to(device=device, dtype=torch.float64).reshape(()) for t, _ in entries]
        )
        return stacked.tolist()

    def _settle(self) -> bool:
        """The step's single host synchronisation: reads the gradient norm and every flag
        noted so far (rejected statistics, inverse failures, ...), updates the host counters
        and warnings, and returns whether the step goes on (False: non-finite gradient, the
        step is skipped). Idempotent within a step."""
        if self._settled:
            return bool(self._step_ok_host)
        deferred, self._deferred = self._deferred, []
        entries, self._ledger = deferred + self._ledger, []
        values = self._read_back(entries)
        self._settled = True
        doublings = self._doublings
        for (_, on_host), value in zip(entries[: len(deferred)], values, strict=False):
            on_host(value)  # the previous step's late flags (e.g. a rejected filter result)
        self._boost_before = min(
            self._boost_before * 2.0 ** (self._doublings - doublings), _MAX_DAMPING_BOOST
        )
        mine = list(zip(entries[len(deferred) :], values[len(deferred) :], strict=True))
        (_, first), grad_sq = mine[0]
        first(grad_sq)
        self._step_ok_host = math.isfinite(grad_sq)
        if not self._step_ok_host:
            self.damping_boost = self._boost_before
            self._skip_step(self._require_attached())
            return False
        for (_, on_host), value in mine[1:]:
            on_host(value)
        return True

    def _flush(self) -> None:
        """Reads back values noted after the last step's read-back (outside ``step()``)."""
        if self._settled and self._deferred:
            entries, self._deferred = self._deferred, []
            for (_, on_host), value in zip(entries, self._read_back(entries), strict=True):
                on_host(value)

    def _apply_fallback(
        self,
        params: list[Tensor],
        grad_of: dict[Tensor, Tensor],
        group_of: dict[Tensor, dict[str, Any]],
    ) -> None:
        """The Adam fallback (``optim/fallback.py``) for parameters without a direction."""
        for p in params:
            group = group_of[p]
            lr = group["lr"] * self.fallback_lr
            direction = adam_direction(self.state[p], grad_of[p].to(p.dtype))
            if group["weight_decay"] > 0.0:
                p.mul_(1.0 - lr * group["weight_decay"])
            p.add_(direction, alpha=-lr)

    def _warn_unfrozen(self) -> None:
        """Names a layer that was frozen at attach and trains now (it has no block)."""
        for p, name in self._frozen_at_attach.items():
            if p.grad is None or name in self._warned_unfrozen:
                continue
            self._warned_unfrozen.add(name)
            warnings.warn(
                f"{type(self).__name__}: module '{name}' was frozen when the curvature hooks "
                f"were attached and now has gradients, so it gets the fallback update "
                f"({self._fallback_text}); re-attach after unfreezing (handle.remove(), then "
                "attach(model, optimizer)) to give it a Kronecker block.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _raise_damping(self) -> None:
        """After a failure: double the damping boost (it halves again on each good step)."""
        self.damping_boost = min(self.damping_boost * 2.0, _MAX_DAMPING_BOOST)
        self._doublings += 1

    def _share_directions(self, owned: dict[str, Tensor], grads: list[Tensor]) -> dict[str, Tensor]:
        """DDP: every block's direction on every rank (one all-reduce), and the same damping
        boost everywhere (the owners' failures of this step, counted over all ranks)."""
        dtype = grads[0].dtype if grads else self._blocks[next(iter(self._blocks))].weight.dtype
        for g in grads:
            dtype = torch.promote_types(dtype, g.dtype)
        doublings, self._doublings = self._doublings, 0
        shared, total = self._shard.share_directions(self._blocks, owned, doublings, dtype)
        self.damping_boost = min(self._boost_at_start * 2.0**total, _MAX_DAMPING_BOOST)
        return shared

    def _skip_step(self, capture: CurvatureCapture) -> None:
        """Non-finite gradients: no update, statistics dropped, damping raised, counted."""
        capture.reset()
        self.skipped_steps += 1
        self._raise_damping()
        self.diagnostics = {
            "grad_norm": float("nan"),
            "damping": self._effective_damping(self.param_groups[0], 0.0),
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

    def _absorb_statistics(self, capture: CurvatureCapture, grad_of: dict[Tensor, Tensor]) -> None:
        self._complete_partial_window(capture)
        if self._sharded and self._blocks:
            self._reduce_statistics(capture)
        for key, block in self._blocks.items():
            if not self._owns(key):
                continue
            acc = capture.accumulators[key]
            if block.weight not in grad_of:
                continue  # its gradient was cleared (or never came): so are its statistics
            if not acc.complete:
                self._warn_silent_block(key, block, capture)
                continue
            accepted = self._update_block(key, block, acc)
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
        if key in self._warned_silent:
            return
        self._warned_silent.add(key)
        if key in capture.eval_forward:
            warnings.warn(
                f"{type(self).__name__}: module '{block.name}' ran in eval mode during the "
                "training step (model.eval()?), and curvature statistics are taken in training "
                f"mode only; it gets the fallback update ({self._fallback_text}) until then. Call "
                "model.train() before the training forward.",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        warnings.warn(
            f"{type(self).__name__}: the curvature hooks of module '{block.name}' "
            f"({type(block.module).__name__}) never fired although its parameters have "
            "gradients; it is probably called through a functional path (e.g. "
            "F.linear(x, layer.weight) instead of layer(x)). It gets the fallback update "
            f"({self._fallback_text}) until statistics arrive; exclude it with "
            f"attach(..., skip_modules=['{block.name}']) to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _kl_scale(
        self,
        directions: dict[Tensor, Tensor],
        grad_of: dict[Tensor, Tensor],
        group_of: dict[Tensor, dict[str, Any]],
    ) -> float | Tensor:
        """KL-clip: ``min(1, sqrt(c / Σ lr² ⟨U, g⟩))``; bounds the step's predicted KL change.

        A float64 0-dim tensor on the device (no host sync); 1 where ``Σ`` is 0 or not finite.
        """
        if self.kl_clip is None:
            return 1.0
        vg = _device_total(
            group_of[p]["lr"] ** 2 * (directions[p].double() * g.double()).sum()
            for p, g in grad_of.items()
        ).abs()
        usable = (vg > 0.0) & torch.isfinite(vg)
        scale = torch.sqrt(self.kl_clip / torch.where(usable, vg, torch.ones_like(vg)))
        return torch.where(usable, scale.clamp(max=1.0), torch.ones_like(vg))

    def _count_kl_binding(self, scale: float | Tensor) -> dict[str, float | Tensor]:
        """``kl_clip_bound`` (this step's scale < 1, as 0/1) and ``kl_clip_bind_rate`` (the
        fraction of such steps since construction); kept on the device. Empty without a clip."""
        if not isinstance(scale, Tensor):
            return {}
        bound = (scale < 1.0).to(torch.float64)
        total = self._kl_bound_steps
        self._kl_bound_steps = bound if total is None else total.to(bound.device) + bound
        self._kl_clipped_steps += 1
        rate = self._kl_bound_steps / self._kl_clipped_steps
        return {"kl_clip_bound": bound, "kl_clip_bind_rate": rate}

    def _apply(self, directions: dict[Tensor, Tensor], scale: float) -> None:
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p not in directions:
                    continue
                update = directions[p].to(p.dtype).mul(scale)
                if mu > 0.0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = buf = update.clone()
                    else:
                        buf.mul_(mu).add_(update, alpha=1.0 - mu if self.momentum_ema else 1.0)
                    update = buf
                if wd > 0.0:
                    p.mul_(1.0 - lr * wd)
                p.add_(update, alpha=-lr)

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
        logits = outputs.reshape(-1, outputs.shape[-1])
        with torch.enable_grad(), self._gate.mc_pass():
            with torch.no_grad():
                if likelihood == "categorical":
                    labels = torch.distributions.Categorical(logits=logits.detach()).sample()
                elif likelihood == "gaussian":
                    labels = logits.detach() + torch.randn_like(logits)
                else:
                    raise ValueError(
                        f"invalid likelihood={likelihood!r}; allowed: 'categorical', 'gaussian'."
                    )
            if likelihood == "categorical":
                per_row = nn.functional.cross_entropy(logits, labels, reduction="none")
            else:
                per_row = 0.5 * (logits - labels).pow(2).sum(-1)
            loss = per_row.mean() if self.loss_reduction is LossReduction.MEAN else per_row.sum()
            # Scale by rows/samples so a (B, T, C) output is averaged like the training loss.
            inputs = [p for p in self.flat_params() if p.requires_grad]
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)

    # ------------------------------------------------------------------ checkpoints
    def _block_state(self, key: str) -> dict[str, Any]:
        raise NotImplementedError

    def _load_block_state(self, key: str, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _check_factor_shapes(
        self,
        block: KroneckerBlock,
        factors: dict[str, Any],
        label: str = "factor",
        diagonal: tuple[str, ...] = (),
    ) -> None:
        """Refuses a checkpoint whose factor ``name -> (tensor, n)`` is not ``(groups, n, n)``
        (``(groups, n)`` for the names in ``diagonal``: factors stored as their diagonal)."""
        for name, (value, n) in factors.items():
            expected = (block.groups, n) if name in diagonal else (block.groups, n, n)
            if value is not None and tuple(value.shape) != expected:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {label} {name} of module "
                    f"'{block.name}' has shape {tuple(value.shape)}, expected "
                    f"{expected}; the checkpoint belongs to another model."
                )

    def _drop_block_state(self, key: str) -> None:
        """Forgets block ``key``'s curvature state (DDP: another rank owns it)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The torch state (momentum, param groups) plus a ``"grng"`` entry with all curvature
        state: factors and their inverse representations in their own dtypes, counters."""
        state = super().state_dict()
        consolidated, self._consolidated = self._consolidated, None
        if consolidated is not None:  # DDP, rank 0 after consolidate_state_dict()
            blocks = {
                key: {"module": b.name, **consolidated.get(key, {})}
                for key, b in self._blocks.items()
            }
        else:
            blocks = {
                key: {"module": b.name, **self._block_state(key)} for key, b in self._blocks.items()
            }
        state["grng"] = {
            "optimizer": type(self).__name__,
            "step": self.grng_step,
            "skipped_steps": self.skipped_steps,
            "damping_boost": self.damping_boost,
            "rejected_statistics": self.rejected_statistics,
            "blocks": blocks,
        }
        return state

    def consolidate_state_dict(self, to: int = 0) -> None:
        """DDP: gathers every block's curvature state from its owner to rank 0, so that rank 0's
        next :meth:`state_dict` holds all blocks (a collective: call it on every rank; Lightning's
        ``Strategy.optimizer_state`` does). A no-op in one process."""
        if not self._sharded:
            return
        if to != 0:
            raise ValueError(f"consolidate_state_dict(to={to}): only rank 0 is supported.")
        self._shard.bind(self._blocks)
        states = {key: self._block_state(key) for key in self._blocks}
        self._consolidated = self._shard.gather_block_states(states)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state saved by the same optimizer class; curvature state is applied now if
        the hooks are attached, otherwise when :func:`lightning_grng.attach` is called."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "grng" not in state_dict:
            raise ValueError(
                f"{name}.load_state_dict: this state has no 'grng' entry, so it was not saved by "
                "a lightning_grng optimizer (a checkpoint from another optimizer?)."
            )
        grng = state_dict["grng"]
        saved_by = grng.get("optimizer")
        if saved_by != name:
            raise ValueError(
                f"{name}.load_state_dict: the state was saved by {saved_by}, not {name}; "
                "resume with the same optimizer or start a fresh run."
            )
        rest = {k: v for k, v in state_dict.items() if k != "grng"}
        before = self._snapshot()
        try:
            super().load_state_dict(rest)
            if self.attached:
                self._load_grng_state(grng)
            else:
                self._pending_state = (grng, before)
            self._check_momentum_shapes()
        except Exception:
            # A refused state leaves the optimizer exactly as it was.
            self._restore(before)
            raise

    def _curvature_store(self) -> dict[str, Any]:
        """The dict of per-block curvature objects that loading replaces (never mutates)."""
        raise NotImplementedError

    def _snapshot(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` may change, by reference (loading builds new
        objects, so the old ones stay intact)."""
        return dict(
            state=self.state,
            param_groups=self.param_groups,
            curvature=dict(self._curvature_store()),
            counters=(self.grng_step, self.skipped_steps, self.damping_boost),
            rejected=self.rejected_statistics,
            pending=self._pending_state,
            wanted=self._gate.wanted,
        )

    def _restore(self, snapshot: dict[str, Any]) -> None:
        self.state = snapshot["state"]
        self.param_groups = snapshot["param_groups"]
        store = self._curvature_store()
        store.clear()
        store.update(snapshot["curvature"])
        self.grng_step, self.skipped_steps, self.damping_boost = snapshot["counters"]
        self.rejected_statistics = snapshot["rejected"]
        self._pending_state = snapshot["pending"]
        self._gate.wanted = snapshot["wanted"]

    def _check_momentum_shapes(self) -> None:
        for i, p in enumerate(self.flat_params()):
            for key in ("momentum_buffer", *ADAM_STATE):
                buf = self.state.get(p, {}).get(key)
                if buf is not None and buf.shape != p.shape:
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: the {key} of parameter {i} "
                        f"has shape {tuple(buf.shape)}, expected {tuple(p.shape)}; the "
                        "checkpoint belongs to another model."
                    )

    def _load_grng_state(self, grng: dict[str, Any]) -> None:
        name = type(self).__name__
        saved = grng["blocks"]
        if set(saved) != set(self._blocks):
            expected = sorted(b.name for b in self._blocks.values())
            got = sorted(s.get("module", k) for k, s in saved.items())
            raise ValueError(
                f"{name}.load_state_dict: the checkpoint has curvature blocks {got} but the "
                f"model has {expected}; the checkpoint belongs to a different model."
            )
        for key, block_state in saved.items():
            if self._owns(key):  # DDP: re-shard under the current world size
                self._load_block_state(key, block_state)
            else:
                self._drop_block_state(key)
        self.grng_step = int(grng["step"])
        self.skipped_steps = int(grng["skipped_steps"])
        self.damping_boost = float(grng["damping_boost"])
        self.rejected_statistics = int(grng.get("rejected_statistics", 0))
        self._gate.wanted = self._curvature_due()
