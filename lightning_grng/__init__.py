"""lightning_grng: gradient-regularized natural gradients (KFAC, RING, RENG, RKalman) for
PyTorch and PyTorch Lightning."""

import logging

from lightning_grng.__about__ import __version__
from lightning_grng.attach import Coverage, CurvatureHandle, attach
from lightning_grng.lightning import GRNGCallback, GRNGDDPStrategy, GRNGStrategy
from lightning_grng.optim import KFAC, RENG, RING, GRNGOptimizer, RKalman, regularized_backward
from lightning_grng.registry import register_block, unregister_block

__all__ = [
    "KFAC",
    "RENG",
    "RING",
    "Coverage",
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

# The coverage line of attach() is information a user should see once, like Lightning's own
# "GPU available" lines: an INFO handler unless the application configured this logger.
_log = logging.getLogger("lightning_grng")
if not _log.handlers:
    _log.addHandler(logging.StreamHandler())
    _log.setLevel(logging.INFO)
    _log.propagate = False
