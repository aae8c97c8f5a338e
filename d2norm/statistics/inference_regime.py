"""Recalibration in the inference regime: each layer's statistics from the inputs it sees at inference.

:func:`d2norm.recalibrate` (PreciseBN, "Rethinking 'Batch' in BatchNorm" Sec. 3) collects a layer's
input statistics while the layers upstream of it normalise with *batch* statistics (training-mode
forwards). At inference they normalise with population statistics, so a layer sees a differently
distributed input — for CBN, whose training statistics are pooled over a window, neither regime is
the one it was trained in. Here the population statistics are the fixed point of

    pass 1:      recalibrate as today (upstream layers use batch statistics);
    pass k > 1:  recalibrate with every layer normalising with the statistics of pass k - 1
                 (its eval-mode per-channel affine), on the same batches.

A layer with no norm upstream gets its final statistics in pass 1, and a layer whose upstream
norms are final gets its own in the next pass, so a chain of D norm layers is exact after D passes
(a ResNet-18-FPN Mask R-CNN with norms everywhere: about 21; stopping earlier leaves deep layers
calibrated to a stale upstream, which measured far worse than either regime);
every pass draws the same random numbers (RoI sampling), and the passes stop once no layer's
statistics move by more than ``tolerance`` (the mean over channels of
:func:`d2norm.statistics.population.normalization_gap` between consecutive passes). Cost: one
recalibration per pass, and the ``num_iters`` batches are held in memory.
"""
import itertools
import logging

import torch

from ..layers import norm_layer
from ..layers.per_channel import statistics_dtype
from .population import normalization_gap, population_statistics
from .recalibration import population_norm_layers, recalibrate

__all__ = ["recalibrate_in_inference_regime"]

logger = logging.getLogger(__name__)


def _eval_affine(layer):
    """``(scale, shift)`` of ``layer``'s eval-mode output ``scale[c]·x + shift[c]``."""
    return tuple(t.detach() for t in norm_layer(layer).per_channel_affine())


def _apply_eval_affine(affine):
    def hook(layer, args, output):
        x = args[0]
        shape = [1, -1] + [1] * (x.dim() - 2)
        dtype = statistics_dtype(x)
        scale, shift = (t.to(dtype).view(shape) for t in affine)
        return (x.to(dtype) * scale + shift).to(output.dtype)
    return hook


def _largest_change(before, after):
    """Largest (over layers) mean (over channels) normalization gap between two sets of statistics."""
    changes = [
        normalization_gap(mean, var.double(), before[name][0], before[name][1].double(), eps).mean().item()
        for name, (mean, var, eps) in after.items() if name in before
    ]
    return max(changes, default=0.0)


def _repeatable_pass(model, batches, num_iters, seed):
    """:func:`d2norm.recalibrate` with torch's RNG at ``seed``: every pass draws the same random
    numbers (detectron2's proposal sampling), so passes differ only by the statistics they use."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        recalibrate(model, batches, num_iters)


@torch.no_grad()
def recalibrate_in_inference_regime(model, data_loader, num_iters, max_passes=0, tolerance=0.01):
    """Set population statistics so that each layer's match its inputs under inference-time upstream layers.

    Same preconditions, layer selection and guarantees as :func:`d2norm.recalibrate` (which runs
    every pass); the same ``num_iters`` batches, taken from ``data_loader`` once, serve all passes.

    Args:
        max_passes (int): at most this many passes (1 is :func:`d2norm.recalibrate`); 0: the
            number of recalibrated layers + 1, enough for the exact fixed point of any feed-forward
            model (its norm depth is at most the number of layers).
        tolerance (float): stop after the first pass that moves no layer's statistics by more.

    Returns:
        ``(passes, change)``: passes run and the change of the last one (0.0 after one pass).
    """
    if max_passes < 0:
        raise ValueError(f"max_passes must be >= 0 (0: automatic), got {max_passes}")
    batches = list(itertools.islice(data_loader, num_iters))
    seed = int(torch.randint(2**31 - 1, ()))
    _repeatable_pass(model, batches, num_iters, seed)
    layers = [layer for _, layer in population_norm_layers(model) if layer.training or not model.training]
    max_passes = max_passes or len(layers) + 1
    passes, change = 1, 0.0
    while passes < max_passes:
        before = population_statistics(model)
        handles = [layer.register_forward_hook(_apply_eval_affine(_eval_affine(layer))) for layer in layers]
        try:
            _repeatable_pass(model, batches, num_iters, seed)
        finally:
            for handle in handles:
                handle.remove()
        passes += 1
        change = _largest_change(before, population_statistics(model))
        logger.info(f"Inference-regime recalibration: pass {passes}, largest change {change:.4g}.")
        if change <= tolerance:
            break
    return passes, change
