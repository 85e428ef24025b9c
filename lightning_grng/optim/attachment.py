"""How an optimizer is bound to a model: the hooks of its blocks, the handles that hold them,
and, under DDP, which rank owns which block."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.capture import CurvatureCapture
from lightning_grng.distributed.collectives import shape_cost


class AttachmentMixin(Optimizer):
    """The attachment half of :class:`~lightning_grng.GRNGOptimizer` (used by
    :func:`lightning_grng.attach`, the Lightning callback and the DDP strategy)."""

    # Provided by GRNGOptimizer; declared here for readers.
    _blocks: dict[str, KroneckerBlock]
    _capture: CurvatureCapture | None
    _model: nn.Module | None
    _handles: list[Any]
    _model_hooks: list[Any]
    _frozen_at_attach: dict[Tensor, str]
    _sharding: Any
    _gate: Any

    # ------------------------------------------------------------------ attaching
    @property
    def attached(self) -> bool:
        return self._capture is not None

    @property
    def model(self) -> nn.Module | None:
        """The model the hooks are attached to (None when detached)."""
        return self._model

    @property
    def blocks(self) -> dict[str, KroneckerBlock]:
        """The Kronecker blocks, keyed by the index of their weight in the optimizer."""
        return self._blocks

    @property
    def handles(self) -> tuple[Any, ...]:
        """The live :class:`~lightning_grng.CurvatureHandle` objects of the attachment."""
        return tuple(self._handles)

    @property
    def captures_activations(self) -> bool:
        """Whether the curvature comes from hooks on the layers (inputs, output gradients)."""
        return True

    def refusal(self, block: KroneckerBlock) -> str | None:
        """Why this optimizer cannot use ``block`` (its parameters then get the fallback), or
        None. Every block is usable by default."""
        return None

    def _new_accumulator(self, block: KroneckerBlock) -> Any:
        raise NotImplementedError

    def attach_hooks(
        self,
        model: nn.Module,
        blocks: dict[str, KroneckerBlock],
        frozen: dict[Tensor, str] | None = None,
        grad_scaler: Any = None,
    ) -> CurvatureCapture:
        """Registers the hooks of ``blocks`` (called by :func:`lightning_grng.attach`).

        A curvature state loaded before attaching is applied now; if it does not fit the
        model, nothing is attached and the optimizer is left as it was before that load.
        """
        self._apply_pending_state(blocks)
        self._model = model
        self._frozen_at_attach = dict(frozen or {})
        # Gradient statistics need no hooks on the layers: the capture then observes no block.
        observed = blocks if self.captures_activations else {}
        accumulators = {key: self._new_accumulator(block) for key, block in observed.items()}
        self._capture = CurvatureCapture(observed, accumulators, self._gate, owner=self)
        self._capture.register(model)
        self._model_hooks = self._hooks_on_model(model)
        self._gate.wanted = self._curvature_due()
        self._gate.grad_scaler = grad_scaler
        return self._capture

    def _hooks_on_model(self, model: nn.Module) -> list[Any]:
        """Hooks the optimizer needs on the model besides the capture (RENG: attention that its
        double backprop can differentiate); removed with the capture."""
        return []

    def add_handle(self, handle: Any) -> None:
        self._handles.append(handle)

    def release(self, handle: Any) -> None:
        """One handle is removed; the hooks go when no handle of this attachment is left."""
        if handle not in self._handles:
            return
        self._handles.remove(handle)
        if not self._handles:
            self.detach_hooks()

    def detach_hooks(self) -> None:
        """Removes every hook; the curvature state stays (re-attaching resumes)."""
        if self._capture is not None:
            self._capture.remove()
        for hook in self._model_hooks:
            hook.remove()
        self._model_hooks = []
        self._capture = None
        self._model = None
        self._handles.clear()

    def _require_attached(self) -> CurvatureCapture:
        if self._capture is None:
            name = type(self).__name__
            raise RuntimeError(
                f"{name} has no curvature hooks: call `lightning_grng.attach(model, optimizer)` "
                "before training in plain PyTorch, or add `lightning_grng.GRNGCallback()` to the "
                "Trainer's callbacks (it is added automatically when lightning-grng is installed)."
            )
        return self._capture

    # ------------------------------------------------------------------ sharding (DDP)
    def use_sharding(self, sharding: Any) -> None:
        """Shards the curvature over ranks (:class:`~lightning_grng.distributed.Sharding`; set
        by :class:`~lightning_grng.GRNGDDPStrategy`); None or one rank: a single process."""
        self._sharding = sharding if sharding is not None and sharding.world_size > 1 else None

    def _sharding_bound(self) -> Any:
        """The sharding, bound to the current blocks; None in a single process."""
        if self._sharding is not None:
            self._sharding.bind(self._blocks, self._refresh_cost)
        return self._sharding

    def _refresh_cost(self, block: KroneckerBlock) -> float:
        """The modelled refresh cost of ``block`` that balances owners across ranks: its
        shape's (:func:`~lightning_grng.distributed.collectives.shape_cost`); an optimizer that
        keeps other factors diagonal or split says so by overriding this."""
        return shape_cost(block)

    def _owns(self, key: str) -> bool:
        """Whether this process keeps block ``key``'s curvature (always, in one process)."""
        sharding = self._sharding_bound()
        return sharding is None or bool(sharding.owns(key))

    def _reduce_statistics(self, capture: CurvatureCapture) -> None:
        """Brings every block's statistics of all ranks to its owner (DDP only)."""
        self._sharding_bound().reduce_factor_statistics(self._blocks, capture.accumulators)

    def factor_bytes(self) -> int:
        """Bytes of the curvature tensors this process holds (factors, inverses, filters)."""
        return sum(
            v.numel() * v.element_size()
            for key in self._blocks
            for v in self._block_state(key).values()
            if isinstance(v, Tensor)
        )
