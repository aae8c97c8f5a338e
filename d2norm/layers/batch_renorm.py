"""BRN: Batch Renormalization (Ioffe, NeurIPS 2017, arXiv 1702.03275), the small-batch baseline of
the MABN and CBN papers.

A training batch is normalised with its own statistics μ_B, σ_B = √(σ²_B + ε) and then moved to the
population ones (μ, σ = √(running_var + ε)) by a per-channel affine that the gradient treats as a
constant (Ioffe 2017, Algorithm 1):

    r = stop_gradient(clip(σ_B / σ, 1/r_max, r_max)),   d = stop_gradient(clip((μ_B − μ) / σ, −d_max, d_max)),
    x̂ = (x − μ_B) / σ_B · r + d,   y = γ x̂ + β,

so that r = 1, d = 0 is BatchNorm and unclipped r, d give exactly the inference normalisation
(x − μ) / σ. The population statistics are BatchNorm's EMA of the batch mean and unbiased variance
(``momentum``), updated after r and d are taken; inference is BatchNorm's. Ioffe's schedule: plain
BN (r_max = 1, d_max = 0) for the first 5000 iterations, then r_max relaxed linearly to 3 by
iteration 40k and d_max to 5 by iteration 25k; the iteration counter is a buffer (resume continues
the schedule), and the schedule is evaluated on the device.

Differences from the paper: the EMA is kept on the variance (as BatchNorm, so a BN checkpoint
loads unchanged) rather than on σ.
"""
import torch
import torch.nn as nn

from .interface import BatchNormStatistics, TrainingStatistics
from .per_channel import (
    REDUCE_DIMS,
    batch_norm_keeping_finite_statistics,
    keep_float32_buffers,
    per_channel,
    statistics_dtype,
)
from .recomputation import refuse_recomputation

__all__ = ["BatchRenorm2d"]


def _ramp(iteration, start, end):
    """The fraction of a linear ramp from iteration ``start`` to ``end`` done at ``iteration`` (a
    tensor): 0 up to ``start``, 1 from ``end``."""
    if end <= start:
        return (iteration >= start).to(torch.float64)
    return ((iteration - start).to(torch.float64) / (end - start)).clamp(0.0, 1.0)


class BatchRenorm2d(BatchNormStatistics, nn.BatchNorm2d):
    """Batch Renormalization for (N, C, H, W) inputs.

    Args:
        num_features: C.
        rmax, dmax: the final clip bounds r_max (≥ 1) and d_max (≥ 0).
        warmup_iters: training iterations of plain BatchNorm (r = 1, d = 0) before the ramps start.
        rmax_iters, dmax_iters: the iterations at which r_max and d_max reach their final values
            (linear ramps from ``warmup_iters``).
        momentum, eps, affine: as ``nn.BatchNorm2d``.

    A training forward with autograd enabled and an input that requires grad is one iteration: it
    advances ``train_iterations``. Other training forwards (``torch.no_grad``, a frozen input) are
    ``nn.BatchNorm2d``'s; eval is ``nn.BatchNorm2d``'s. A training batch whose statistics are not
    finite leaves the running statistics as they were (counted in ``nonfinite_skips``, per process);
    the statistics stay float32 under ``.half()``/``.to(torch.bfloat16)``.
    """

    kind = "BRN"

    def __init__(self, num_features, rmax=3.0, dmax=5.0, warmup_iters=5000, rmax_iters=40000, dmax_iters=25000,
                 momentum=0.1, eps=1e-5, affine=True):
        if not rmax >= 1.0 or not dmax >= 0.0:
            raise ValueError(f"BRN needs rmax >= 1 and dmax >= 0, got rmax={rmax!r}, dmax={dmax!r}")
        for name, value in (("warmup_iters", warmup_iters), ("rmax_iters", rmax_iters), ("dmax_iters", dmax_iters)):
            if int(value) != value or value < 0:
                raise ValueError(f"BRN {name} must be an integer >= 0, got {value!r}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_iters, self.rmax_iters, self.dmax_iters = int(warmup_iters), int(rmax_iters), int(dmax_iters)
        self.register_buffer("train_iterations", torch.zeros((), dtype=torch.long))
        self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.long), persistent=False)

    def extra_repr(self):
        return (f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup_iters={self.warmup_iters}, "
                f"rmax_iters={self.rmax_iters}, dmax_iters={self.dmax_iters}")

    def clip_bounds(self, iteration):
        """``(r_max, d_max)`` at training iteration ``iteration`` (1-based, a tensor) of the schedule."""
        r_max = 1.0 + (self.rmax - 1.0) * _ramp(iteration, self.warmup_iters, self.rmax_iters)
        d_max = self.dmax * _ramp(iteration, self.warmup_iters, self.dmax_iters)
        return r_max, d_max

    def _correction(self, x, iteration):
        """Batch mean and biased variance of ``x``, and r, d (Algorithm 1) from the running statistics."""
        dtype = statistics_dtype(x)
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach().to(dtype), dim=REDUCE_DIMS, correction=0)
            sigma = torch.sqrt(self.running_var.to(dtype) + self.eps)
            r_max, d_max = (bound.to(dtype) for bound in self.clip_bounds(iteration))
            r = (torch.sqrt(var + self.eps) / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean - self.running_mean.to(dtype)) / sigma).clamp(-d_max, d_max)
        return mean, var, r, d

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled() and x.requires_grad) or x.numel() == 0:
            return super().forward(x)
        self._check_input_dim(x)
        refuse_recomputation(self)
        self.train_iterations.add_(1)
        _, _, r, d = self._correction(x, self.train_iterations)
        # BatchNorm of the batch (gradient through μ_B, σ_B; running statistics updated), then r, d.
        normalized = batch_norm_keeping_finite_statistics(self, x, None, None)
        out = normalized * per_channel(r.to(x.dtype)) + per_channel(d.to(x.dtype))
        if self.weight is None:
            return out
        return out * per_channel(self.weight.to(x.dtype)) + per_channel(self.bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        return keep_float32_buffers(self)

    # ------------------------------------------------------------------ NormLayer interface
    def trains_statistics(self, x):
        return self.training and torch.is_grad_enabled() and x.requires_grad and x.numel() > 0

    @torch.no_grad()
    def training_statistics(self, x):
        """x̂ = (x − μ_B)/σ_B · r + d is (x − mean)/√(var + ε) with mean = μ_B − d σ_B / r and
        var = σ²_B / r² − ε; metrics: the fraction of channels whose r (``brn_r_clip_rate``) or d
        (``brn_d_clip_rate``) is clipped, and whether the schedule has left plain BN (``brn_renorm``)."""
        mean, var, r, d = self._correction(x, self.train_iterations + 1)
        sigma_b = torch.sqrt(var + self.eps)
        sigma = torch.sqrt(self.running_var.to(var.dtype) + self.eps)
        r_max, d_max = (bound.to(var.dtype) for bound in self.clip_bounds(self.train_iterations + 1))
        metrics = {
            "brn_r_clip_rate": (r != sigma_b / sigma).float().mean(),
            "brn_d_clip_rate": (d != (mean - self.running_mean.to(mean.dtype)) / sigma).float().mean(),
            "brn_renorm": float(bool(r_max > 1.0) or bool(d_max > 0.0)),
        }
        return TrainingStatistics(mean - d * sigma_b / r, sigma_b.square() / r.square() - self.eps, metrics)

    def in_warmup(self):
        return int(self.train_iterations) < max(self.rmax_iters, self.dmax_iters)

    @torch.no_grad()
    def skip_warmup(self):
        self.train_iterations.clamp_(min=max(self.rmax_iters, self.dmax_iters))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        # A BatchNorm checkpoint (ImageNet weights) has no counter: the schedule starts at 0.
        state_dict.setdefault(prefix + "train_iterations", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)
