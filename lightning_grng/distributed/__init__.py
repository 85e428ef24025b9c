"""Sharded curvature under DDP: the pure block-to-rank assignment and the collectives."""

from lightning_grng.distributed.assignment import assign_owners, block_cost, rank_loads
from lightning_grng.distributed.collectives import Sharding

__all__ = ["Sharding", "assign_owners", "block_cost", "rank_loads"]
