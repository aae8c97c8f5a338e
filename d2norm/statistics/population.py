"""Population statistics of a model's norm layers, and the distance between two normalisations.

Below the monitor, the recalibration hooks and the inference-regime iteration, which all compare
statistics before and after something changed them.
"""
import torch

from ..layers import MovingAverageBatchNorm2d, PreciseBatchNorm2d
from .recalibration import population_norm_layers

__all__ = ["has_population_statistics", "normalization_gap", "population_statistics"]


def normalization_gap(mean_t, var_t, mean_p, var_p, eps):
    """Per channel, ``√(δ² + (s - 1)²)`` with ``s = √(var_t+eps)/√(var_p+eps)`` and
    ``δ = (mean_t - mean_p)/√(var_p+eps)``: the RMS difference between normalising a unit-variance
    signal with (mean_t, var_t) and with (mean_p, var_p). ``mean_t``/``mean_p`` None: no centring."""
    std_p = torch.sqrt(var_p + eps)
    scale = torch.sqrt(var_t + eps) / std_p
    shift = 0.0 if mean_t is None else (mean_t - mean_p) / std_p
    return torch.sqrt(shift**2 + (scale - 1) ** 2)


def has_population_statistics(layer):
    """False only for a PreciseBN layer that was never recalibrated."""
    return not (isinstance(layer, PreciseBatchNorm2d) and not bool(layer.recalibrated))


@torch.no_grad()
def population_statistics(model):
    """``{module path: (mean or None, variance)}`` of every layer that has population statistics
    (MABN: no mean, its second moment); PreciseBN layers never recalibrated are left out."""
    stats = {}
    for name, layer in population_norm_layers(model):
        if not has_population_statistics(layer):
            continue
        mean = None if isinstance(layer, MovingAverageBatchNorm2d) else layer.running_mean.clone()
        stats[name] = (mean, layer.running_var.clone(), layer.eps)
    return stats
