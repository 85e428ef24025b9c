"""Counting host synchronisations deterministically, on any device.

A host synchronisation is any operation whose Python result depends on a tensor's value:
the host must wait for the device to finish everything queued before it. On a GPU each one
stalls the launch queue, so the optimizers' hot path budgets them (``docs/algorithms.md``,
"Host synchronisations"). Timing cannot count them reliably; a
:class:`torch.overrides.TorchFunctionMode` can: every such read passes through
``__torch_function__``, on CPU as on CUDA, so the count is the same everywhere.

Not visible to this mode: synchronisations inside a kernel's C++ implementation (e.g. the
``info`` check of ``torch.linalg.eigh`` on CUDA) and collectives of ``torch.distributed``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: Functions and methods whose result is a host value computed from tensor data.
SYNC_FUNCTIONS: dict[Callable[..., Any], str] = {
    Tensor.item: "item",
    Tensor.__bool__: "bool",
    Tensor.__float__: "float",
    Tensor.__int__: "int",
    Tensor.__index__: "index",
    Tensor.__complex__: "complex",
    Tensor.tolist: "tolist",
    Tensor.__format__: "format",
    Tensor.__repr__: "repr",
    Tensor.numpy: "numpy",
    Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.argwhere: "nonzero",
    Tensor.argwhere: "nonzero",
    torch.equal: "equal",
    Tensor.equal: "equal",
    torch.allclose: "allclose",
    Tensor.allclose: "allclose",
    torch.masked_select: "masked_select",
    Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    Tensor.unique: "unique",
}


def _bool_index(args: tuple[Any, ...]) -> bool:
    """Whether ``x[index]`` uses a boolean mask (its output size needs the mask's count)."""
    if len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in index)


class SyncCounter(TorchFunctionMode):
    """Counts host synchronisations while active (``with SyncCounter() as c: ...``).

    Attributes:
        total: synchronisations counted.
        by_kind: counts by kind (``"item"``, ``"bool"``, ``"tolist"``, ...).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_kind: Counter[str] = Counter()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kind = SYNC_FUNCTIONS.get(func)
        if kind is None and func is Tensor.__getitem__ and _bool_index(args):
            kind = "bool_index"
        if kind is not None:
            self.total += 1
            self.by_kind[kind] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    """Context manager form of :class:`SyncCounter`."""
    with SyncCounter() as counter:
        yield counter
