"""The d2norm normalization layers (pure torch). Each implements :class:`NormLayer` and folds to a
per-channel affine in eval mode."""
from .batch_renorm import BatchRenorm2d
from .cbn import CrossIterationBatchNorm2d
from .interface import NormLayer, TrainingStatistics, norm_layer
from .mabn import MovingAverageBatchNorm2d
from .precise_bn import PreciseBatchNorm2d
from .sync_cbn import SyncCrossIterationBatchNorm2d
from .sync_mabn import SyncMovingAverageBatchNorm2d

__all__ = [
    "BatchRenorm2d", "CrossIterationBatchNorm2d", "MovingAverageBatchNorm2d", "NormLayer", "PreciseBatchNorm2d",
    "SyncCrossIterationBatchNorm2d", "SyncMovingAverageBatchNorm2d", "TrainingStatistics", "norm_layer",
]
