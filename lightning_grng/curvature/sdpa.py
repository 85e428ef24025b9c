"""Attention that RENG's double backprop can differentiate twice.

``F.scaled_dot_product_attention`` (used by Hugging Face models by default, and by
``nn.MultiheadAttention`` when no weights are returned) dispatches to a fused kernel: on CPU a
flash kernel whose backward has no derivative (``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``), on CUDA flash
or memory-efficient kernels in the same situation. RENG's ``loss.backward(create_graph=True)``
differentiates that backward again, so it fails. The math backend composes the attention from
matmuls and a softmax, whose backward is differentiable: :func:`use_math_sdpa` makes a model's
training forwards use it. The kernel is chosen in the forward (the backward follows the recorded
ops), so the forward is where it is set.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from lightning_grng.curvature.capture import BoundHook


def math_only_sdpa() -> contextlib.AbstractContextManager[Any]:
    """A context in which ``scaled_dot_product_attention`` runs the math backend (whose
    backward is differentiable), on every device."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the older switch (the same global flags)
        return torch.backends.cuda.sdp_kernel(  # type: ignore[attr-defined]
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )
    return sdpa_kernel([SDPBackend.MATH])


class MathSDPAHandle:
    """What :func:`use_math_sdpa` returns; :meth:`remove` takes its hooks off."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MathSDPAHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _Switch:
    """The first training forward with grad enabled among the hooked modules enters the
    math-only setting and leaves it when that forward returns or raises; the hooked calls nested
    in it (the root's children inside the root) add nothing."""

    def __init__(self) -> None:
        self._setting: contextlib.ExitStack | None = None
        self._opened: list[bool] = []  # per running hooked call: whether it entered the setting

    def enter(self, module: nn.Module, args: Any) -> None:
        first = self._setting is None and module.training and torch.is_grad_enabled()
        if first:
            self._setting = contextlib.ExitStack()
            self._setting.enter_context(math_only_sdpa())
        self._opened.append(first)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._opened and self._opened.pop() and self._setting is not None:
            self._setting.close()
            self._setting = None


def use_math_sdpa(model: nn.Module) -> MathSDPAHandle:
    """Makes the training forwards of ``model`` (training mode, grad enabled) run
    ``scaled_dot_product_attention`` with the math backend, so their graph can be
    differentiated twice (RENG's ``loss.backward(create_graph=True)``).

    A forward pre-hook enters :func:`math_only_sdpa`; a forward hook registered with
    ``always_call=True`` leaves it, also when the forward raises. The hooks sit on ``model`` and
    on its direct children, so a training step that calls a submodule rather than the model
    itself (a LightningModule's ``training_step`` calling ``self.net``) is covered too; attention
    called from anywhere else must run inside :func:`math_only_sdpa`. Evaluation and
    ``no_grad`` forwards keep the fused kernels. The setting is global while the forward runs,
    as ``sdpa_kernel`` is. Copies of the model (``copy.deepcopy``, pickle) carry inert hooks.

    Args:
        model: the module whose ``__call__`` (or its children's) runs the training forward.

    Returns:
        A handle whose ``remove()`` takes the hooks off.
    """
    switch = _Switch()
    handles = []
    for module in (model, *model.children()):
        handles += [
            module.register_forward_pre_hook(BoundHook(switch.enter), prepend=True),
            module.register_forward_hook(BoundHook(switch.leave), always_call=True),
        ]
    return MathSDPAHandle(handles)
