"""lightning_grng: gradient-regularized natural gradients (KFAC, RING, RENG, RKalman) for
PyTorch and PyTorch Lightning."""

from lightning_grng.__about__ import __version__
from lightning_grng.attach import CurvatureHandle, attach
from lightning_grng.lightning import GRNGCallback, GRNGDDPStrategy, GRNGStrategy
from lightning_grng.optim import KFAC, RENG, RING, GRNGOptimizer, RKalman, regularized_backward
from lightning_grng.registry import register_block, unregister_block

__all__ = [
    "KFAC",
    "RENG",
    "RING",
    "CurvatureHandle",
    "GRNGCallback",
    "GRNGDDPStrategy",
    "GRNGOptimizer",
    "GRNGStrategy",
    "RKalman",
    "__version__",
    "attach",
    "register_block",
    "regularized_backward",
    "unregister_block",
]
