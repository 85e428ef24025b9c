"""One Kronecker block for a weight tied between embeddings and an output layer.

A language model that ties its output projection to its token embedding (``head.weight =
emb.weight``: GPT-2's ``wte``/``lm_head``, T5, ...) uses one ``(vocab, d)`` parameter twice: as
a lookup (``nn.Embedding``) and as a map between the model width and the vocabulary (an
``nn.Linear(d, vocab)`` output layer, or a transposed linear layer ``x @ W`` from the vocabulary
to the width). Several embedding modules on the weight (T5's ``shared`` and ``embed_tokens``)
are one lookup use. Its gradient is the sum of both uses', and so is its Fisher:

    F = Σ_uses D_k ⊗ S_k        (vocabulary side D_k diagonal, width side S_k dense d × d)

in the embedding's orientation (matrix ``weight.T``, ``n_out = d``, ``n_in = vocab``):

* lookup: ``D = diag(token counts) / rows`` and ``S`` the output-gradient factor (the
  embedding block's A and G);
* output map ``Linear(d, vocab)``: ``S`` its input factor (``d × d``) and ``D`` the diagonal of
  its logit-gradient factor (``vocab × vocab``, kept as its diagonal);
* transposed linear ``x @ W`` (``(vocab, d)`` weight, input over the vocabulary): ``D`` the
  diagonal of its input factor and ``S`` its output-gradient factor.

A sum of Kronecker products is not one. The block keeps the partial traces of ``F``,

    F ≈ (Σ_k tr(S_k) D_k) ⊗ (Σ_k tr(D_k) S_k) / tr F,

which is exact whenever ``F`` is one Kronecker product (either side of the uses proportional) and
keeps ``tr F`` and both partial traces (``docs/algorithms.md`` §1, "Tied weights"). Stored as
``A = Σ_k w_k D_k`` with ``w_k = tr S_k / Σ_j tr S_j`` (a diagonal over the vocabulary) and
``G = (Σ_j tr S_j / tr F) Σ_k tr(D_k) S_k``: with a single use these are that use's own factors.
So :class:`~lightning_grng.curvature.KroneckerFactors` with a diagonal A serves it unchanged.
A bias of the output layer is a separate parameter and gets the fallback update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_grng.curvature.block import ForwardRecord, KroneckerBlock
from lightning_grng.curvature.capture import FactorAccumulator, LossReduction
from lightning_grng.curvature.embedding import EmbeddingBlock
from lightning_grng.curvature.inverse import working_dtype
from lightning_grng.curvature.linear import LinearBlock
from lightning_grng.curvature.transposed_linear import TransposedLinearBlock

#: The kinds of use: the width side comes from the output gradient (lookup, input map) or from
#: the input (output map).
LOOKUP, INPUT_MAP, OUTPUT_MAP = "lookup", "input_map", "output_map"


class TiedEmbeddingBlock(EmbeddingBlock):
    """The ``(vocab, d)`` weight of one or more embeddings, also used by ``head``.

    Args:
        embeddings: ``(qualified name, nn.Embedding)`` of every embedding module holding the
            weight (``max_norm=None``, dense gradients, one ``padding_idx``): their lookups
            are one use, as one embedding called several times (T5's ``shared``,
            ``encoder.embed_tokens``, ``decoder.embed_tokens``).
        head: ``(qualified name, module)`` of the other module whose ``weight`` is the same
            parameter: an ``nn.Linear(d, vocab)`` (``kind="output_map"``) or a transposed
            linear layer ``x @ W`` with ``W`` of shape ``(vocab, d)`` (``kind="input_map"``).
        kind: how ``head`` uses the weight.
    """

    def __init__(
        self,
        embeddings: list[tuple[str, nn.Embedding]],
        head: tuple[str, nn.Module],
        kind: str,
    ) -> None:
        if kind not in (INPUT_MAP, OUTPUT_MAP):
            raise ValueError(f"TiedEmbeddingBlock: kind must be {INPUT_MAP!r} or {OUTPUT_MAP!r}")
        (name, embedding), (head_name, module) = embeddings[0], head
        for other_name, other in [*embeddings[1:], head]:
            if other.weight is not embedding.weight:
                raise ValueError(f"'{other_name}' does not use the weight of '{name}'")
        if any(e.padding_idx != embedding.padding_idx for _, e in embeddings):
            raise ValueError("TiedEmbeddingBlock: the embeddings differ in padding_idx")
        names = [n for n, _ in embeddings] + [head_name]
        super().__init__(embedding, "+".join(names))
        self.head, self.head_name = module, head_name
        #: ``(module, kind)`` of every use; a module's forward feeds its kind's term.
        self.uses = (*((e, LOOKUP) for _, e in embeddings), (module, kind))

    def new_accumulator(self) -> TiedAccumulator:
        """The statistics sink: one sum per kind of use (see :class:`TiedAccumulator`)."""
        return TiedAccumulator(self.n_in, self.n_out, list(dict.fromkeys(k for _, k in self.uses)))

    def register_capture(
        self, record: ForwardRecord, bind: Callable[[Callable[..., Any]], Any]
    ) -> list[RemovableHandle]:
        """A forward hook on each module using the weight; each records with its kind as the
        label (``part``), so the accumulator keeps the uses apart."""
        handles = []
        for owner, kind in self.uses:

            def hook(
                module: nn.Module,
                args: tuple,
                kwargs: dict,
                output: Any,
                owner: nn.Module = owner,
                kind: str = kind,
            ) -> None:
                if module is not owner:
                    return  # a copy of the module (deepcopy carries the hook): inert
                x = args[0] if args else kwargs["input"]
                rows = x.numel() if kind == LOOKUP else x.numel() // max(x.shape[-1], 1)
                record(module, x, output, max(rows, 1), kind)

            handles.append(owner.register_forward_hook(bind(hook), with_kwargs=True))
        return handles

    def input_rows(self, x: Tensor) -> Tensor:
        """Token ids ``(1, rows)`` of the lookup (padding: -1), or the dense input rows
        ``(1, rows, n)`` of the other use (no bias column: a bias is not in the block)."""
        if not x.is_floating_point():
            return super().input_rows(x)
        return x.reshape(1, -1, x.shape[-1])

    def foreign_gradient(self, grad: Tensor, a_sum: Tensor) -> Tensor | None:
        """Every row gets gradient from the second use: another one cannot be told apart."""
        return None


class _UseSums(FactorAccumulator):
    """The sums of one kind of use, in its own layer's orientation (``a_sum`` from its inputs,
    ``g_sum`` from its output gradients), with the vocabulary side kept as a diagonal.

    Attributes:
        kind: the kind of use.
        a_shape, g_shape: the shapes of ``a_sum`` and ``g_sum`` (``(1, n)`` for a diagonal).
    """

    def __init__(self, kind: str, vocab: int, width: int) -> None:
        super().__init__(vocab if kind == LOOKUP else None)
        self.kind = kind
        self.a_shape = (1, width, width) if kind == OUTPUT_MAP else (1, vocab)
        self.g_shape = (1, vocab) if kind == OUTPUT_MAP else (1, width, width)

    def add_input(self, rows: Tensor, samples: int) -> None:
        if self.kind != INPUT_MAP:
            super().add_input(rows, samples)
            return
        square = _column_squares(rows)
        self.a_sum = square if self.a_sum is None else self.a_sum + square
        self.a_rows += rows.shape[-2]

    def add_output_grad(self, rows: Tensor, samples: int) -> None:
        if self.kind != OUTPUT_MAP:
            super().add_output_grad(rows, samples)
            return
        square = _column_squares(rows)
        self.g_sum = square if self.g_sum is None else self.g_sum + square
        self.g_samples += samples

    def term(self, reduction: LossReduction) -> tuple[Tensor, Tensor]:
        """``(D, S)``: the vocabulary-side diagonal ``(1, vocab)`` and the width-side factor
        ``(1, d, d)`` of this use's Kronecker term (each as its own layer's block scales it)."""
        A, G = self.averaged(reduction)
        return (G, A) if self.kind == OUTPUT_MAP else (A, G)


def _column_squares(rows: Tensor) -> Tensor:
    """The diagonal of ``rowsᵀ rows`` per group, ``(groups, n)``, in float32 or better."""
    rows = rows.to(working_dtype(rows.dtype))
    return (rows * rows).sum(-2)


class TiedAccumulator:
    """The statistics of a :class:`TiedEmbeddingBlock`: one :class:`_UseSums` per kind of use,
    fed with the ``(label, rows)`` pairs of labelled uses, combined by :meth:`averaged`.

    Args:
        vocab: the vocabulary size (``n_in`` of the block).
        width: the embedding width (``n_out``).
        kinds: the kinds of use, one term each.
    """

    def __init__(self, vocab: int, width: int, kinds: list[str]) -> None:
        self.terms = {kind: _UseSums(kind, vocab, width) for kind in kinds}
        self.reset()

    def reset(self) -> None:
        for term in self.terms.values():
            term.reset()
        #: Backward passes committed since the last reset (micro-batches of the window).
        self.passes = 0

    @property
    def complete(self) -> bool:
        """Some use has both its input and its output-gradient statistics."""
        return any(term.complete for term in self.terms.values())

    def add_input(self, labelled: tuple[str, Tensor], samples: int) -> None:
        kind, rows = labelled
        self.terms[kind].add_input(rows, samples)

    def add_output_grad(self, labelled: tuple[str, Tensor], samples: int) -> None:
        kind, rows = labelled
        self.terms[kind].add_output_grad(rows, samples)

    def scale_output_grads(self, factor: float) -> None:
        for term in self.terms.values():
            term.scale_output_grads(factor)

    def averaged(self, reduction: LossReduction) -> tuple[Tensor, Tensor]:
        """The block's ``(A, G)``: ``A`` ``(1, vocab)`` and ``G`` ``(1, d, d)`` from the uses'
        terms ``D_k ⊗ S_k`` by their partial traces (module docstring). Decided on the device:
        no host read-back."""
        terms = [term.term(reduction) for term in self.terms.values() if term.complete]
        assert terms, "averaged() of a window without statistics"
        dtype = terms[0][0].dtype
        for D, S in terms:
            dtype = torch.promote_types(dtype, torch.promote_types(D.dtype, S.dtype))
        D = torch.stack([d.to(dtype) for d, _ in terms])  # (uses, 1, vocab)
        S = torch.stack([s.to(dtype) for _, s in terms])  # (uses, 1, d, d)
        tr_D = D.sum(-1)  # (uses, 1)
        tr_S = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1)
        tr_F, sigma = (tr_D * tr_S).sum(0), tr_S.sum(0)  # (1,)
        tiny = torch.finfo(dtype).tiny
        # Degenerate windows (a zero side everywhere) keep one use's factors as they are.
        w = torch.where(sigma > 0, tr_S / sigma.clamp_min(tiny), 1.0 / len(terms))
        c = torch.where(tr_F > 0, tr_D * sigma / tr_F.clamp_min(tiny), 1.0)
        A = (w[..., None] * D).sum(0)
        G = (c[..., None, None] * S).sum(0)
        return A, G


def tied_block(built: list[KroneckerBlock]) -> TiedEmbeddingBlock | None:
    """The one block for a parameter that the registry gave a block at each of its owners:
    :class:`EmbeddingBlock` (one or more, with one ``padding_idx``) and exactly one
    :class:`LinearBlock` (an output map) or :class:`TransposedLinearBlock` (an input map)
    over it. None for any other pattern."""
    lookups = [(b.name, b.module) for b in built if type(b) is EmbeddingBlock]
    maps = [b for b in built if type(b) in (LinearBlock, TransposedLinearBlock)]
    pads = {e.padding_idx for _, e in lookups}  # type: ignore[union-attr]
    if not lookups or len(maps) != 1 or len(lookups) + 1 != len(built) or len(pads) != 1:
        return None
    kind = OUTPUT_MAP if type(maps[0]) is LinearBlock else INPUT_MAP
    return TiedEmbeddingBlock(lookups, (maps[0].name, maps[0].module), kind)  # type: ignore[arg-type]
