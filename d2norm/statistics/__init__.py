"""What is measured about norm layers and how their population statistics are recomputed:
recalibration (PreciseBN), the inference-regime fixed point, the statistics monitor."""
from .recalibration import recalibrate

__all__ = ["recalibrate"]
