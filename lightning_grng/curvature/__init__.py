"""The curvature engine: Kronecker blocks, capture hooks, factor state and inverse routines."""

from lightning_grng.curvature.block import KroneckerBlock
from lightning_grng.curvature.capture import (
    CaptureGate,
    CurvatureCapture,
    FactorAccumulator,
    FisherType,
    LossReduction,
)
from lightning_grng.curvature.conv import Conv2dBlock
from lightning_grng.curvature.inverse import newton_schulz_inverse, spd_eigh
from lightning_grng.curvature.kronecker import InverseMethod, KroneckerFactors
from lightning_grng.curvature.linear import LinearBlock

__all__ = [
    "CaptureGate",
    "Conv2dBlock",
    "CurvatureCapture",
    "FactorAccumulator",
    "FisherType",
    "InverseMethod",
    "KroneckerBlock",
    "KroneckerFactors",
    "LinearBlock",
    "LossReduction",
    "newton_schulz_inverse",
    "spd_eigh",
]
