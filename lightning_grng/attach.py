"""``attach(model, optimizer)``: the plain-PyTorch entry point that registers the hooks."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.conv import Conv2dBlock
from lightning_grng.curvature.linear import LinearBlock
from lightning_grng.optim.base import FALLBACK_UPDATE, GRNGOptimizer

_BLOCK_TYPES: tuple[tuple[type[nn.Module], type[KroneckerBlock]], ...] = (
    (nn.Linear, LinearBlock),
    (nn.Conv2d, Conv2dBlock),
)


class CurvatureHandle:
    """What :func:`attach` returns; :meth:`remove` takes the hooks off again.

    Attributes:
        optimizer: the optimizer the hooks feed.
        blocks: module name -> Kronecker block.
        unsupported: names of trainable modules that get the fallback update.
    """

    def __init__(
        self, optimizer: GRNGOptimizer, blocks: dict[str, KroneckerBlock], unsupported: list[str]
    ) -> None:
        self.optimizer = optimizer
        self.blocks = {block.name: block for block in blocks.values()}
        self.unsupported = unsupported

    def remove(self) -> None:
        """Removes the hooks; the optimizer keeps its curvature state (re-attaching resumes)."""
        self.optimizer._detach()


def _block_for(module: nn.Module, name: str, with_bias: bool) -> KroneckerBlock | None:
    for module_type, block_type in _BLOCK_TYPES:
        if isinstance(module, module_type):
            return block_type(module, name, with_bias=with_bias)  # type: ignore[call-arg]
    return None


def attach(
    model: nn.Module,
    optimizer: GRNGOptimizer,
    skip_modules: Iterable[str] = (),
    grad_scaler: Any = None,
) -> CurvatureHandle:
    """Registers the curvature hooks of ``optimizer`` on the layers of ``model``.

    Every ``nn.Linear`` / ``nn.Conv2d`` whose weight the optimizer trains gets a Kronecker block.
    Other trainable modules (norm layers, embeddings, bare parameters) are named in one warning
    and get the fallback update. Attaching the same model twice returns the existing handle.

    Args:
        model: the model whose forward/backward passes feed the curvature.
        optimizer: a lightning_grng optimizer over (some of) the model's parameters.
        skip_modules: qualified module names (or class names) to leave without a block.
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 AMP loop, so the curvature is
            built from unscaled gradients (``GradScaler.unscale_`` only unscales ``.grad``).

    Returns:
        A :class:`CurvatureHandle`; call ``handle.remove()`` to take the hooks off.
    """
    if not isinstance(optimizer, GRNGOptimizer):
        raise TypeError(
            f"attach() needs a lightning_grng optimizer (KFAC, RING, RENG, RKalman), got "
            f"{type(optimizer).__name__}."
        )
    if optimizer.attached:
        if optimizer._model is model:
            return CurvatureHandle(optimizer, optimizer.blocks, [])
        raise RuntimeError(
            f"{type(optimizer).__name__} is already attached to another model; call "
            "handle.remove() on the first handle before attaching again."
        )
    skip = set(skip_modules)
    index = {p: i for i, p in enumerate(optimizer.flat_params())}
    blocks: dict[str, KroneckerBlock] = {}
    covered: set[nn.Parameter] = set()
    for name, module in model.named_modules():
        if name in skip or type(module).__name__ in skip:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight not in index or not weight.requires_grad:
            continue
        bias = getattr(module, "bias", None)
        with_bias = isinstance(bias, nn.Parameter) and bias in index and bias.requires_grad
        block = _block_for(module, name, with_bias)
        if block is not None:
            blocks[str(index[weight])] = block
            covered.update(block.params())

    unsupported = [
        f"'{name or '<root>'}' ({type(module).__name__})"
        for name, module in model.named_modules()
        if any(
            p in index and p.requires_grad and p not in covered
            for p in module.parameters(recurse=False)
        )
    ]
    if unsupported:
        warnings.warn(
            f"{type(optimizer).__name__}: no Kronecker block for {', '.join(unsupported)}; "
            f"their parameters get the fallback update ({FALLBACK_UPDATE}).",
            UserWarning,
            stacklevel=2,
        )
    if not blocks:
        warnings.warn(
            f"{type(optimizer).__name__}: the model has no nn.Linear or nn.Conv2d layer the "
            "optimizer trains, so every parameter gets the fallback update.",
            UserWarning,
            stacklevel=2,
        )
    optimizer._gate.grad_scaler = grad_scaler
    optimizer._attach(model, blocks)
    return CurvatureHandle(optimizer, blocks, unsupported)
