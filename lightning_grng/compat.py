"""The only module of ``lightning_grng`` that touches private torch APIs.

The curvature capture relies on three things torch does not promise to keep:

* ``torch._C._current_graph_task_id()``: the id of the running backward (autograd graph task),
  which keys what one backward has staged (:func:`current_graph_task_id`);
* ``torch.autograd.Variable._execution_engine.queue_callback``: a callback at the end of the
  running backward, which forgets what it staged but never committed
  (:func:`queue_end_of_backward`);
* the module globals of ``F.multi_head_attention_forward``: a copy of it whose
  ``has_torch_function`` check answers False lets a TorchFunctionMode see the ``F.linear``
  calls inside (:func:`transparent_copy`, :func:`attention_forward`).

A torch release that changes one of them would not fail loudly: statistics would just go
missing. :func:`self_test` checks, once per process when a model is attached, that each still
behaves as relied on, and otherwise raises a ``RuntimeError`` that says which API changed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import FunctionType
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: torch releases the self-test and the test suite have passed on (named in the error message).
TESTED_TORCH = ("2.13",)


def current_graph_task_id() -> int:
    """Id of the running backward (autograd graph task).

    Hooks and callbacks of one backward see the same id; every backward gets a new one, and a
    backward run inside another (a reentrant checkpoint) has its own until it returns.

    Returns:
        The id (``-1`` outside a backward).
    """
    return int(torch._C._current_graph_task_id())


def queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Runs ``callback`` once, when the running backward has finished (after every hook and
    gradient accumulation of it, before ``backward()`` returns).

    Only valid inside a backward (from a tensor hook, say).

    Args:
        callback: called without arguments.
    """
    engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
    engine.queue_callback(callback)


def transparent_copy(fn: FunctionType) -> FunctionType:
    """A copy of a ``torch.nn.functional`` function that does not hand itself to
    ``__torch_function__`` overrides, so an active mode sees the operations inside it.

    Such a function first checks ``has_torch_function(...)`` and, if a TorchFunctionMode is
    active, passes itself to the mode as one call, which the mode then runs with itself
    switched off: the ``F.linear`` calls inside would never reach it. The copy shares the
    original's code, defaults and closure, and a copy of its module namespace in which
    ``has_torch_function`` answers False; torch itself is unchanged.

    Args:
        fn: a pure-Python function of ``torch.nn.functional``.

    Returns:
        The copy.
    """
    namespace = dict(fn.__globals__)
    namespace["has_torch_function"] = lambda *_: False
    clone = FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    return clone


@functools.cache
def _attention_copy() -> FunctionType:
    # Built on first use, not at import, so a torch that breaks the copy fails in self_test
    # with a clear message instead of making the package unimportable.
    return transparent_copy(F.multi_head_attention_forward)  # type: ignore[arg-type]


def attention_forward(*args: Any, **kwargs: Any) -> Any:
    """``F.multi_head_attention_forward`` whose inner ``F.linear`` calls an active
    TorchFunctionMode sees (:func:`transparent_copy` of it).

    Args:
        *args: as for ``F.multi_head_attention_forward``.
        **kwargs: as for ``F.multi_head_attention_forward``.

    Returns:
        What ``F.multi_head_attention_forward`` returns.
    """
    return _attention_copy()(*args, **kwargs)


# ---------------------------------------------------------------------------------- self-test
_TASK_ID = "torch._C._current_graph_task_id()"
_QUEUE = "torch.autograd.Variable._execution_engine.queue_callback()"
_COPY = (
    "the has_torch_function global of torch.nn.functional.multi_head_attention_forward "
    "(replaced in a copy of the function)"
)


class _ApiChangedError(Exception):
    """A relied-on API is missing or behaves differently: ``api`` and what was seen."""

    def __init__(self, api: str, what: str) -> None:
        super().__init__(what)
        self.api, self.what = api, what


def _expect(condition: bool, api: str, what: str) -> None:
    if not condition:
        raise _ApiChangedError(api, what)


def _task_id() -> int:
    try:
        return current_graph_task_id()
    except Exception as exc:
        raise _ApiChangedError(_TASK_ID, f"raised {type(exc).__name__} ({exc})") from exc


def _queue(callback: Callable[[], None]) -> None:
    try:
        queue_end_of_backward(callback)
    except Exception as exc:
        raise _ApiChangedError(_QUEUE, f"raised {type(exc).__name__} ({exc})") from exc


def _nested_backward_task() -> int:
    """Runs a backward inside the running one; the graph task id its hook sees."""
    seen: list[int] = []
    leaf = torch.ones(1, requires_grad=True)
    with torch.enable_grad():  # a backward runs its hooks with grad mode off
        out = leaf * 2.0
        loss = out.sum()
    out.register_hook(lambda grad: seen.append(_task_id()))
    torch.autograd.grad(loss, leaf)
    return seen[0]


def _one_backward(nested: bool) -> list[tuple[str, int]]:
    """One backward of a tiny graph: ``(event, graph task id)`` in the order they happened."""
    events: list[tuple[str, int]] = []
    weight = torch.ones(2, requires_grad=True)
    out = weight * torch.ones(2)

    def on_output_grad(grad: torch.Tensor) -> None:
        task = _task_id()
        events.append(("output", task))
        _queue(lambda: events.append(("end", task)))
        if nested:
            events.append(("nested", _nested_backward_task()))
            events.append(("after nested", _task_id()))

    out.register_hook(on_output_grad)
    weight.register_post_accumulate_grad_hook(lambda p: events.append(("accumulated", _task_id())))
    out.sum().backward()
    return events


def _check_backward() -> None:
    """Graph task ids and the end-of-backward callback, as capture.py uses them."""
    first = _one_backward(nested=True)
    names = [name for name, _ in first]
    _expect(
        names.count("end") == 1,
        _QUEUE,
        f"the queued callback ran {names.count('end')} times in a backward instead of once",
    )
    _expect(
        names[-1] == "end",
        _QUEUE,
        f"the queued callback did not run last in the backward (order: {names})",
    )
    ids = dict(first)
    _expect(
        all(isinstance(task, int) and task >= 0 for task in ids.values()),
        _TASK_ID,
        f"gave {ids} inside a backward instead of non-negative integer ids",
    )
    _expect(
        ids["output"] == ids["accumulated"] == ids["after nested"],
        _TASK_ID,
        f"gave different ids within one backward ({ids})",
    )
    _expect(
        ids["nested"] != ids["output"],
        _TASK_ID,
        "gave a backward run inside another the same id as the outer one",
    )
    second = dict(_one_backward(nested=False))
    _expect(
        second["output"] != ids["output"],
        _TASK_ID,
        "gave two successive backwards the same id",
    )


class _LinearWeights(TorchFunctionMode):
    """Records the weight of every ``F.linear`` call it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            self.weights.append(args[1] if len(args) > 1 else kwargs["weight"])
        return func(*args, **kwargs)


def _check_attention() -> None:
    """The attention copy runs, matches the original, and exposes its ``F.linear`` calls on
    ``in_proj_weight`` and ``out_proj.weight`` themselves (attention.py matches by identity)."""
    embed, heads = 4, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, embed, generator=gen)  # (sequence, batch, embedding)
    in_weight = torch.randn(3 * embed, embed, generator=gen, requires_grad=True)
    in_bias = torch.zeros(3 * embed, requires_grad=True)
    out_weight = torch.randn(embed, embed, generator=gen, requires_grad=True)
    out_bias = torch.zeros(embed, requires_grad=True)
    args = (x, x, x, embed, heads, in_weight, in_bias, None, None, False, 0.0, out_weight, out_bias)
    try:
        copy = _attention_copy()
        with _LinearWeights() as mode:
            out, _ = copy(*args, training=True, need_weights=False)
        expected, _ = F.multi_head_attention_forward(*args, training=True, need_weights=False)
    except Exception as exc:
        what = f"made the copy fail with {type(exc).__name__} ({exc})"
        raise _ApiChangedError(_COPY, what) from exc
    _expect(
        torch.equal(out, expected),
        _COPY,
        "made the copy compute a different result from the original",
    )
    seen = {id(w) for w in mode.weights}
    _expect(
        id(in_weight) in seen and id(out_weight) in seen,
        _COPY,
        "no longer lets a TorchFunctionMode see the copy's F.linear calls on in_proj_weight and "
        "out_proj.weight",
    )


def _failure(api: str, what: str) -> str:
    tested = ", ".join(TESTED_TORCH)
    return (
        f"lightning_grng cannot capture curvature statistics on torch {torch.__version__}: "
        f"{api} {what}; install a tested torch version ({tested}) or report this message to "
        "the lightning_grng maintainers."
    )


@functools.cache
def self_test() -> None:
    """Checks that every private torch API this package relies on still behaves as relied on.

    A tiny backward (two elements, with one backward nested in a hook) checks the graph task
    ids and the end-of-backward callback; a tiny attention forward checks the attention copy.
    It takes a few milliseconds and runs once per process (a pass is cached; a failure is
    not, so every attach raises it).

    Raises:
        RuntimeError: an API changed; one sentence naming the torch version, the API and what
            to do.
    """
    # A model may be attached under no_grad or inference_mode: the checks need autograd.
    with torch.inference_mode(False), torch.enable_grad():
        for check, api in ((_check_backward, _TASK_ID), (_check_attention, _COPY)):
            try:
                check()
            except _ApiChangedError as exc:
                raise RuntimeError(_failure(exc.api, exc.what)) from exc
            except Exception as exc:
                what = f"failed its check with {type(exc).__name__} ({exc})"
                raise RuntimeError(_failure(api, what)) from exc
