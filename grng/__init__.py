"""Short import path for the optimizers, so ``--optimizer grng.RING`` works on a LightningCLI."""

from lightning_grng import KFAC, RENG, RING, RKalman

__all__ = ["KFAC", "RENG", "RING", "RKalman"]
