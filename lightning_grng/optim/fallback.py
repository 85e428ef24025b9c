"""The update of parameters without a Kronecker block (norm gains, positional tables, bare
biases, layers whose hooks never fire).

``"adam"`` (default): an Adam step ``m̂ / (√v̂ + ε)`` per parameter, with decoupled weight decay,
at ``fallback_lr`` times the group's learning rate (so a scheduler moves both together). It
bypasses the heavy-ball momentum and the KL-clip of the Kronecker directions: Adam's step is
already normalized per coordinate, and a raw gradient of, say, a LayerNorm gain has no common
scale with a natural-gradient direction.
``"sgd"``: the raw gradient (identity preconditioner) through the optimizer's momentum, KL-clip,
weight decay and learning rate, the behaviour before the Adam fallback existed.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam

try:  # torch's own list of the devices with a fused Adam kernel (a private helper)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices as _fused
except ImportError:  # pragma: no cover - another torch: the two devices known to have one

    def _fused() -> list[str]:
        return ["cpu", "cuda"]


#: Adam's moment decays and epsilon for the fallback (PyTorch's defaults).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: Per-parameter state keys of the Adam fallback (kept in ``optimizer.state[p]``).
ADAM_STATE = ("fallback_exp_avg", "fallback_exp_avg_sq")


class FallbackMode(str, Enum):
    ADAM = "adam"
    SGD = "sgd"


def describe(mode: FallbackMode) -> str:
    """How the fallback update is named in messages."""
    if mode is FallbackMode.ADAM:
        return "an Adam update at fallback_lr × lr"
    return "momentum SGD on the raw gradient (identity preconditioner)"


def adam_steps(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], lr: float, wd: float
) -> None:
    """One AdamW step of ``params`` (same device and dtype) by torch's own Adam, fused where
    the device has the fused kernel (one kernel for all of them), else its foreach form, with
    decoupled weight decay ``wd``. The moments live in ``states`` under :data:`ADAM_STATE`,
    the step count under ``fallback_step`` (an int, so a checkpoint holds it exactly; torch
    would cast a tensor to the parameter's dtype on load)."""
    for state, grad in zip(states, grads, strict=True):
        if "fallback_exp_avg" not in state:
            for key in ADAM_STATE:
                state[key] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["fallback_step"] = 0
    device = params[0].device
    fused = device.type in _fused()
    # Torch's Adam counts each step before using it: it gets the counts before this step,
    # on the device for the fused kernel (no host read of them), on the host for foreach.
    counts = torch.tensor(
        [float(s["fallback_step"]) for s in states], device=device if fused else "cpu"
    )
    adam(
        params,
        grads,
        [s["fallback_exp_avg"] for s in states],
        [s["fallback_exp_avg_sq"] for s in states],
        [],
        list(counts.unbind(0)),
        fused=fused,
        foreach=not fused,
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=ADAM_BETAS[0],
        beta2=ADAM_BETAS[1],
        lr=lr,
        weight_decay=wd,
        eps=ADAM_EPS,
        maximize=False,
    )
    for state in states:
        state["fallback_step"] += 1
