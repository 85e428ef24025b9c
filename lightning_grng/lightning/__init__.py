"""Lightning integration: the callback that attaches hooks and the strategies that drive RENG."""

from lightning_grng.lightning.callback import GRNGCallback
from lightning_grng.lightning.strategy import GRNGDDPStrategy, GRNGStrategy

__all__ = ["GRNGCallback", "GRNGDDPStrategy", "GRNGStrategy"]
