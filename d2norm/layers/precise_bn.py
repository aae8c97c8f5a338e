"""PreciseBN: BatchNorm whose population statistics come only from recalibration.

"Rethinking 'Batch' in BatchNorm" (Wu & Johnson, 2021), Sec. 3: the EMA of batch statistics taken
while the weights change is a stale, noisy estimate of the population statistics. This layer
therefore normalises with the batch statistics in training (Eq. 1 of Ioffe & Szegedy) and never
updates ``running_mean``/``running_var`` itself; :func:`d2norm.recalibrate` computes them with the
model fixed, and the ``recalibrated`` buffer records that it did (so checkpoints keep it).
The statistics stay float32 under ``.half()``/``.to(torch.bfloat16)``.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .interface import BatchNormStatistics
from .per_channel import batch_norm_affine, keep_float32_buffers

__all__ = ["NotRecalibratedError", "PreciseBatchNorm2d"]


class NotRecalibratedError(RuntimeError):
    """A PreciseBatchNorm2d was asked for population statistics it has never been given."""


class PreciseBatchNorm2d(BatchNormStatistics, nn.BatchNorm2d):
    """BatchNorm2d without EMA: batch statistics in training, recalibrated statistics in eval.

    Args:
        num_features (int): number of channels C.
        eps (float): added to the variance inside the square root.
        affine (bool): learnable per-channel ``weight`` (γ) and ``bias`` (β), as in torch BN.
    """

    kind = "PreciseBN"
    needs_recalibration = True

    def __init__(self, num_features, eps=1e-5, affine=True):
        super().__init__(num_features, eps=eps, momentum=None, affine=affine, track_running_stats=True)
        self.register_buffer("recalibrated", torch.zeros((), dtype=torch.bool))

    def forward(self, x):
        if self.training:
            return self._normalize(x, None, None)
        self._check_recalibrated()
        return self._normalize(x, self.running_mean, self.running_var)

    def _normalize(self, x, mean, var):
        # Half/bfloat16 inputs: torch's kernels accumulate the batch statistics in float32 and
        # take the affine in the dtype of the (float32) statistics buffers.
        weight, bias = (None if p is None else p.to(self.running_var.dtype) for p in (self.weight, self.bias))
        return F.batch_norm(x, mean, var, weight, bias, mean is None, 0.0, self.eps)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        return keep_float32_buffers(self)

    def _check_recalibrated(self):
        if not bool(self.recalibrated):
            raise NotRecalibratedError(
                "PreciseBatchNorm2d has no population statistics: it never updates them in "
                "training. Run d2norm.recalibrate(model, data_loader, num_iters) before "
                "evaluating, or train with D2NORM.PRECISE_BN.ENABLED True (the trainer then "
                "recalibrates before every evaluation and at the end of training)."
            )

    def per_channel_affine(self):
        """``(scale, shift)`` with eval output ``scale[c] * x + shift[c]``.

        scale = γ / sqrt(running_var + eps), shift = β - running_mean * scale.
        """
        self._check_recalibrated()
        return batch_norm_affine(self)

    def has_population_statistics(self):
        return bool(self.recalibrated)

    @torch.no_grad()
    def set_population_statistics(self, mean, second_moment):
        super().set_population_statistics(mean, second_moment)
        self.recalibrated.fill_(True)

    @contextlib.contextmanager
    def placeholder_statistics(self):
        recalibrated = self.recalibrated.clone()
        self.recalibrated.fill_(True)
        try:
            yield
        finally:
            self.recalibrated.copy_(recalibrated)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        # A plain BatchNorm checkpoint (ImageNet weights) has no flag: its EMA statistics do
        # not count as recalibrated, so the layer keeps ``recalibrated = False``.
        state_dict.setdefault(prefix + "recalibrated", torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)
