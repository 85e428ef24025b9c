"""Hooks that turn the training forward/backward into Kronecker factor statistics.

**Statistics accumulate exactly like gradients.** A pass counts only when its gradients reach
the ``.grad`` of the optimizer's parameters between ``zero_grad()`` and ``step()``:

* **Pending until the backward arrives.** A forward call of a block keeps its input aside
  (:class:`_Pass`); nothing is added to the statistics until a backward through that call
  accumulates into the block's weight ``.grad`` (a post-accumulate-grad hook commits it). A
  forward whose backward never comes (a metric computed with grad enabled), or a backward that
  leaves ``.grad`` alone (``autograd.grad(g_loss, generator_params)``), adds nothing.
* **Cleared with the gradients.** ``optimizer.zero_grad()`` drops the statistics of the window,
  and so does any ``zero_grad(set_to_none=True)`` of the model: a commit into a ``.grad`` that
  was ``None`` starts a new window.
* **Gated.** Forwards are recorded only while the owning optimizer wants statistics (a curvature
  step), the module is in training mode and autograd is recording. The optimizer closes the gate
  (:meth:`CaptureGate.paused`) around its own extra passes (RENG's double backward or its
  finite-difference re-evaluation), so they never feed G.
* **One backward per forward.** A forward call is committed once; a second, double-backward
  pass through the same graph is ignored. Its G comes from the backward that commits it, or
  from an earlier pass the optimizer designated (:meth:`CaptureGate.statistics_pass`: RENG's
  out-of-place inner gradient, the Monte-Carlo Fisher's sampled-label pass).
* **Averaged at the step boundary.** Several forwards/backwards before one optimizer step
  (gradient accumulation) add up; :meth:`FactorAccumulator.averaged` turns the sums into the
  batch factors (see ``docs/algorithms.md`` for the scale convention).

The output hook is a tensor hook rather than a module backward hook: it is safe with in-place
activations and is not confused by ``create_graph=True``. The hooks are bound to the modules and
parameters they were registered on: a ``copy.deepcopy`` (or pickle) of the model carries inert
copies, so training an EMA or mean-teacher copy never feeds the original optimizer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_grng import compat
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
        micro_batches: the number the training loop divides each micro-batch's loss by
            (Lightning's ``accumulate_grad_batches``); a window that ends after fewer backward
            passes (the last, partial one of an epoch) has its G rescaled to the batch it saw.
    """

    def __init__(self, fisher: FisherType = FisherType.EMPIRICAL) -> None:
        self.wanted = True
        self.fisher = fisher
        self.grad_scaler: Any = None
        self.micro_batches = 1
        self._paused = 0
        self._in_mc_pass = False
        self._in_statistics_pass = 0

    def unscale(self, grad: Tensor) -> Tensor:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return grad
        return grad / scaler.get_scale()

    @property
    def forward_open(self) -> bool:
        return self.wanted and self._paused == 0 and torch.is_grad_enabled()

    @property
    def paused_now(self) -> bool:
        return self._paused > 0

    @property
    def backward_open(self) -> bool:
        if not self.wanted or self._paused:
            return False
        return self._in_mc_pass if self.fisher is FisherType.MC else not self._in_mc_pass

    @property
    def designated(self) -> bool:
        """The current backward feeds G although it leaves ``.grad`` alone."""
        return self._in_mc_pass or self._in_statistics_pass > 0

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

    @contextmanager
    def statistics_pass(self) -> Iterator[None]:
        """Marks an out-of-place backward of the training loss (RENG's inner gradient) whose
        output gradients are the statistics of the ordinary backward that follows it."""
        self._in_statistics_pass += 1
        try:
            yield
        finally:
            self._in_statistics_pass -= 1


class FactorAccumulator:
    """Sums ``ā āᵀ`` and ``δ δᵀ`` over the passes of one optimizer step.

    Args:
        diagonal_in: for a block with a diagonal A (one-hot inputs), its ``n_in``: input rows
            are then indices ``(groups, rows)`` (``-1``: a zero row, e.g. a padding token) and
            ``a_sum`` holds their counts ``(groups, n_in)``, the diagonal of ``Σ ā āᵀ``;
            no dense ``n_in × n_in`` matrix is formed.
    """

    def __init__(self, diagonal_in: int | None = None) -> None:
        self.diagonal_in = diagonal_in
        self.reset()

    def reset(self) -> None:
        self.a_sum: Tensor | None = None
        self.a_rows = 0
        self.g_sum: Tensor | None = None
        self.g_samples = 0
        #: Backward passes committed since the last reset (micro-batches of the window).
        self.passes = 0

    @property
    def complete(self) -> bool:
        return self.a_sum is not None and self.g_sum is not None

    @staticmethod
    def _gram(rows: Tensor) -> Tensor:
        rows = rows.to(working_dtype(rows.dtype))
        return rows.transpose(-1, -2) @ rows

    def _counts(self, ids: Tensor) -> Tensor:
        n = self.diagonal_in
        assert n is not None
        # Counts are exact in float64 (a vector: the cost is nothing next to G).
        return torch.stack([torch.bincount(g[g >= 0], minlength=n).double() for g in ids])

    def add_input(self, rows: Tensor, samples: int) -> None:
        if self.diagonal_in is None:
            gram, n_rows = self._gram(rows), rows.shape[-2]
        else:
            gram, n_rows = self._counts(rows), rows.shape[-1]
        self.a_sum = gram if self.a_sum is None else self.a_sum + gram
        self.a_rows += n_rows

    def add_output_grad(self, rows: Tensor, samples: int) -> None:
        gram = self._gram(rows)
        self.g_sum = gram if self.g_sum is None else self.g_sum + gram
        self.g_samples += samples

    def scale_output_grads(self, factor: float) -> None:
        """Multiplies the ``δ δᵀ`` sum by ``factor`` (the output gradients by its root)."""
        if self.g_sum is not None:
            self.g_sum = self.g_sum * factor

    def averaged(self, reduction: LossReduction) -> tuple[Tensor, Tensor]:
        """Batch factors ``(A, G)``.

        ``A`` is the mean of ``ā āᵀ`` over all rows. The captured output gradients of a
        mean-reduced loss carry a factor ``1/N`` (N samples, all micro-batches together: the
        rows of a Linear, the images of a conv, :meth:`KroneckerBlock.samples`), so
        ``G = N · Σ δ δᵀ`` is the per-sample Fisher factor (a conv's positions summed, as in
        KFC); for a sum-reduced loss ``G = Σ δ δᵀ`` is the Fisher of the sum.
        """
        assert self.a_sum is not None and self.g_sum is not None
        A = self.a_sum / max(self.a_rows, 1)
        G = self.g_sum * self.g_samples if reduction is LossReduction.MEAN else self.g_sum
        return A, G


class BoundHook:
    """A hook that belongs to one registration; its copies are inert.

    ``copy.deepcopy`` of a module copies its hook dictionaries; a plain closure would be shared
    by the copy and keep feeding the original optimizer. Copies (deepcopy, pickle) of a
    BoundHook do nothing and hold no reference to the optimizer.

    Attributes:
        owner: the optimizer the hook feeds (None for an inert copy).
    """

    def __init__(self, fn: Callable[..., Any] | None, owner: Any = None) -> None:
        self.fn = fn
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return None if self.fn is None else self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> BoundHook:
        return BoundHook(None)

    def __reduce__(self) -> tuple[type[BoundHook], tuple[None]]:
        return (BoundHook, (None,))


class _Pass:
    """One forward use of one block, waiting for the backward that commits it.

    ``part`` is the groups the use fed (None: all) and ``call`` the token its forward shares
    with the other uses that fed the remaining groups (``MultiheadAttention``'s separate q, k
    and v projections); a use that feeds all groups is its own call. A ``str`` part labels a
    kind of use of a weight used in several ways (a tied embedding's lookup and output map):
    its rows reach the accumulator as ``(label, rows)``, so it keeps the uses apart.
    """

    __slots__ = ("batch", "call", "committed", "g", "g_designated", "g_task", "part", "seq", "x")

    def __init__(
        self, x: Any, batch: int, seq: int, part: slice | str | None = None, call: Any = None
    ) -> None:
        self.x: Any = x
        self.batch = batch
        self.seq = seq
        self.part = part
        self.call = seq if call is None else call
        self.g: Tensor | None = None
        self.g_task = -1
        self.g_designated = False
        self.committed = False


class _Staged:
    """What one backward pass (autograd graph task) has seen so far."""

    def __init__(self) -> None:
        self.passes: dict[str, list[_Pass]] = {}
        self.fresh: set[str] = set()  # blocks whose weight had no .grad: a new window


class CurvatureCapture:
    """Forward, output-gradient and gradient-accumulation hooks on the blocks of one optimizer.

    Args:
        blocks: the blocks to observe, keyed by the optimizer's block key.
        accumulators: one statistics sink per block (same keys); anything with ``reset``,
            ``add_input``, ``add_output_grad`` and a ``passes`` counter.
        gate: the gate shared with the optimizer.
        owner: the optimizer (named by the hooks, so a second optimizer over the same
            parameters can be refused).

    Raises:
        RuntimeError: this torch changed a private API the hooks rely on
            (:func:`lightning_grng.compat.self_test`).
    """

    def __init__(
        self,
        blocks: dict[str, KroneckerBlock],
        accumulators: dict[str, Any],
        gate: CaptureGate,
        owner: Any = None,
    ) -> None:
        # Raises (once per process, in milliseconds) if a private torch API the hooks rely on
        # changed. Here rather than in register(): the optimizer keeps no capture, so it is
        # not left looking attached.
        compat.self_test()
        self.blocks = blocks
        self.accumulators = accumulators
        self.gate = gate
        self.owner = owner
        self.fired_forward: set[str] = set()
        self.fired_backward: set[str] = set()
        #: Blocks called in eval mode with autograd recording since the last reset.
        self.eval_forward: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._staged: dict[int, _Staged] = {}
        self._seq = itertools.count()

    def register(self, model: nn.Module | None = None) -> None:
        """Registers the hooks; ``model`` gets an inert marker naming the owner."""
        if model is not None:
            self._handles.append(model.register_forward_pre_hook(BoundHook(None, self.owner)))
        for key, block in self.blocks.items():
            self._handles += block.register_capture(self._record(key), self._bind)
            commit = BoundHook(self._commit_hook(key), self.owner)
            self._handles.append(block.weight.register_post_accumulate_grad_hook(commit))

    def _bind(self, fn: Callable[..., Any]) -> BoundHook:
        return BoundHook(fn, self.owner)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def registered(self) -> bool:
        return bool(self._handles)

    def reset(self) -> None:
        """Drops the statistics gathered since the last step (or ``zero_grad``)."""
        for acc in self.accumulators.values():
            acc.reset()
        self.fired_forward.clear()
        self.fired_backward.clear()
        self.eval_forward.clear()

    # ------------------------------------------------------------------ forward: pending
    def _record(self, key: str) -> Callable[..., None]:
        """What a block's forward capture calls for each use of its weight (a ForwardRecord)."""

        def record(
            module: nn.Module,
            x: Any,
            output: Any,
            batch: int,
            part: slice | str | None = None,
            call: Any = None,
        ) -> None:
            if not self.gate.forward_open:
                return
            if not module.training:
                self.eval_forward.add(key)
                return
            if not (isinstance(output, Tensor) and output.requires_grad):
                return
            # The input is saved by autograd for the weight gradient anyway: keeping it costs
            # no memory while the graph lives, and the rows are formed only if a backward comes.
            if isinstance(x, Tensor):
                x = x.detach()
            pending = _Pass(x, batch, next(self._seq), part, call)
            output.register_hook(self._output_hook(key, pending))

        return record

    # ------------------------------------------------------------------ backward: staged
    def _output_hook(self, key: str, pending: _Pass) -> Callable[[Tensor], None]:
        block = self.blocks[key]

        def hook(grad: Tensor) -> None:
            if pending.committed:
                return  # a double backward through a graph already counted
            task = compat.current_graph_task_id()
            gate = self.gate
            stale = pending.g_task != task and not pending.g_designated
            if gate.backward_open and (pending.g is None or stale):
                pending.g = block.output_grad_rows(gate.unscale(grad.detach()))
                pending.g_task, pending.g_designated = task, gate.designated
            staged = self._staged.get(task)
            if staged is None:
                staged = self._staged[task] = _Staged()
                compat.queue_end_of_backward(lambda: self._end_of_backward(task))
            waiting = staged.passes.setdefault(key, [])
            if pending not in waiting:
                waiting.append(pending)
            if block.weight.grad is None:
                staged.fresh.add(key)

        return hook

    def _end_of_backward(self, task: int) -> None:
        """Forgets what a backward staged but never committed (it left ``.grad`` alone)."""
        staged = self._staged.pop(task, None)
        if staged is None:
            return
        for waiting in staged.passes.values():
            for pending in waiting:
                if pending.g_task == task and not pending.g_designated:
                    pending.g = None

    # ------------------------------------------------------------------ .grad: committed
    def _commit_hook(self, key: str) -> Callable[[Tensor], None]:
        block = self.blocks[key]
        acc = self.accumulators[key]

        def hook(param: Tensor) -> None:
            if param is not block.weight:
                return
            staged = self._staged.get(compat.current_graph_task_id())
            if staged is None:
                return
            waiting = staged.passes.pop(key, None)
            if not waiting:
                return
            if key in staged.fresh:
                # .grad was empty before this backward (zero_grad of the model or the
                # optimizer): whatever was gathered before belongs to cleared gradients.
                acc.reset()
                self.fired_forward.discard(key)
                self.fired_backward.discard(key)
            waiting.sort(key=lambda p: p.seq)
            # Inputs in forward order, output gradients in backward order: the order in which
            # the forward and backward produce them.
            calls: dict[Any, list[_Pass]] = {}
            for pending in waiting:
                calls.setdefault(pending.call, []).append(pending)
            g_rows: list[tuple[Tensor, int]] = []
            for uses in calls.values():
                rows = self._rows(block, uses)
                if rows is None:
                    continue
                a, g = rows
                # Groups joined from separate calls are expressed over their common row count
                # (KroneckerBlock.joined_rows), which is then also their sample count.
                samples = uses[0].batch if len(uses) == 1 else a.shape[-2]
                acc.add_input(a, samples)
                if g is not None:
                    g_rows.append((g, samples))
            for g, batch in reversed(g_rows):
                acc.add_output_grad(g, batch)
            for pending in waiting:
                pending.committed = True
                pending.x = pending.g = None
            self.fired_forward.add(key)
            if g_rows:
                self.fired_backward.add(key)
                acc.passes += 1

        return hook

    @staticmethod
    def _rows(block: KroneckerBlock, uses: list[_Pass]) -> tuple[Any, Any] | None:
        """Input rows and output-gradient rows (None without a backward) of one forward; None
        when the backward reached the uses of only some of its groups (nothing to count).
        A labelled use (:class:`_Pass`) gives ``(label, rows)`` pairs."""
        if len(uses) == 1 and not isinstance(uses[0].part, slice):
            use = uses[0]
            a, g = block.input_rows(use.x), use.g
            if use.part is None:
                return a, g
            return (use.part, a), None if g is None else (use.part, g)
        fed = sum(block.groups if u.part is None else u.part.stop - u.part.start for u in uses)
        if fed != block.groups:
            return None
        if any(u.g is None for u in uses):
            a, _ = block.joined_rows([(u.part, u.x, None) for u in uses])
            return a, None
        return block.joined_rows([(u.part, u.x, u.g) for u in uses])
