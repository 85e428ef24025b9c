"""The collectives of sharded curvature: statistics reduced to owners, one flat buffer of
directions shared with everyone, block states gathered to rank 0 for checkpoints.

Every function here is called by *all* ranks in the same order with buffers of the same size:
a rank without statistics for a block contributes zeros, so a block that got no gradient on one
rank never leaves another rank waiting in a collective. ``docs/distributed.md`` has the diagram.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.capture import FactorAccumulator
from lightning_grng.curvature.inverse import working_dtype
from lightning_grng.curvature.kalman import KalmanAccumulator
from lightning_grng.distributed.assignment import assign_owners, block_cost


def shape_cost(block: KroneckerBlock) -> float:
    """:func:`block_cost` of a block's shape, its input side diagonal if it is an embedding's."""
    return block_cost(block.groups, block.n_in, block.n_out, block.diagonal_input)


@dataclass
class Sharding:
    """Where this process stands: rank, world size, process group and the block owners.

    Set on an optimizer with ``optimizer.use_sharding(...)`` by
    :class:`~lightning_grng.GRNGDDPStrategy` (``None`` means one process: the optimizer then
    never communicates).

    Attributes:
        rank: this process's rank in ``group``.
        world_size: number of ranks in ``group``.
        group: the process group (None: the default group).
        owners: block key -> owner rank; filled by :meth:`bind` from the blocks' costs.
    """

    rank: int
    world_size: int
    group: Any = None
    owners: dict[str, int] = field(default_factory=dict)

    def bind(
        self,
        blocks: dict[str, KroneckerBlock],
        cost: Callable[[KroneckerBlock], float] | None = None,
    ) -> None:
        """Assigns the owners of ``blocks`` (a pure function of their shapes and the
        optimizer's settings, the same on every rank: no communication). ``cost``: a block's
        modelled refresh cost (default :func:`shape_cost`)."""
        if set(self.owners) == set(blocks):
            return
        cost = cost or shape_cost
        keys = list(blocks)
        costs = [cost(b) for b in blocks.values()]
        self.owners = dict(zip(keys, assign_owners(costs, self.world_size), strict=True))

    def owns(self, key: str) -> bool:
        return self.owners[key] == self.rank

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _by_owner(self, keys: list[str]) -> list[tuple[int, list[str]]]:
        return [
            (owner, [k for k in keys if self.owners[k] == owner])
            for owner in range(self.world_size)
            if any(self.owners[k] == owner for k in keys)
        ]

    # ------------------------------------------------------------------ statistics
    def reduce_factor_statistics(
        self, blocks: dict[str, KroneckerBlock], accumulators: dict[str, FactorAccumulator]
    ) -> None:
        """Sums ``a_sum, a_rows, g_sum, g_samples`` of every block (of each use, for a tied
        block) at its owner (one ``reduce`` per owner rank); non-owners' accumulators are
        cleared.

        Each rank's output gradients are those of its *local* mean loss, and DDP averages the
        parameter gradients, so the global loss's output gradients are ``δ/W``: ``g_sum`` is
        divided by ``W²``. Then ``G = N_total · Σ (δ/W)(δ/W)ᵀ`` equals the single-process factor
        of the whole global batch (``docs/algorithms.md §1``).
        """
        W = self.world_size
        for owner, keys in self._by_owner(list(blocks)):
            dtype = working_dtype(blocks[keys[0]].weight.dtype)
            device = blocks[keys[0]].weight.device
            parts: list[Tensor] = []
            counts: list[float] = []
            for key in keys:
                for acc, a_shape, g_shape in _sums(blocks[key], accumulators[key]):
                    for value, shape in ((acc.a_sum, a_shape), (acc.g_sum, g_shape)):
                        if value is None:
                            value = torch.zeros(shape, dtype=dtype, device=device)
                        parts.append(value.to(dtype).reshape(-1))
                    counts += [float(acc.a_rows if acc.a_sum is not None else 0)]
                    counts += [float(acc.g_samples), 1.0 if acc.g_sum is not None else 0.0]
            parts.append(torch.tensor(counts, dtype=torch.float64, device=device).to(dtype))
            buf = torch.cat(parts)
            dist.reduce(buf, dst=self._global(owner), op=dist.ReduceOp.SUM, group=self.group)
            offset, i = 0, 0
            tail = buf[-len(counts) :].double().tolist()
            for key in keys:
                sums = _sums(blocks[key], accumulators[key])
                accumulators[key].reset()
                for acc, a_shape, g_shape in sums:
                    sizes = (math.prod(a_shape), math.prod(g_shape))
                    a = buf[offset : offset + sizes[0]].view(a_shape)
                    g = buf[offset + sizes[0] : offset + sum(sizes)].view(g_shape)
                    offset += sum(sizes)
                    a_rows, g_samples, g_present = tail[3 * i : 3 * i + 3]
                    i += 1
                    if owner != self.rank:
                        continue
                    if a_rows > 0:
                        acc.a_sum, acc.a_rows = a.clone(), round(a_rows)
                    if g_present > 0:
                        acc.g_sum, acc.g_samples = g / (W * W), round(g_samples)

    def gather_kalman_statistics(
        self, blocks: dict[str, KroneckerBlock], accumulators: dict[str, KalmanAccumulator]
    ) -> None:
        """Gathers every rank's measurement vectors of a block at its owner (one ``gather``
        per owner rank, after one small ``all_reduce(MAX)`` of the column counts).

        A Kalman measurement needs vectors, not sums: the owner concatenates the ranks' row
        samples (``"rows"``) or sums their independent sketches (``"sketch"``), adds the exact
        traces and counts, and divides the output-gradient vectors by W (traces by W²) for the
        same reason as :meth:`reduce_factor_statistics`. With ``measurement="rows"`` and
        ``measurement_size`` >= the rows of the global batch this is exactly the single-process
        measurement (ranks' rows in rank order, i.e. the order of a contiguous global batch).
        """
        W = self.world_size
        keys = list(blocks)
        first = blocks[keys[0]].weight
        dtype, device = working_dtype(first.dtype), first.device

        def raw(acc: KalmanAccumulator, parts: list[Tensor], b: KroneckerBlock, n: int) -> Tensor:
            if not parts:
                return torch.zeros(b.groups, n, 0, dtype=dtype, device=device)
            return acc.join(parts).to(dtype)

        local = {}
        for key in keys:
            b, acc = blocks[key], accumulators[key]
            A = raw(acc, acc.a_parts, b, b.n_in)
            G = raw(acc, acc.g_parts, b, b.n_out)
            local[key] = (A, G)
        cols = torch.tensor(
            [c for key in keys for c in (local[key][0].shape[-1], local[key][1].shape[-1])],
            dtype=torch.int64,
            device=device,
        )
        dist.all_reduce(cols, op=dist.ReduceOp.MAX, group=self.group)
        max_cols = dict(zip(keys, cols.view(-1, 2).tolist(), strict=True))

        for owner, owned in self._by_owner(keys):
            parts = []
            for key in owned:
                b, acc = blocks[key], accumulators[key]
                A, G = local[key]
                ka, kg = max_cols[key]
                pad_a = torch.zeros(b.groups, b.n_in, ka, dtype=dtype, device=device)
                pad_a[..., : A.shape[-1]] = A
                pad_g = torch.zeros(b.groups, b.n_out, kg, dtype=dtype, device=device)
                pad_g[..., : G.shape[-1]] = G
                zeros = torch.zeros(b.groups, dtype=dtype, device=device)
                a_tr = zeros if acc.a_trace is None else acc.a_trace.to(dtype)
                g_tr = zeros if acc.g_trace is None else acc.g_trace.to(dtype)
                meta = [acc.a_rows, acc.g_samples, acc.n_out, A.shape[-1], G.shape[-1]]
                meta += [float(acc.a_trace is not None), float(acc.g_trace is not None)]
                meta_t = torch.tensor(meta, dtype=torch.float64, device=device).to(dtype)
                parts += [pad_a.reshape(-1), pad_g.reshape(-1), a_tr, g_tr, meta_t]
            buf = torch.cat(parts)
            gathered = [torch.empty_like(buf) for _ in range(W)] if owner == self.rank else None
            dist.gather(buf, gathered, dst=self._global(owner), group=self.group)
            for key in owned:
                accumulators[key].reset()
            if gathered is None:
                continue
            for key, merged in zip(
                owned, _merge_kalman(owned, blocks, max_cols, gathered, W), strict=True
            ):
                acc = accumulators[key]
                for name, value in merged.items():
                    setattr(acc, name, value)
        for key in keys:
            if not self.owns(key):
                accumulators[key].reset()

    # ------------------------------------------------------------------ directions
    def share_directions(
        self,
        blocks: dict[str, KroneckerBlock],
        owned: dict[str, Tensor],
        doublings: int,
        dtype: torch.dtype,
    ) -> tuple[dict[str, Tensor], int]:
        """Every block's preconditioned ``(groups, n_out, n_in)`` direction on every rank from
        ONE ``all_reduce(SUM)`` of a flat buffer (zeros where a rank does not own the block,
        one flag per block saying whether its owner produced a direction), plus the total
        number of damping doublings (failures) of all owners this step."""
        first = next(iter(blocks.values())).weight
        parts = []
        for key, b in blocks.items():
            size = b.groups * b.n_out * b.n_in
            U = owned.get(key)
            if U is None:
                parts.append(torch.zeros(size + 1, dtype=dtype, device=first.device))
            else:
                flag = torch.ones(1, dtype=dtype, device=first.device)
                parts += [U.to(dtype).reshape(-1), flag]
        parts.append(torch.full((1,), float(doublings), dtype=dtype, device=first.device))
        buf = torch.cat(parts)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        spans, offset = [], 0
        for b in blocks.values():
            size = b.groups * b.n_out * b.n_in
            spans.append((offset, size))
            offset += size + 1
        # The owners' flags and the doublings in one read-back (not one per block).
        *flags, total = torch.stack([buf[o + n] for o, n in spans] + [buf[-1]]).tolist()
        out: dict[str, Tensor] = {}
        for (key, b), (start, size), flag in zip(blocks.items(), spans, flags, strict=True):
            if flag > 0.5:
                out[key] = buf[start : start + size].view(b.groups, b.n_out, b.n_in)
        return out, round(total)

    def all_reduce_mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """Mean over ranks of a list of tensors, in one flat ``all_reduce``."""
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat /= self.world_size
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    # ------------------------------------------------------------------ checkpoints
    def gather_block_states(self, states: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """Rank 0 receives every block's state from its owner (``gather_object``); other ranks
        get None. ``states`` holds this rank's state of every block (empty where not owned)."""
        owned = {k: v for k, v in states.items() if self.owns(k)}
        owned = {k: {n: _to_cpu(x) for n, x in v.items()} for k, v in owned.items()}
        dst = self._global(0)
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(owned, gathered, dst=dst, group=self.group)
        if gathered is None:
            return None
        merged: dict[str, Any] = {}
        for part in gathered:
            merged.update(part)
        return merged


def _sums(block: KroneckerBlock, acc: Any) -> list[tuple[Any, tuple[int, ...], tuple[int, ...]]]:
    """``(sums, a_sum shape, g_sum shape)`` of a block's statistics: its accumulator, or each
    use's sums of a block fed by several kinds of use (a tied embedding's ``terms``)."""
    terms = getattr(acc, "terms", None)
    if terms is not None:
        return [(t, t.a_shape, t.g_shape) for t in terms.values()]
    b = block
    a_shape = (b.groups, b.n_in) if b.diagonal_input else (b.groups, b.n_in, b.n_in)
    return [(acc, a_shape, (b.groups, b.n_out, b.n_out))]


def _to_cpu(x: Any) -> Any:
    return x.cpu() if isinstance(x, Tensor) else x


def _merge_kalman(
    keys: list[str],
    blocks: dict[str, KroneckerBlock],
    max_cols: dict[str, list[int]],
    gathered: list[Tensor],
    W: int,
) -> list[dict[str, Any]]:
    """Unpacks the gathered Kalman buffers of one owner into accumulator fields."""
    merged = [
        dict(a_parts=[], g_parts=[], a_trace=None, g_trace=None, a_rows=0, g_samples=0, n_out=0)
        for _ in keys
    ]
    for buf in gathered:
        offset = 0
        for i, key in enumerate(keys):
            b, (ka, kg), m = blocks[key], max_cols[key], merged[i]
            A = buf[offset : offset + b.groups * b.n_in * ka].view(b.groups, b.n_in, ka)
            offset += A.numel()
            G = buf[offset : offset + b.groups * b.n_out * kg].view(b.groups, b.n_out, kg)
            offset += G.numel()
            a_tr = buf[offset : offset + b.groups]
            g_tr = buf[offset + b.groups : offset + 2 * b.groups]
            offset += 2 * b.groups
            a_rows, g_samples, n_out, ca, cg, has_a, has_g = buf[offset : offset + 7].tolist()
            offset += 7
            if ca > 0:
                m["a_parts"].append(A[..., : round(ca)].clone())
            if cg > 0:
                m["g_parts"].append(G[..., : round(cg)] / W)
            if has_a > 0:
                m["a_trace"] = a_tr.clone() if m["a_trace"] is None else m["a_trace"] + a_tr
            if has_g > 0:
                g_tr = g_tr / (W * W)
                m["g_trace"] = g_tr if m["g_trace"] is None else m["g_trace"] + g_tr
            m["a_rows"] += round(a_rows)
            m["g_samples"] += round(g_samples)
            m["n_out"] = max(m["n_out"], round(n_out))
    return merged
