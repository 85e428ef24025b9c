"""The GRNG optimizers."""

from lightning_grng.optim.base import GRNGOptimizer
from lightning_grng.optim.kfac import KFAC
from lightning_grng.optim.reng import RENG, regularized_backward
from lightning_grng.optim.ring import RING
from lightning_grng.optim.rkalman import RKalman

__all__ = [
    "KFAC",
    "RENG",
    "RING",
    "GRNGOptimizer",
    "RKalman",
    "regularized_backward",
]
