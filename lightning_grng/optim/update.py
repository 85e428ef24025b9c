"""The last stages of every step, as free functions with explicit arguments: the KL-clip,
momentum, decoupled weight decay and lr; and the Adam fallback for parameters without a
block. (The math of ``torch.optim.adam``'s functional form, for preconditioned directions.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_grng.numerics import inner
from lightning_grng.optim.fallback import adam_steps
from lightning_grng.optim.lazy_rows import RowUpdate


def device_total(values: Iterable[Tensor]) -> Tensor:
    """Sum of scalar tensors as a float64 tensor on the device of the first (no host sync)."""
    items = list(values)
    if not items:
        return torch.zeros((), dtype=torch.float64)
    device = items[0].device
    return torch.stack([v.to(device=device, dtype=torch.float64) for v in items]).sum()


def kl_clip_scale(
    clip: float | None,
    directions: dict[Tensor, Tensor | RowUpdate],
    grad_of: dict[Tensor, Tensor],
    group_of: dict[Tensor, dict[str, Any]],
) -> float | Tensor:
    """KL-clip: ``min(1, sqrt(c / Σ lr² ⟨U, g⟩))`` over the parameters in ``grad_of``; bounds
    the step's predicted KL change. A float64 0-dim tensor on the device (no host sync); 1
    where ``Σ`` is 0 or not finite, and the float 1.0 without a clip."""
    if clip is None:
        return 1.0
    vg = device_total(
        group_of[p]["lr"] ** 2
        * (d.inner(g) if isinstance(d := directions[p], RowUpdate) else inner(d, g))
        for p, g in grad_of.items()
    )
    vg = vg.abs()
    usable = (vg > 0.0) & torch.isfinite(vg)
    scale = torch.sqrt(clip / torch.where(usable, vg, torch.ones_like(vg)))
    return torch.where(usable, scale.clamp(max=1.0), torch.ones_like(vg))


class KLBindCounter:
    """How often the KL-clip binds: ``kl_clip_bound`` (this step's scale < 1, as 0/1) and
    ``kl_clip_bind_rate`` (the fraction of such steps since construction), on the device."""

    def __init__(self) -> None:
        self._bound: Tensor | None = None
        self._steps = 0

    def count(self, scale: float | Tensor) -> dict[str, float | Tensor]:
        """Counts one step; empty without a clip (``scale`` a float)."""
        if not isinstance(scale, Tensor):
            return {}
        bound = (scale < 1.0).to(torch.float64)
        self._bound = bound if self._bound is None else self._bound.to(bound.device) + bound
        self._steps += 1
        return {"kl_clip_bound": bound, "kl_clip_bind_rate": self._bound / self._steps}


def apply_directions(
    param_groups: list[dict[str, Any]],
    state: dict[Tensor, dict[str, Any]],
    directions: dict[Tensor, Tensor | RowUpdate],
    scale: float | Tensor,
    momentum_ema: bool,
    carried: set[Tensor] | frozenset[Tensor] = frozenset(),
) -> None:
    """``θ ← θ(1 − lr·wd) − lr·m`` with ``m ← μm + U`` (heavy ball) or ``m ← μm + (1 − μ)U``
    (``momentum_ema``: the step keeps U's units); U = ``scale`` × the direction. The
    parameters in ``carried`` take U itself (their direction already holds a first moment).
    A :class:`RowUpdate` moves its rows alone; with the template's momentum it is made whole
    first (that momentum moves every row). Foreach ops per group and dtype: a few ops for all
    parameters instead of a few per parameter."""
    for group in param_groups:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        plain: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}  # (params, U)
        averaged: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}  # (params, m)
        absorbing: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}  # (m, U)
        for p in group["params"]:
            if p not in directions:
                continue
            direction = directions[p]
            momentum = mu > 0.0 and p not in carried
            if isinstance(direction, RowUpdate):
                if not momentum:
                    _apply_rows(p, direction, scale, lr, wd)
                    continue
                direction = direction.dense()
            update = direction.to(p.dtype)
            if not momentum:
                _append(plain, p.dtype, p, update)
                continue
            buf = state[p].get("momentum_buffer")
            if buf is None:  # the first update starts the buffer at U (once per parameter)
                factor = scale.to(p.dtype) if isinstance(scale, Tensor) else scale
                state[p]["momentum_buffer"] = buf = update.mul(factor)
            else:
                _append(absorbing, p.dtype, buf, update)
            _append(averaged, p.dtype, p, buf)
        for dtype, (bufs, updates) in absorbing.items():
            updates = _scaled(updates, scale, dtype)
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, updates, alpha=1.0 - mu if momentum_ema else 1.0)
        for dtype, (params, updates) in plain.items():
            _step(params, _scaled(updates, scale, dtype), lr, wd)
        for params, bufs in averaged.values():
            _step(params, bufs, lr, wd)


def _append(
    lists: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]],
    dtype: torch.dtype,
    a: Tensor,
    b: Tensor,
) -> None:
    first, second = lists.setdefault(dtype, ([], []))
    first.append(a)
    second.append(b)


def _scaled(updates: list[Tensor], scale: float | Tensor, dtype: torch.dtype) -> list[Tensor]:
    """``scale`` × each update (one foreach op; none for a scale of 1)."""
    if isinstance(scale, Tensor):
        return list(torch._foreach_mul(updates, scale.to(dtype)))
    return updates if scale == 1.0 else list(torch._foreach_mul(updates, scale))


def _step(params: list[Tensor], updates: list[Tensor], lr: float, wd: float) -> None:
    """``θ ← θ(1 − lr·wd) − lr·U`` for each parameter."""
    if wd > 0.0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_add_(params, updates, alpha=-lr)


def _apply_rows(p: Tensor, U: RowUpdate, scale: float | Tensor, lr: float, wd: float) -> None:
    """``θ ← θ(1 − lr·wd) − lr·scale·U`` with U non-zero in its rows only (decoupled weight
    decay, if any, still shrinks every row, as AdamW's does)."""
    if wd > 0.0:
        p.mul_(1.0 - lr * wd)
    rows = U.rows.to(p.dtype)
    if isinstance(scale, Tensor):
        rows = rows * scale.to(p.dtype)
        p.index_add_(0, U.index, rows, alpha=-lr)
    else:
        p.index_add_(0, U.index, rows, alpha=-lr * scale)


def apply_fallback(
    params: list[Tensor],
    state: dict[Tensor, dict[str, Any]],
    grad_of: dict[Tensor, Tensor],
    group_of: dict[Tensor, dict[str, Any]],
    lr_multiple: float,
) -> None:
    """The Adam fallback (``optim/fallback.py``) at ``lr_multiple`` × the group's lr, with
    decoupled weight decay, for parameters without a preconditioned direction: one foreach
    Adam step per param group and dtype."""
    batches: dict[tuple[int, torch.dtype], list[Tensor]] = {}
    for p in params:
        batches.setdefault((id(group_of[p]), p.dtype), []).append(p)
    for batch in batches.values():
        group = group_of[batch[0]]
        adam_steps(
            batch,
            [grad_of[p].to(p.dtype) for p in batch],
            [state[p] for p in batch],
            group["lr"] * lr_multiple,
            group["weight_decay"],
        )
