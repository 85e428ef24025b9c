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
from typing import Any

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
from lightning_grng.optim.validation import check_choice, check_int, check_range

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

#: Parameters without a Kronecker block are updated with their raw gradient (identity
#: preconditioner), sharing the optimizer's momentum, weight decay, KL-clip and learning rate.
FALLBACK_UPDATE = "momentum SGD on the raw gradient (identity preconditioner)"

_MAX_DAMPING_BOOST = 2.0**20


def _total(values: Iterable[Tensor]) -> float:
    """Sum of scalar tensors read back with one host sync (not one per parameter)."""
    items = list(values)
    if not items:
        return 0.0
    device = items[0].device
    return float(torch.stack([v.to(device) for v in items]).sum())


class GRNGOptimizer(Optimizer):
    """Base class: hook bookkeeping, the shared update skeleton, failure handling, checkpoints.

    Not used directly; see :class:`~lightning_grng.KFAC`, :class:`~lightning_grng.RING`,
    :class:`~lightning_grng.RENG` and :class:`~lightning_grng.RKalman`.
    """

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
    ) -> None:
        name = type(self).__name__
        defaults = dict(
            lr=check_range(name, "lr", lr, 0.0),
            momentum=check_range(name, "momentum", momentum, 0.0, 1.0, high_open=True),
            weight_decay=check_range(name, "weight_decay", weight_decay, 0.0),
            damping=check_range(name, "damping", damping, 0.0, low_open=True),
        )
        self.curvature_every = check_int(name, "curvature_every", curvature_every)
        if kl_clip is not None:
            kl_clip = check_range(name, "kl_clip", kl_clip, 0.0, low_open=True)
        self.kl_clip = kl_clip
        self.fisher = check_choice(name, "fisher", fisher, FisherType)
        self.loss_reduction = check_choice(name, "loss_reduction", loss_reduction, LossReduction)
        super().__init__(params, defaults)

        self._gate = CaptureGate(self.fisher)
        self._capture: CurvatureCapture | None = None
        self._blocks: dict[str, KroneckerBlock] = {}
        self._model: nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None
        self._warned_silent: set[str] = set()
        self.grng_step = 0
        self.skipped_steps = 0
        self.damping_boost = 1.0
        #: Squared norm of the plain (unregularized) gradient when it differs from the one
        #: preconditioned (RENG); reported as ``grad_norm``.
        self.plain_grad_sq: float | None = None
        #: Values of the last step, for loggers: grad_norm, damping, kl_scale, skipped_steps.
        self.diagnostics: dict[str, float] = {}
        #: Set by :class:`~lightning_grng.GRNGDDPStrategy`: which rank owns which block
        #: (:class:`~lightning_grng.distributed.Sharding`); None in a single process.
        self._shard: Any = None
        self._consolidated: dict[str, Any] | None = None
        # Failures within the current step, so DDP ranks can agree on the damping boost.
        self._doublings = 0
        self._boost_at_start = 1.0

    def _add_group_default(self, key: str, value: Any) -> None:
        """A per-group hyperparameter of a subclass (e.g. ``rho``); explicit group values win."""
        self.defaults[key] = value
        for group in self.param_groups:
            group.setdefault(key, value)

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

    def _attach(self, model: nn.Module, blocks: dict[str, KroneckerBlock]) -> CurvatureCapture:
        """Called by :func:`lightning_grng.attach`; registers the hooks."""
        self._blocks = blocks
        self._model = model
        accumulators = {key: self._new_accumulator(block) for key, block in blocks.items()}
        self._capture = CurvatureCapture(blocks, accumulators, self._gate)
        self._capture.register()
        self._gate.wanted = self._curvature_due()
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self._load_grng_state(pending)
        return self._capture

    def _detach(self) -> None:
        if self._capture is not None:
            self._capture.remove()
        self._capture = None
        self._model = None

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

    def _update_block(self, key: str, block: KroneckerBlock, accumulator: Any) -> bool:
        """Absorb the step's statistics into the block's curvature state; False if rejected."""
        raise NotImplementedError

    def _refresh(self, grad_sq_norm: float) -> None:
        """Hook for per-step work after the statistics (e.g. refreshing inverses on schedule)."""

    def _precondition_block(
        self, key: str, block: KroneckerBlock, V: Tensor, group: dict[str, Any], grad_sq: float
    ) -> Tensor | None:
        """Preconditioned ``(groups, n_out, n_in)`` matrix, or None while no curvature exists."""
        raise NotImplementedError

    def _effective_damping(self, group: dict[str, Any], grad_sq_norm: float) -> float:
        """Damping applied this step (KFAC: λ; RING: λ + ρ‖g‖²), times the failure boost."""
        return group["damping"] * self.damping_boost

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Performs one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (it must call ``backward``).
                Required by ``RENG(gr_mode="finite_difference")``, optional otherwise.
        """
        capture = self._require_attached()
        params = [p for p in self.flat_params() if p.grad is not None]
        loss, grads = self._gradients(params, closure)
        # Gradients may have appeared only through the closure.
        params = [p for p in self.flat_params() if p.grad is not None]
        if len(grads) != len(params):
            grads = [p.grad.detach() for p in params]  # type: ignore[union-attr]
        grad_of = {p: g for p, g in zip(params, grads, strict=True)}

        grad_sq = _total(g.double().pow(2).sum() for g in grads)
        if not math.isfinite(grad_sq):
            self._skip_step(capture)
            return loss

        # A good step relaxes the boost from earlier failures; failures below raise it again.
        self.damping_boost = max(1.0, self.damping_boost * 0.5)
        self._boost_at_start = self.damping_boost
        self._doublings = 0
        if self._curvature_due():
            self._absorb_statistics(capture, grad_of)
        self._refresh(grad_sq)

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
            if U is None or not torch.isfinite(U).all():
                continue
            preconditioned[key] = U
        if self._sharded and self._blocks:
            preconditioned = self._share_directions(preconditioned, grads)
        for key, U in preconditioned.items():
            block = self._blocks[key]
            directions.update(zip(block.params(), block.from_matrix(U), strict=True))
        for p, g in grad_of.items():
            directions.setdefault(p, g)

        scale = self._kl_scale(directions, grad_of, group_of)
        self._apply(directions, scale)

        self.grng_step += 1
        self._gate.wanted = self._curvature_due()
        self.diagnostics = {
            "grad_norm": math.sqrt(grad_sq if self.plain_grad_sq is None else self.plain_grad_sq),
            "damping": self._effective_damping(self.param_groups[0], grad_sq),
            "kl_scale": scale,
            "skipped_steps": float(self.skipped_steps),
        }
        return loss

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
        }
        warnings.warn(
            f"{type(self).__name__}: non-finite gradient at step {self.grng_step}; the step was "
            f"skipped ({self.skipped_steps} so far) and damping raised {self.damping_boost:g}x.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _absorb_statistics(self, capture: CurvatureCapture, grad_of: dict[Tensor, Tensor]) -> None:
        if self._sharded and self._blocks:
            self._reduce_statistics(capture)
        for key, block in self._blocks.items():
            if not self._owns(key):
                continue
            acc = capture.accumulators[key]
            has_grad = block.weight in grad_of
            if acc.complete:
                if not self._update_block(key, block, acc):
                    self.diagnostics["rejected_statistics"] = 1.0
            elif has_grad:
                self._warn_silent_block(key, block, capture)
        capture.reset()

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
        warnings.warn(
            f"{type(self).__name__}: the curvature hooks of module '{block.name}' "
            f"({type(block.module).__name__}) never fired although its parameters have "
            "gradients; it is probably called through a functional path (e.g. "
            "MultiheadAttention.out_proj). It gets the fallback update "
            f"({FALLBACK_UPDATE}) until statistics arrive; exclude it with "
            f"attach(..., skip_modules=['{block.name}']) to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _kl_scale(
        self,
        directions: dict[Tensor, Tensor],
        grad_of: dict[Tensor, Tensor],
        group_of: dict[Tensor, dict[str, Any]],
    ) -> float:
        """KL-clip: ``min(1, sqrt(c / Σ lr² ⟨U, g⟩))``; bounds the step's predicted KL change."""
        if self.kl_clip is None:
            return 1.0
        vg = _total(
            group_of[p]["lr"] ** 2 * (directions[p].double() * g.double()).sum()
            for p, g in grad_of.items()
        )
        vg = abs(vg)
        if vg == 0.0 or not math.isfinite(vg):
            return 1.0
        return min(1.0, math.sqrt(self.kl_clip / vg))

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
                        buf.mul_(mu).add_(update)
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
        self, block: KroneckerBlock, factors: dict[str, Any], label: str = "factor"
    ) -> None:
        """Refuses a checkpoint whose factor ``name -> (tensor, n)`` is not ``(groups, n, n)``."""
        for name, (value, n) in factors.items():
            if value is not None and tuple(value.shape) != (block.groups, n, n):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {label} {name} of module "
                    f"'{block.name}' has shape {tuple(value.shape)}, expected "
                    f"{(block.groups, n, n)}; the checkpoint belongs to another model."
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
        super().load_state_dict(rest)
        if self.attached:
            self._load_grng_state(grng)
        else:
            self._pending_state = grng

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
        self._gate.wanted = self._curvature_due()
