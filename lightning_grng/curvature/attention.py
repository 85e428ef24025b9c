"""Kronecker blocks for ``nn.MultiheadAttention``: the packed input projection and ``out_proj``.

``F.multi_head_attention_forward`` applies both projections functionally (``F.linear`` on
``in_proj_weight``, on views of it, and on ``out_proj.weight``), so no module hook sees them.
While the attention module runs a training forward with autograd recording, a
:class:`torch.overrides.TorchFunctionMode` (entered by a forward pre-hook, left by a forward
hook registered with ``always_call=True`` so an exception cannot leave it on the stack)
intercepts those ``F.linear`` calls and records them exactly like a Linear layer's forward.

* **in_proj** (``in_proj_weight``, ``(3E, E)``) is a grouped block with groups q, k, v: each an
  ``E × E`` weight with its bias slice. A group's A comes from the input its projection saw
  (query, key or value) and its G from that projection's output gradient. Self-attention makes
  one call for all three groups (same input rows, output gradient split in three);
  cross-attention makes two or three calls on views of the weight, told apart by their storage
  offset.
* **out_proj** is a Linear block on the attention output.

``need_weights``, masks and ``is_causal`` do not change the projections; ``add_bias_kv`` and
``add_zero_attn`` act after them (``bias_k``/``bias_v`` get the fallback update). Separate
q/k/v weights (``kdim``/``vdim`` different from ``embed_dim``) share one packed bias across
three weights, which no Kronecker block here represents: that projection gets the fallback.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_grng import compat
from lightning_grng.curvature.block import ForwardRecord, KroneckerBlock, Unsupported
from lightning_grng.curvature.linear import LinearBlock

#: ``weight -> part``: which groups an ``F.linear`` weight feeds (``False``: not this block's).
_Match = Callable[[Tensor], "slice | bool | None"]


class _LinearInterception(TorchFunctionMode):
    """Records the ``F.linear`` calls of one attention forward whose weight ``match`` knows."""

    def __init__(self, match: _Match, record: ForwardRecord, module: nn.Module, call: int) -> None:
        super().__init__()
        self.match, self.record = match, record
        self.module, self.call = module, call

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            with self:  # the mode is off inside its handler: run the body with it on
                return compat.attention_forward(*args, **kwargs)
        out = func(*args, **kwargs)
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            part = self.match(weight)
            if part is not False:
                # Rows are samples, per projection (a Linear on its own input would count so).
                rows = max(x.numel() // max(x.shape[-1], 1), 1)
                self.record(self.module, x, out, rows, part, self.call)
        return out


_calls = itertools.count()


def register_interception(
    attention: nn.MultiheadAttention,
    match: _Match,
    record: ForwardRecord,
    bind: Callable[[Callable[..., Any]], Any],
) -> list[RemovableHandle]:
    """Hooks on ``attention`` that record its ``F.linear`` calls matched by ``match``.

    In eval mode nothing is intercepted; the forward is reported to ``record`` once (without an
    input) so the optimizer can say the layer ran in eval mode.
    """
    modes: list[_LinearInterception] = []

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is not attention or not torch.is_grad_enabled():
            return
        if not module.training:
            record(module, None, None, 0)
            return
        mode = _LinearInterception(match, record, module, next(_calls))
        mode.__enter__()
        modes.append(mode)

    def leave(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if module is attention and modes:
            modes.pop().__exit__(None, None, None)

    return [
        attention.register_forward_pre_hook(bind(enter), with_kwargs=True),
        attention.register_forward_hook(bind(leave), with_kwargs=True, always_call=True),
    ]


class InProjBlock(KroneckerBlock):
    """The packed ``in_proj_weight`` ``(3E, E)`` (and ``in_proj_bias`` ``(3E,)``) as groups
    q, k, v: matrices ``(3, E, E + 1)``."""

    def __init__(self, module: nn.MultiheadAttention, name: str, with_bias: bool = True) -> None:
        embed = module.embed_dim
        super().__init__(module, name, groups=3, fan_in=embed, n_out=embed, with_bias=False)
        self.has_bias = with_bias and module.in_proj_bias is not None
        self.n_in = embed + self.has_bias

    @property
    def weight(self) -> nn.Parameter:
        return self.module.in_proj_weight  # type: ignore[return-value]

    @property
    def bias(self) -> nn.Parameter | None:
        return self.module.in_proj_bias if self.has_bias else None  # type: ignore[return-value]

    def _part(self, weight: Tensor) -> slice | bool:
        """Groups fed by an ``F.linear`` on ``weight``: all of ``in_proj_weight`` or a view of
        whole ``E × E`` chunks of it (located by storage offset); False otherwise."""
        base, embed = self.weight, self.n_out
        if weight is base:
            return slice(0, 3)
        if weight._base is not base or weight.dim() != 2 or weight.shape[1] != embed:
            return False
        offset = weight.storage_offset() - base.storage_offset()
        if offset % (embed * embed) or weight.shape[0] % embed or not weight.is_contiguous():
            return False
        start = offset // (embed * embed)
        return slice(start, start + weight.shape[0] // embed)

    def register_capture(
        self, record: ForwardRecord, bind: Callable[[Callable[..., Any]], Any]
    ) -> list[RemovableHandle]:
        return register_interception(self.module, self._part, record, bind)  # type: ignore[arg-type]

    def input_rows(self, x: Tensor) -> Tensor:
        """The input of one projection call, ``(1, rows, E [+1])``, shared by its groups."""
        return self._append_ones(x.reshape(1, -1, x.shape[-1]))

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """``(k, rows, E)`` for the output gradient of a call feeding k groups."""
        k = grad_output.shape[-1] // self.n_out
        return grad_output.reshape(-1, k, self.n_out).transpose(0, 1)

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        return (3, self.n_out, self.n_out)


class OutProjBlock(LinearBlock):
    """``MultiheadAttention.out_proj``, captured from the attention's ``F.linear`` call."""

    def __init__(self, attention: nn.MultiheadAttention, name: str, with_bias: bool = True) -> None:
        super().__init__(attention.out_proj, name, with_bias=with_bias)
        self.attention = attention

    def _part(self, weight: Tensor) -> bool | None:
        return None if weight is self.weight else False

    def register_capture(
        self, record: ForwardRecord, bind: Callable[[Callable[..., Any]], Any]
    ) -> list[RemovableHandle]:
        return register_interception(self.attention, self._part, record, bind)


def attention_blocks(
    module: nn.MultiheadAttention, name: str, trainable: Callable[[Tensor | None], bool]
) -> list[KroneckerBlock | Unsupported]:
    """The blocks of one attention layer (the block factory of ``nn.MultiheadAttention``)."""
    prefix = f"{name}." if name else ""
    out: list[KroneckerBlock | Unsupported] = [
        OutProjBlock(module, f"{prefix}out_proj", with_bias=trainable(module.out_proj.bias))
    ]
    if module._qkv_same_embed_dim:
        in_proj = InProjBlock(module, name, with_bias=trainable(module.in_proj_bias))
        out.insert(0, in_proj)
    else:
        params = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
        if module.in_proj_bias is not None:
            params.append(module.in_proj_bias)
        out.append(
            Unsupported(
                "separate q/k/v projection weights (kdim/vdim != embed_dim) share one packed "
                "bias, which no Kronecker block represents",
                tuple(params),  # type: ignore[arg-type]
            )
        )
    return out
