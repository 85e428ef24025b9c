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

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _math_only() -> contextlib.AbstractContextManager[Any]:
        return sdpa_kernel([SDPBackend.MATH])

except ImportError:  # torch < 2.3: the older switch (the same global flags)

    def _math_only() -> contextlib.AbstractContextManager[Any]:
        return torch.backends.cuda.sdp_kernel(  # type: ignore[attr-defined]
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )


class MathSDPAHandle:
    """What :func:`use_math_sdpa` returns; :meth:`remove` takes its two hooks off."""

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
    """Enters the math-only setting for a training forward with grad enabled and leaves it when
    that forward returns or raises; nested and re-entrant calls each get their own entry."""

    def __init__(self) -> None:
        self._entered: list[contextlib.ExitStack] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        stack = contextlib.ExitStack()
        if module.training and torch.is_grad_enabled():
            stack.enter_context(_math_only())
        self._entered.append(stack)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._entered:
            self._entered.pop().close()


def use_math_sdpa(model: nn.Module) -> MathSDPAHandle:
    """Makes the training forwards of ``model`` (training mode, grad enabled) run
    ``scaled_dot_product_attention`` with the math backend, so their graph can be
    differentiated twice (RENG's ``loss.backward(create_graph=True)``).

    A forward pre-hook on ``model`` enters ``sdpa_kernel([SDPBackend.MATH])``; a forward hook
    registered with ``always_call=True`` leaves it, also when the forward raises. Evaluation and
    ``no_grad`` forwards keep the fused kernels. The setting is global while the forward runs,
    as ``sdpa_kernel`` is. Copies of the model (``copy.deepcopy``, pickle) carry inert hooks.

    Args:
        model: the module whose ``__call__`` runs the training forward.

    Returns:
        A handle whose ``remove()`` takes the hooks off.
    """
    switch = _Switch()
    return MathSDPAHandle(
        [
            model.register_forward_pre_hook(BoundHook(switch.enter), prepend=True),
            model.register_forward_hook(BoundHook(switch.leave), always_call=True),
        ]
    )
