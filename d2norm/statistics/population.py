"""Population statistics of a model's norm layers, and the distance between two normalisations.

Below the monitor, the recalibration hooks and the inference-regime iteration, which all compare
statistics before and after something changed them.
"""
import torch

from ..layers import norm_layer
from .recalibration import population_norm_layers

__all__ = ["normalization_gap", "population_statistics"]


def normalization_gap(mean_t, var_t, mean_p, var_p, eps):
    """Per channel, ``√(δ² + (s - 1)²)`` with ``s = √(var_t+eps)/√(var_p+eps)`` and
    ``δ = (mean_t - mean_p)/√(var_p+eps)``: the RMS difference between normalising a unit-variance
    signal with (mean_t, var_t) and with (mean_p, var_p). ``mean_t``/``mean_p`` None: no centring."""
    std_p = torch.sqrt(var_p + eps)
    scale = torch.sqrt(var_t + eps) / std_p
    shift = 0.0 if mean_t is None else (mean_t - mean_p) / std_p
    return torch.sqrt(shift**2 + (scale - 1) ** 2)


@torch.no_grad()
def population_statistics(model):
    """``{module path: (mean or None, variance)}`` of every layer that has population statistics
    (MABN: no mean, its second moment); PreciseBN layers never recalibrated are left out."""
    stats = {}
    for name, module in population_norm_layers(model):
        layer = norm_layer(module)
        if layer.has_population_statistics():
            stats[name] = (*layer.population_statistics(), layer.eps)
    return stats
