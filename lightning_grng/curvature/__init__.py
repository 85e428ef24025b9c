"""The curvature engine: Kronecker blocks, capture hooks, factor state and inverse routines."""

from lightning_grng.curvature.attention import InProjBlock, OutProjBlock
from lightning_grng.curvature.block import ForwardRecord, KroneckerBlock, Unsupported
from lightning_grng.curvature.capture import (
    CaptureGate,
    CurvatureCapture,
    FactorAccumulator,
    FisherType,
    LossReduction,
)
from lightning_grng.curvature.conv import Conv1dBlock, Conv2dBlock
from lightning_grng.curvature.embedding import EmbeddingBlock
from lightning_grng.curvature.inverse import newton_schulz_inverse, spd_eigh
from lightning_grng.curvature.kalman import FilterPlan, FloorPlan, KalmanFactors
from lightning_grng.curvature.kalman_measurement import (
    KalmanAccumulator,
    Measurement,
    MeasurementMethod,
)
from lightning_grng.curvature.kronecker import InverseMethod, KroneckerFactors
from lightning_grng.curvature.linear import LinearBlock
from lightning_grng.curvature.sdpa import MathSDPAHandle, math_only_sdpa, use_math_sdpa
from lightning_grng.curvature.tied import TiedAccumulator, TiedEmbeddingBlock
from lightning_grng.curvature.transposed_linear import TransposedLinearBlock

__all__ = [
    "CaptureGate",
    "Conv1dBlock",
    "Conv2dBlock",
    "CurvatureCapture",
    "EmbeddingBlock",
    "FactorAccumulator",
    "FilterPlan",
    "FisherType",
    "FloorPlan",
    "ForwardRecord",
    "InProjBlock",
    "InverseMethod",
    "KalmanAccumulator",
    "KalmanFactors",
    "KroneckerBlock",
    "KroneckerFactors",
    "LinearBlock",
    "LossReduction",
    "MathSDPAHandle",
    "Measurement",
    "MeasurementMethod",
    "OutProjBlock",
    "TiedAccumulator",
    "TiedEmbeddingBlock",
    "TransposedLinearBlock",
    "Unsupported",
    "math_only_sdpa",
    "newton_schulz_inverse",
    "spd_eigh",
    "use_math_sdpa",
]
