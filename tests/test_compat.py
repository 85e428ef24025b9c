"""The private torch APIs of ``lightning_grng.compat`` and the self-test that guards them."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_grng
from lightning_grng import compat


@pytest.fixture(autouse=True)
def fresh_compat(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts and ends with no cached self-test result or attention copy (a test
    that broke an API must not leave its broken copy to the next test)."""
    compat.self_test.cache_clear()
    compat._attention_copy.cache_clear()
    yield
    compat.self_test.cache_clear()
    compat._attention_copy.cache_clear()


def _failure(api: str) -> str:
    """A pattern for the self-test's message about ``api``."""
    return rf"torch {re.escape(torch.__version__)}: .*{re.escape(api)}"


def _fails(api: str) -> str:
    with pytest.raises(RuntimeError, match=_failure(api)) as info:
        compat.self_test()
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")
    assert "install a tested torch version" in message
    return message


class _Engine:
    """The autograd engine with ``queue_callback`` replaced (everything else is the real one)."""

    def __init__(self, real: Any, queue_callback: Callable[..., None] | None) -> None:
        self._real = real
        self._queue = queue_callback

    def __getattr__(self, name: str) -> Any:
        if name == "queue_callback":
            if self._queue is None:
                raise AttributeError(name)
            return self._queue
        return getattr(self._real, name)


def _patch_engine(
    monkeypatch: pytest.MonkeyPatch, queue_callback: Callable[..., None] | None
) -> None:
    real = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
    monkeypatch.setattr(torch.autograd.Variable, "_execution_engine", _Engine(real, queue_callback))


# ---------------------------------------------------------------------------- on this torch
def test_self_test_passes_and_runs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    check = compat._check_backward

    def counted() -> None:
        calls.append("backward")
        check()

    monkeypatch.setattr(compat, "_check_backward", counted)
    compat.self_test()
    compat.self_test()
    assert calls == ["backward"]


def test_graph_task_ids_and_callback_order() -> None:
    events = compat._one_backward(nested=True)
    assert [name for name, _ in events] == [
        "output",
        "nested",
        "after nested",
        "accumulated",
        "end",
    ]
    ids = dict(events)
    assert ids["output"] == ids["accumulated"] == ids["end"] != ids["nested"]
    assert compat.current_graph_task_id() == -1  # outside a backward


def test_attention_forward_matches_original_and_exposes_linear() -> None:
    attention = nn.MultiheadAttention(6, 2)
    x = torch.randn(4, 3, 6)
    args = (x, x, x, 6, 2, attention.in_proj_weight, attention.in_proj_bias, None, None)
    args += (False, 0.0, attention.out_proj.weight, attention.out_proj.bias)
    expected, _ = F.multi_head_attention_forward(*args, need_weights=False)

    with compat._LinearWeights() as mode:
        out, _ = compat.attention_forward(*args, need_weights=False)
    assert torch.equal(out, expected)
    assert [id(w) for w in mode.weights] == [
        id(attention.in_proj_weight),
        id(attention.out_proj.weight),
    ]

    with compat._LinearWeights() as mode:  # the original hides them: why the copy exists
        F.multi_head_attention_forward(*args, need_weights=False)
    assert mode.weights == []


# ------------------------------------------------------------------------ a changed torch
def test_missing_graph_task_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    message = _fails("torch._C._current_graph_task_id()")
    assert "AttributeError" in message


@pytest.mark.parametrize(
    ("task_id", "problem"),
    [
        (lambda: 7, "the same id"),
        (iter(range(100, 1000)).__next__, "different ids within one backward"),
        (lambda: -1, "non-negative integer ids"),
    ],
    ids=["constant", "new-every-call", "outside-only"],
)
def test_graph_task_id_behaves_differently(
    monkeypatch: pytest.MonkeyPatch, task_id: Callable[[], int], problem: str
) -> None:
    monkeypatch.setattr(torch._C, "_current_graph_task_id", task_id)
    assert problem in _fails("torch._C._current_graph_task_id()")


def test_queued_callback_never_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_engine(monkeypatch, lambda callback: None)
    assert "ran 0 times" in _fails("_execution_engine.queue_callback()")


def test_queued_callback_fires_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_engine(monkeypatch, lambda callback: callback())
    assert "did not run last" in _fails("_execution_engine.queue_callback()")


def test_queue_callback_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_engine(monkeypatch, None)
    assert "AttributeError" in _fails("_execution_engine.queue_callback()")


def test_attention_copy_hides_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    # A torch whose attention no longer consults the patched global: the copy is the original.
    monkeypatch.setattr(compat, "transparent_copy", lambda fn: fn)
    message = _fails("has_torch_function global of torch.nn.functional.multi_head_attention")
    assert "F.linear calls" in message


def test_attention_not_a_python_function(monkeypatch: pytest.MonkeyPatch) -> None:
    # A torch whose attention is a wrapper (or C++): there are no globals to copy.
    wrapped = functools.partial(F.multi_head_attention_forward)
    monkeypatch.setattr(F, "multi_head_attention_forward", wrapped)
    assert "AttributeError" in _fails("multi_head_attention_forward")


def test_attention_copy_computes_something_else(monkeypatch: pytest.MonkeyPatch) -> None:
    original = compat.transparent_copy

    def off_by_one(fn: Any) -> Callable[..., Any]:
        copy = original(fn)
        return lambda *a, **k: (lambda out: (out[0] + 1, out[1]))(copy(*a, **k))

    monkeypatch.setattr(compat, "transparent_copy", off_by_one)
    assert "different result" in _fails("multi_head_attention_forward")


# --------------------------------------------------------------------------------- attach
def test_attach_runs_the_self_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    model = nn.Linear(3, 2)
    optimizer = lightning_grng.KFAC(model.parameters())
    with pytest.raises(RuntimeError, match=_failure("torch._C._current_graph_task_id()")):
        lightning_grng.attach(model, optimizer, report=False)
    assert not optimizer.attached
    assert not model._forward_pre_hooks and model.weight._post_accumulate_grad_hooks is None

    monkeypatch.undo()  # the API is back: the same optimizer attaches
    handle = lightning_grng.attach(model, optimizer, report=False)
    assert optimizer.attached and handle.coverage.layers == 1
    handle.remove()


def test_attach_tests_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    check = compat._check_attention

    def counted() -> None:
        calls.append("attention")
        check()

    monkeypatch.setattr(compat, "_check_attention", counted)
    for _ in range(3):
        model = nn.Linear(3, 2)
        lightning_grng.attach(model, lightning_grng.KFAC(model.parameters()), report=False)
    assert calls == ["attention"]
