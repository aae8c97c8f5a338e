"""The d2norm normalization layers. Each folds to a per-channel affine in eval mode."""
from .cbn import CrossIterationBatchNorm2d
from .mabn import MovingAverageBatchNorm2d
from .precise_bn import PreciseBatchNorm2d

__all__ = ["CrossIterationBatchNorm2d", "MovingAverageBatchNorm2d", "PreciseBatchNorm2d", "D2NORM_LAYER_TYPES"]

# The layers the registered names build ("CBN", "MABN", "PreciseBN").
D2NORM_LAYER_TYPES = (CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d)
