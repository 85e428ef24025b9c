"""Kronecker block for transposed linear layers: Hugging Face's ``Conv1D`` (GPT-2, OpenAI GPT,
ImageGPT, ...) and any layer built the same way.

Such a layer computes ``y = x @ W + b`` with ``W`` of shape ``(in, out)``: an ``nn.Linear`` whose
weight is ``W.T``. Its block is the Linear block (every row of the input is a sample) with the
weight transposed into and out of the package's ``(out, in)`` matrix convention.

It is recognized by structure, without importing transformers (:func:`is_transposed_linear`,
then a check of the forward in :func:`transposed_linear_blocks`):

* a leaf module (no submodules) whose own parameters are ``weight``, 2-D ``(in, out)``, and
  optionally ``bias``, ``(out,)`` or None, and nothing else;
* that states its sizes in the weight's orientation: ``nf == out`` (Conv1D's attribute; its
  ``nx``, when present, ``== in``), or ``in_features == in`` and ``out_features == out``;
* whose forward, run once at ``attach`` on a 3-row input of its dtype and device (no grad, no
  hooks, random state restored), returns ``x @ W + b``. A module that
  has the structure but fails this gets the fallback update and ``attach`` says why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_grng.curvature.block import KroneckerBlock, Unsupported
from lightning_grng.curvature.linear import LinearBlock


class TransposedLinearBlock(LinearBlock):
    """A layer ``y = x @ W + b`` with ``W`` of shape ``(in, out)``; its matrix is ``W.T``. The
    statistics are a Linear layer's; only the weight's orientation differs."""

    def __init__(self, module: nn.Module, name: str, with_bias: bool = True) -> None:
        n_in, n_out = module.weight.shape  # type: ignore[union-attr]
        KroneckerBlock.__init__(
            self, module, name, groups=1, fan_in=n_in, n_out=n_out, with_bias=with_bias
        )

    def to_matrix(self, weight_like: Tensor, bias_like: Tensor | None = None) -> Tensor:
        return super().to_matrix(weight_like.T, bias_like)

    def from_matrix(self, mat: Tensor) -> list[Tensor]:
        w = mat[0, :, : self.n_in - self.has_bias].T.contiguous()
        if not self.has_bias:
            return [w]
        return [w, mat[0, :, -1].reshape(self.bias.shape)]  # type: ignore[union-attr]


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` has the structure of a transposed linear layer (module docstring);
    cheap: no forward is run."""
    if next(iter(module.children()), None) is not None:
        return False
    params = module._parameters
    weight, bias = params.get("weight"), getattr(module, "bias", None)
    if set(params) - {"weight", "bias"} or not isinstance(weight, Tensor) or weight.dim() != 2:
        return False
    n_in, n_out = weight.shape
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n_out,)):
        return False
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    if isinstance(nf, int):
        return nf == n_out and (nx is None or nx == n_in)
    return getattr(module, "in_features", None) == n_in and (
        getattr(module, "out_features", None) == n_out
    )


def _forward_mismatch(module: nn.Module) -> str | None:
    """Why the forward of ``module`` is not ``x @ W + b`` (None: it is). ``forward`` is called
    directly (no hooks run), without grad, and the random state is restored afterwards."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    if weight.is_meta:
        return None  # nothing to run: the structure decides
    if not weight.is_floating_point():
        return f"its weight is {weight.dtype}"
    bias: Tensor | None = getattr(module, "bias", None)
    x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0))
    x = x.to(weight.device, weight.dtype)
    if weight.device.type == "cpu":
        keep_rng = torch.random.fork_rng(devices=[])
    else:
        keep_rng = torch.random.fork_rng([weight.device], device_type=weight.device.type)
    try:
        with torch.no_grad(), keep_rng:
            out = module.forward(x)
            expected = x @ weight if bias is None else torch.addmm(bias, x, weight)
    except Exception as err:  # any failure means: not a layer of this kind
        return f"its forward failed on an input of shape (3, {weight.shape[0]}): {err}"
    if not isinstance(out, Tensor) or out.shape != expected.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        return f"its forward returned {got} where x @ weight + bias is {tuple(expected.shape)}"
    # A wrong forward (an activation, a scale, a dropout) is off by O(1) of the output's scale.
    tol = max(1e-3, 10 * torch.finfo(weight.dtype).eps) * expected.abs().max().item()
    if not (out - expected).abs().max().item() <= tol:
        return "its forward does not compute x @ weight + bias"
    return None


def transposed_linear_blocks(
    module: nn.Module, name: str, trainable: Callable[[Tensor | None], bool]
) -> TransposedLinearBlock | Unsupported:
    """Block factory for a module that :func:`is_transposed_linear` accepts: the block, or
    :class:`Unsupported` when its forward is not ``x @ W + b``."""
    reason = _forward_mismatch(module)
    if reason is not None:
        return Unsupported(
            f"shaped like a transposed linear layer (weight (in, out)), but {reason}",
            tuple(p for p in module.parameters(recurse=False)),
        )
    bias = getattr(module, "bias", None)
    return TransposedLinearBlock(module, name, with_bias=trainable(bias))
