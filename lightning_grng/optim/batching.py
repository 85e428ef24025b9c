"""Same-shaped Kronecker blocks as one stacked batch (issue 22, ``docs/algorithms.md`` §8.10).

A transformer repeats its layers, so its blocks come in few shapes (GPT-2 small: 48 matrices in
four shapes). Per block, the eigen mode's step is a dozen small ops: two matmuls for the
gradient statistics and their moving averages, four for the rotations, a dozen elementwise
passes between them; each op costs a dispatch on a CPU and a kernel launch on a GPU, whatever
its size. Stacked ``(k, groups, n, m)``, k same-shaped blocks take the same ops once: the
matmuls become batched matmuls, the elementwise passes run over all k, and every mean and
every finiteness decision stays per block (``numerics.all_finite_each``). Same arithmetic,
fewer and larger ops; the stacked copies of bases and moments are O(k·n²) against the
rotations' O(k·n²·m).

Which blocks may share a batch is decided per stage by a key (None: alone): equal shapes and
dtypes, and whatever else must be equal for the stage's arithmetic to be one expression (the
param group, the moments' step counts).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def same_keys(keys: Sequence[Hashable | None]) -> tuple[list[list[int]], list[int]]:
    """``(batches, alone)``: the positions of equal keys, in first-seen order, where at least
    two share one; and every other position (a None key, or a key of its own), in order."""
    positions: dict[Hashable, list[int]] = {}
    alone: list[int] = []
    for i, key in enumerate(keys):
        if key is None:
            alone.append(i)
        else:
            positions.setdefault(key, []).append(i)
    batches = [p for p in positions.values() if len(p) > 1]
    alone.extend(p[0] for p in positions.values() if len(p) == 1)
    return batches, sorted(alone)
