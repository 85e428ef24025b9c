"""``attach(model, optimizer)``: the plain-PyTorch entry point that registers the hooks."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_grng.curvature.block import KroneckerBlock, Unsupported
from lightning_grng.curvature.capture import BoundHook
from lightning_grng.curvature.tied import TiedEmbeddingBlock, tied_block
from lightning_grng.optim.base import GRNGOptimizer
from lightning_grng.registry import blocks_for

log = logging.getLogger("lightning_grng")


@dataclass
class Coverage:
    """What share of the trainable parameters the Kronecker blocks cover.

    Attributes:
        optimizer: the optimizer's class name.
        covered: trainable parameter count (elements) inside Kronecker blocks.
        total: trainable parameter count of the optimizer on this model.
        layers: number of Kronecker blocks.
        fallback: ``'name' (Type)`` of every module whose parameters get the fallback update.
        update: how the fallback update is named.
        summary: the fallback modules counted by type (``"20 × BatchNorm2d"``), the root
            module's own parameters by name; what the coverage line and the warning say.
    """

    optimizer: str
    covered: int
    total: int
    layers: int
    update: str
    fallback: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.covered / self.total if self.total else 0.0

    def __str__(self) -> str:
        rest = ", ".join(self.summary) if self.summary else "none"
        blocks = "1 block" if self.layers == 1 else f"{self.layers} blocks"
        return (
            f"{self.optimizer}: Kronecker blocks cover {self.share:.1%} of {self.total:,} "
            f"trainable parameters ({blocks}); fallback ({self.update}): {rest}"
        )


#: A type with at most this many fallback modules has them named in the summary.
NAMED = 2


def _summarize(entries: list[tuple[str, str, list[str], list[str]]]) -> list[str]:
    """``(module name, type, reasons, own parameter names)`` of the fallback modules as
    ``"k × Type (reasons)"`` per type, in order of appearance (naming the modules when there
    are at most :data:`NAMED` of a type), and the root's own parameters by name."""
    kinds: dict[str, tuple[list[str], list[str]]] = {}
    root = ""
    for name, kind, why, own in entries:
        if not name:
            root = f"root parameters: {', '.join(own)}" + (f" ({'; '.join(why)})" if why else "")
            continue
        names, reasons = kinds.setdefault(kind, ([], []))
        names.append(f"'{name}'")
        reasons += [r for r in why if r not in reasons]
    out = []
    for kind, (names, reasons) in kinds.items():
        notes = [", ".join(names)] if len(names) <= NAMED else []
        notes += reasons
        out.append(f"{len(names)} × {kind}" + (f" ({'; '.join(notes)})" if notes else ""))
    return [*out, root] if root else out


class CurvatureHandle:
    """What :func:`attach` returns; :meth:`remove` takes the hooks off again.

    Attaching the same optimizer to the same model twice gives two handles of one attachment:
    the hooks stay until both are removed, so neither handle detaches the other.

    Attributes:
        optimizer: the optimizer the hooks feed.
        blocks: module name -> Kronecker block.
        unsupported: names of trainable modules that get the fallback update.
        coverage: the share of trainable parameters in Kronecker blocks (:class:`Coverage`).
    """

    def __init__(
        self,
        optimizer: GRNGOptimizer,
        blocks: dict[str, KroneckerBlock],
        unsupported: list[str],
        coverage: Coverage,
    ) -> None:
        self.optimizer = optimizer
        self.blocks = {block.name: block for block in blocks.values()}
        self.unsupported = unsupported
        self.coverage = coverage
        optimizer.add_handle(self)

    @property
    def attached(self) -> bool:
        """Whether this handle still holds the hooks (not removed, optimizer not detached)."""
        return self in self.optimizer.handles

    def remove(self) -> None:
        """Releases this handle; the hooks go with the last handle of the attachment. The
        optimizer keeps its curvature state (re-attaching resumes)."""
        self.optimizer.release(self)


def _refuse_lazy(model: nn.Module, optimizer: GRNGOptimizer) -> None:
    """A lazy layer has no shape until its first forward, so no block can be built for it."""
    params = set(optimizer.flat_params())
    for name, module in model.named_modules():
        if any(is_lazy(p) and p in params for p in module.parameters(recurse=False)):
            raise RuntimeError(
                f"{type(optimizer).__name__}: module '{name}' ({type(module).__name__}) is not "
                "initialized yet: run one forward pass (e.g. model(example_batch)) before "
                "attach(), so its weight has a shape."
            )


def _refuse_foreign(model: nn.Module, optimizer: GRNGOptimizer) -> None:
    """An optimizer over none of the model's parameters would train nothing."""
    mine = set(optimizer.flat_params())
    if mine and not any(p in mine for p in model.parameters()):
        raise ValueError(
            f"attach(): the {type(optimizer).__name__} holds none of the parameters of "
            f"{type(model).__name__}, so nothing would train; build it from this model's "
            "parameters (e.g. RING(model.parameters()))."
        )


def _refuse_overlap(model: nn.Module, optimizer: GRNGOptimizer) -> None:
    """Two GRNG optimizers attached to one model must not share a parameter."""
    mine = set(optimizer.flat_params())
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                other = getattr(hook, "owner", None) if isinstance(hook, BoundHook) else None
                if other is None or other is optimizer or not other.attached:
                    continue
                shared = [p for p in other.flat_params() if p in mine]
                if shared:
                    names = {p: n for n, p in model.named_parameters(remove_duplicate=False)}
                    raise ValueError(
                        f"{type(optimizer).__name__} and the attached {type(other).__name__} "
                        f"both optimize {names.get(shared[0], 'a parameter')!r} "
                        f"({len(shared)} shared parameter(s)): each parameter may belong to "
                        "one GRNG optimizer only; split the parameters between them."
                    )


def _shared_parameters(model: nn.Module, index: dict[Tensor, int]) -> dict[Tensor, list[str]]:
    """Optimized parameters registered under more than one name (weight tying)."""
    owners: dict[Tensor, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p in index:
                owners.setdefault(p, []).append(f"{name}.{pname}" if name else pname)
    return {p: names for p, names in owners.items() if len(names) > 1}


def _tied_blocks(
    model: nn.Module,
    shared: dict[Tensor, list[str]],
    trainable: Callable[[Tensor | None], bool],
    skip: set[str],
) -> dict[Tensor, TiedEmbeddingBlock]:
    """The shared parameters that are the ``weight`` of embeddings and of one output layer
    (or transposed linear layer), none skipped: one block for all uses each
    (:mod:`lightning_grng.curvature.tied`). Other sharing patterns are not here."""
    owners: dict[Tensor, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p in shared and pname == "weight":
                owners.setdefault(p, []).append((name, module))
    found: dict[Tensor, TiedEmbeddingBlock] = {}
    for p, mods in owners.items():
        skipped = any(n in skip or type(m).__name__ in skip for n, m in mods)
        if skipped or len(mods) != len(shared[p]):
            continue
        built = [
            b
            for n, m in mods
            for b in blocks_for(m, n, trainable)
            if isinstance(b, KroneckerBlock) and b.weight is p
        ]
        block = tied_block(built)
        if block is not None:
            found[p] = block
    return found


def attach(
    model: nn.Module,
    optimizer: GRNGOptimizer,
    skip_modules: Iterable[str] = (),
    grad_scaler: Any = None,
    report: bool = True,
) -> CurvatureHandle:
    """Registers the curvature hooks of ``optimizer`` on the layers of ``model``.

    Layers whose weight the optimizer trains get a Kronecker block: ``nn.Linear``,
    ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding`` (diagonal input factor; ``max_norm=None``
    and dense gradients only; not with RKalman) and ``nn.MultiheadAttention`` (packed
    ``in_proj_weight`` as q/k/v groups, and ``out_proj``; self- and cross-attention), plus any
    type given a block with :func:`~lightning_grng.register_block` (looked up along the
    module's MRO, most specific type first; a user registration overrides a built-in one).
    Other trainable modules (norm layers, bare parameters, refused configurations with their
    reason) are named in one warning and get the fallback update. An embedding weight tied to
    one output layer (``head.weight = emb.weight``: an ``nn.Linear`` or a transposed linear
    layer) gets one block for all its uses (not with RKalman; the output layer's bias gets the
    fallback); a weight shared in any other way gets the fallback, with a warning naming its
    owners. Attaching the same model twice returns another handle of the same attachment.
    The share of trainable parameters the blocks cover and the modules that fall back are
    stated in one line (logger ``lightning_grng``, INFO) and kept in ``handle.coverage``.

    Raises:
        RuntimeError: a lazy layer (``nn.LazyLinear``) has not run its first forward yet, or
            the optimizer is attached to another model.
        ValueError: another GRNG optimizer attached to this model shares a parameter.

    Args:
        model: the model whose forward/backward passes feed the curvature.
        optimizer: a lightning_grng optimizer over (some of) the model's parameters.
        skip_modules: qualified module names (or class names) to leave without a block.
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 AMP loop, so the curvature is
            built from unscaled gradients (``GradScaler.unscale_`` only unscales ``.grad``).
        report: log the coverage line (the Lightning callback passes False on ranks > 0).

    Returns:
        A :class:`CurvatureHandle`; call ``handle.remove()`` to take the hooks off.
    """
    if not isinstance(optimizer, GRNGOptimizer):
        raise TypeError(
            f"attach() needs a lightning_grng optimizer (KFAC, RING, RENG, RKalman), got "
            f"{type(optimizer).__name__}."
        )
    if optimizer.attached:
        if optimizer.model is model:
            coverage = optimizer.handles[0].coverage
            return CurvatureHandle(optimizer, optimizer.blocks, [], coverage)
        raise RuntimeError(
            f"{type(optimizer).__name__} is already attached to another model; call "
            "handle.remove() on the first handle before attaching again."
        )
    _refuse_lazy(model, optimizer)
    _refuse_foreign(model, optimizer)
    _refuse_overlap(model, optimizer)
    skip = set(skip_modules)
    index = {p: i for i, p in enumerate(optimizer.flat_params())}
    shared = _shared_parameters(model, index)
    blocks: dict[str, KroneckerBlock] = {}
    covered: set[nn.Parameter] = set()
    frozen: dict[Tensor, str] = {}
    tied: list[str] = []
    tied_modules: set[str] = set()
    reasons: dict[str, list[str]] = {}
    claimed: set[int] = set()  # modules whose weight another module's block captures

    def trainable(p: Tensor | None) -> bool:
        return isinstance(p, nn.Parameter) and p in index and p.requires_grad

    tied_blocks = _tied_blocks(model, shared, trainable, skip)
    for p in tied_blocks:
        del shared[p]  # one block for both uses: not refused as tied

    for name, module in model.named_modules():
        if id(module) in claimed:
            continue
        found = blocks_for(module, name, trainable)
        claimed.update(id(b.module) for b in found if isinstance(b, KroneckerBlock))
        if name in skip or type(module).__name__ in skip:
            continue
        for block in found:
            if isinstance(block, Unsupported):
                if not block.params or any(p in index and p.requires_grad for p in block.params):
                    reasons.setdefault(name, []).append(block.reason)
                continue
            if block.name in skip or type(block.module).__name__ in skip:
                continue  # e.g. skip_modules=["attn.out_proj"]: a block built by its parent
            weight = block.weight
            if not isinstance(weight, nn.Parameter) or weight not in index:
                continue
            if weight in tied_blocks:
                if blocks.get(str(index[weight])) is tied_blocks[weight]:
                    continue  # built at the weight's other module
                block = tied_blocks[weight]
            if not weight.requires_grad:
                frozen[weight] = block.name
                continue
            refusal = optimizer.refusal(block)
            if refusal is not None:
                reasons.setdefault(name, []).append(refusal)
                continue
            tied_here = [p for p in block.params() if p in shared]
            if tied_here:
                tied += [" and ".join(f"'{n}'" for n in shared[p]) for p in tied_here]
                tied_modules.add(name)
                continue
            blocks[str(index[weight])] = block
            covered.update(block.params())
    for p, tied_pair in tied_blocks.items():  # the output layer's bias is not in the block
        bias, head_name = getattr(tied_pair.head, "bias", None), tied_pair.head_name
        if blocks.get(str(index[p])) is not tied_pair or not trainable(bias):
            continue
        if bias in shared:  # itself tied (BERT's decoder bias): named with the tied weights
            tied.append(" and ".join(f"'{n}'" for n in shared[bias]))
            tied_modules.add(head_name)
        else:
            reasons.setdefault(head_name, []).append(
                f"bias only: the weight is in the tied block '{tied_pair.name}'"
            )

    fallback_update = optimizer.fallback_description
    if tied:
        warnings.warn(
            f"{type(optimizer).__name__}: tied weights: {'; '.join(tied)} are one parameter; "
            "its gradient sums their uses, which one Kronecker block preconditions only for an "
            "nn.Embedding tied to one nn.Linear (or transposed linear) layer, so it (and its "
            f"layer) gets the fallback update ({fallback_update}).",
            UserWarning,
            stacklevel=2,
        )
    fallback_modules = [
        (name, type(module).__name__, reasons.get(name, []), own)
        for name, module in model.named_modules()
        if name not in tied_modules
        and (
            own := [
                pname
                for pname, p in module.named_parameters(recurse=False)
                if p in index and p.requires_grad and p not in covered and p not in shared
            ]
        )
    ]
    unsupported = [
        f"'{name or '<root>'}' ({kind}" + "".join(f"; {reason}" for reason in why) + ")"
        for name, kind, why, _ in fallback_modules
    ]
    summary = _summarize(fallback_modules)
    if tied_modules:
        summary.append(f"{len(tied_modules)} × tied ({', '.join(sorted(tied_modules))})")
    trainable = {p for p in index if p.requires_grad}
    coverage = Coverage(
        optimizer=type(optimizer).__name__,
        covered=sum(p.numel() for p in covered),
        total=sum(p.numel() for p in trainable),
        layers=len(blocks),
        update=fallback_update,
        fallback=[*unsupported, *(f"'{n}' (tied)" for n in sorted(tied_modules))],
        summary=summary,
    )
    if unsupported:
        warnings.warn(
            f"{type(optimizer).__name__}: no Kronecker block for "
            f"{', '.join(_summarize(fallback_modules))}; their parameters get the fallback "
            f"update ({fallback_update}); handle.coverage.fallback names each module.",
            UserWarning,
            stacklevel=2,
        )
    if not blocks:
        warnings.warn(
            f"{type(optimizer).__name__}: the model has no layer with a Kronecker block that the "
            "optimizer trains, so every parameter gets the fallback update.",
            UserWarning,
            stacklevel=2,
        )
    optimizer.attach_hooks(model, blocks, frozen, grad_scaler)
    if report:
        log.info("%s", coverage)
    return CurvatureHandle(optimizer, blocks, unsupported, coverage)
