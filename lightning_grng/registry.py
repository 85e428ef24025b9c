"""Which layer types get a Kronecker block: the built-ins and the user's registrations.

A *block factory* is called by :func:`~lightning_grng.attach` as
``factory(module, name, trainable)`` for every module of a registered type, where
``trainable(p)`` says whether the optimizer trains parameter ``p`` (False for None). It returns a
:class:`~lightning_grng.curvature.KroneckerBlock`, an
:class:`~lightning_grng.curvature.Unsupported` (the module gets the fallback update, and the
reason is said in attach's warning), a list of either (a module with several weights), or None.

A module whose class has no registered type along its MRO is then matched by structure: a
transposed linear layer (Hugging Face's ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape
``(in, out)``, see :mod:`lightning_grng.curvature.transposed_linear`) gets its block without any
registration and without importing transformers. Registering its type (with a factory returning
None to leave it to the fallback) takes precedence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

from torch import Tensor, nn

from lightning_grng.curvature.attention import attention_blocks
from lightning_grng.curvature.block import KroneckerBlock, Unsupported
from lightning_grng.curvature.conv import Conv1dBlock, Conv2dBlock
from lightning_grng.curvature.embedding import EmbeddingBlock
from lightning_grng.curvature.linear import LinearBlock
from lightning_grng.curvature.transposed_linear import (
    is_transposed_linear,
    transposed_linear_blocks,
)

#: What a block factory returns (see the module docstring).
FactoryResult: TypeAlias = (
    KroneckerBlock | Unsupported | Sequence[KroneckerBlock | Unsupported] | None
)
#: ``factory(module, name, trainable) -> FactoryResult``.
BlockFactory: TypeAlias = Callable[[nn.Module, str, Callable[[Tensor | None], bool]], FactoryResult]

_BUILT_IN: dict[type[nn.Module], BlockFactory] = {}
_USER: dict[type[nn.Module], BlockFactory] = {}
#: ``(predicate, factory)``: tried in order for a module whose class matched no registered type.
_STRUCTURAL: list[tuple[Callable[[nn.Module], bool], BlockFactory]] = [
    (is_transposed_linear, transposed_linear_blocks),  # type: ignore[list-item]
]


def _embedding(module: nn.Module, name: str, trainable: Callable[..., bool]) -> FactoryResult:
    reason = EmbeddingBlock.unsupported(module)  # type: ignore[arg-type]
    if reason is not None:
        return Unsupported(reason, (module.weight,))  # type: ignore[arg-type]
    return EmbeddingBlock(module, name)  # type: ignore[arg-type]


_BUILT_IN.update(
    {
        nn.Linear: lambda m, n, t: LinearBlock(m, n, with_bias=t(m.bias)),  # type: ignore[arg-type]
        nn.Conv1d: lambda m, n, t: Conv1dBlock(m, n, with_bias=t(m.bias)),  # type: ignore[arg-type]
        nn.Conv2d: lambda m, n, t: Conv2dBlock(m, n, with_bias=t(m.bias)),  # type: ignore[arg-type]
        nn.Embedding: _embedding,
        nn.MultiheadAttention: attention_blocks,  # type: ignore[dict-item]
    }
)


def register_block(
    module_type: type[nn.Module], block_factory: BlockFactory | None = None
) -> BlockFactory | Callable[[BlockFactory], BlockFactory]:
    """Gives ``module_type`` (and its subclasses) a Kronecker block.

    ``attach`` looks a module up along its class's MRO, most specific type first; at each type a
    user registration wins over the built-in one, so a registration can also replace a built-in
    block (register ``nn.Linear`` to override it). Registering a type again replaces the earlier
    registration. Usable as a decorator: ``@register_block(MyLayer)`` on the factory.

    Args:
        module_type: the layer class.
        block_factory: ``factory(module, name, trainable) -> KroneckerBlock | Unsupported |
            list | None`` (see the module docstring); omitted when used as a decorator.

    Returns:
        The factory (so the decorator leaves it usable).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(
            f"register_block: module_type must be an nn.Module subclass, got {module_type!r}."
        )

    def add(factory: BlockFactory) -> BlockFactory:
        if not callable(factory):
            raise TypeError(f"register_block: block_factory must be callable, got {factory!r}.")
        _USER[module_type] = factory
        return factory

    return add if block_factory is None else add(block_factory)


def unregister_block(module_type: type[nn.Module]) -> None:
    """Removes the user registration of ``module_type`` (a built-in block applies again)."""
    _USER.pop(module_type, None)


def block_factory_for(module: nn.Module) -> BlockFactory | None:
    """The factory for ``module``: the most specific registered type of its class wins; a
    module of no registered type may still match a structural rule (the module docstring)."""
    for cls in type(module).__mro__:
        factory = _USER.get(cls) or _BUILT_IN.get(cls)
        if factory is not None:
            return factory
    return next((factory for matches, factory in _STRUCTURAL if matches(module)), None)


def blocks_for(
    module: nn.Module, name: str, trainable: Callable[[Tensor | None], bool]
) -> list[KroneckerBlock | Unsupported]:
    """The factory's answer for ``module`` as a list (empty: not a registered type)."""
    factory = block_factory_for(module)
    result = None if factory is None else factory(module, name, trainable)
    if result is None:
        return []
    if isinstance(result, (KroneckerBlock, Unsupported)):
        return [result]
    return list(result)
