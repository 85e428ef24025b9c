"""Which rank owns which Kronecker block: a pure function, unit-tested without processes.

Each block's factors live on exactly one rank (its *owner*). The owner is chosen by greedy
longest-processing-time scheduling on a cost model: the cubic work of inverting (or filtering)
the two factors, ``groups · (n_in³ + n_out³)``. Ties are broken deterministically (larger cost
first, then block order; among equally loaded ranks the lowest rank), so every process computes
the same assignment from the same model without communicating.
"""

from __future__ import annotations

from collections.abc import Sequence


def block_cost(
    groups: int, n_in: int, n_out: int, diagonal_in: bool = False, diagonal_out: bool = False
) -> float:
    """Modelled cost of one block: the factor sizes cubed (inversion / filter update); a
    factor kept as its diagonal (an embedding's input side, ``max_factor``, ``one_sided``)
    costs its size, not its cube."""
    a_cost = float(n_in) if diagonal_in else float(n_in) ** 3
    g_cost = float(n_out) if diagonal_out else float(n_out) ** 3
    return float(groups) * (a_cost + g_cost)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each block, balancing the summed cost per rank (greedy LPT).

    Args:
        costs: the cost of each block, in block order (non-negative).
        world_size: number of ranks, >= 1.

    Returns:
        ``owners[i]`` in ``range(world_size)`` for block ``i``. The most expensive remaining
        block goes to the currently least-loaded rank (lowest rank on ties); equal costs keep
        block order. The result is within 4/3 of the optimal makespan (Graham's bound).
    """
    if world_size < 1:
        raise ValueError(f"invalid world_size={world_size}; allowed: an integer >= 1.")
    if any(c < 0 for c in costs):
        raise ValueError(f"invalid costs={list(costs)}; allowed: non-negative numbers.")
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """Summed cost per rank for an assignment (for tests and reports)."""
    load = [0.0] * world_size
    for cost, owner in zip(costs, owners, strict=True):
        load[owner] += cost
    return load
