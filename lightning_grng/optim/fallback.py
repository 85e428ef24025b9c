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


def adam_direction(state: dict[str, Any], grad: Tensor) -> Tensor:
    """One Adam direction ``m̂ / (√v̂ + ε)`` for ``grad``; updates the moments in ``state``."""
    beta1, beta2 = ADAM_BETAS
    if "fallback_exp_avg" not in state:
        state["fallback_exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["fallback_exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["fallback_step"] = 0
    state["fallback_step"] += 1
    t = state["fallback_step"]
    m, v = state["fallback_exp_avg"], state["fallback_exp_avg_sq"]
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (v / (1.0 - beta2**t)).sqrt_().add_(ADAM_EPS)
    return (m / (1.0 - beta1**t)) / denom
