"""MABN: Moving Average Batch Normalization (Yan et al., ICLR 2020, arXiv 2001.06838).

Official detection variant (megvii-model/MABN ``det/maskrcnn_benchmark/layers/MABN.py``, same as
``MABN.py``): no mean-centring — x is divided by the root of its per-channel second moment
χ = mean(x²); the forward statistic is the simple moving average (SMAS) of χ over the last m
iterations, renormalised towards the exponential moving average (EMAS) ``running_var`` by a clipped
factor r (BRN-style); the backward replaces the batch statistic Ψ = mean(g·z) by its SMAS over the
same m iterations. The preceding conv should be weight-centralised
(:mod:`d2norm.layers.weight_centralization`), which stands in for the mean subtraction.
"""
import logging
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._compat import batch_norm_backward_reductions
from .interface import NormLayer, TrainingStatistics
from .per_channel import REDUCE_DIMS, keep_float32_buffers, per_channel, register_affine, statistics_dtype
from .recomputation import refuse_recomputation

__all__ = ["MovingAverageBatchNorm2d"]

logger = logging.getLogger(__name__)

def _channel_affine(x, scale, shift):
    """``scale[c] * x + shift[c]`` computed in the statistics dtype, returned in x's dtype."""
    dtype = statistics_dtype(x)
    return (x.to(dtype) * per_channel(scale.to(dtype)) + per_channel(shift.to(dtype))).to(x.dtype)


class _MovingAverageNormFunction(torch.autograd.Function):
    """out = γ·r·x/√(var+eps) + β with MABN's backward (official ``BatchNormFunction.backward``).

    Backward, with z = x/√(var+eps) and g = G·γ·r (r a constant, as in batch renormalisation):
    Ψ = mean_{N,H,W}(g·z) is written to ``buffer_gz[slot]`` (only where finite, so a loss-scaler
    overflow step does not poison the next m iterations, and only if the forward ``advanced`` the
    state), Ψ̄ = mean over ``buffer_gz`` in SMAS
    mode else Ψ, and ∂L/∂x = (g − z·Ψ̄)/√(var+eps); ∂L/∂γ = Σ G·r·z, ∂L/∂β = Σ G.

    Both directions run on torch's fused BatchNorm kernels: the forward is the inference form of
    ``F.batch_norm`` with mean 0, variance ``var`` and weight γ·r; in the backward one
    ``native_batch_norm_backward`` of that form gives G·γ·r/√(var+eps), Σ G·z and Σ G, so
    Ψ = γ·r·Σ G·z / (NHW) and ∂L/∂x = G·γ·r/√(var+eps) − x·Ψ̄/(var+eps) (one more pass).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, var, r, eps, buffer_gz, slot, use_smas, advanced, reduce):
        gain = r if weight is None else r * weight.to(var.dtype)
        beta = None if bias is None else bias.to(var.dtype)
        zero_mean = torch.zeros_like(var)
        ctx.save_for_backward(x, weight, var, r, gain, zero_mean)
        ctx.eps = eps
        # Not saved tensors: backward writes the current slot and reads the others as they are then.
        ctx.buffer_gz, ctx.slot, ctx.use_smas, ctx.advanced = buffer_gz, slot, use_smas, advanced
        ctx.reduce = reduce  # None, or (Σ G·z, count) -> their sums over the process group
        return F.batch_norm(x, zero_mean, var, gain, beta, False, 0.0, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, var, r, gain, zero_mean = ctx.saved_tensors
        buffer_gz = ctx.buffer_gz
        count = x.numel() // x.shape[1]
        if x.numel() == 0:  # a rank without values still takes part in the reduction
            grad_x, sum_grad_z, sum_grad = torch.zeros_like(x), torch.zeros_like(var), torch.zeros_like(var)
        else:
            grad_x, sum_grad_z, sum_grad = batch_norm_backward_reductions(
                grad_out, x, gain, zero_mean, var, ctx.eps, input_grad=True)
        total_grad_z = sum_grad_z  # Ψ's sum: this process's, or the group's (parameter gradients stay local)
        if ctx.reduce is not None:  # a tensor count only where it is reduced
            total_grad_z, count = ctx.reduce(sum_grad_z, torch.tensor(float(count), dtype=var.dtype, device=var.device))
        psi = gain * total_grad_z / count
        previous = buffer_gz.index_select(0, ctx.slot)[0]
        stored = torch.where(psi.isfinite() & ctx.advanced, psi.to(buffer_gz.dtype), previous)
        buffer_gz.index_copy_(0, ctx.slot, stored[None])
        psi_bar = torch.where(ctx.use_smas, buffer_gz.mean(dim=0).to(psi.dtype), psi)
        grad_x = grad_x.to(var.dtype).addcmul_(x, per_channel(-psi_bar / (var + ctx.eps))).to(x.dtype)
        grad_weight = grad_bias = None  # weight and bias are both None or both Parameters (affine)
        if ctx.needs_input_grad[1]:
            grad_weight = (sum_grad_z * r).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_grad.to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None


class _Step(NamedTuple):
    advanced: torch.Tensor
    iters: torch.Tensor
    slot: torch.Tensor
    buffer_x2: torch.Tensor
    use_smas: torch.Tensor
    renormalize: torch.Tensor
    var: torch.Tensor
    running_var: torch.Tensor
    ratio: torch.Tensor
    r: torch.Tensor


class MovingAverageBatchNorm2d(NormLayer, nn.Module):
    """Moving Average Batch Normalization for (N, C, H, W) inputs (Yan et al., ICLR 2020; megvii-model/MABN).

    Training step t (1-based count of training forwards, the buffer ``iters``):

    - χ_t = mean_{N,H,W} x² is written to ``buffer_x2[t mod m]``;
    - var = χ_t while t ≤ m or t < warmup_iters, else the mean of ``buffer_x2`` (SMAS);
    - r = √(var+eps)/√(running_var+eps) with the value before this step, fixed to 1 while
      t ≤ max(renorm_free_iters, warmup_iters), then clipped to [1/rmax, rmax];
    - out = γ·r·x/√(var+eps) + β; then running_var ← ema_decay·running_var + (1−ema_decay)·var;
    - backward: see :class:`_MovingAverageNormFunction` (SMAS of Ψ in ``buffer_gz``).

    Eval (or ``frozen``): out = γ·x/√(running_var+eps) + β, a per-channel linear map without
    centring (:meth:`per_channel_affine`). Training forwards whose input needs no gradient
    (``torch.no_grad``, frozen stages) use the batch second moment, empty ones (N·H·W = 0) the
    eval map; neither touches any state. One stateful training forward (followed by its
    backward) per iteration is assumed; statistics are per process, as in the paper. Under a
    dynamic loss scaler (AMP) each buffered Ψ carries its own iteration's loss scale, so for m
    iterations after a scale change the backward SMAS mixes scales (by the scaler's factor, 2).

    State (registered buffers, so checkpoints restore it): ``running_var`` (C,), the EMA of the
    second moment E[x²] (init 1); ``iters`` int64 scalar; ``buffer_x2`` and ``buffer_gz`` (m, C).
    Statistics and buffers are float32 for half/bfloat16 inputs and stay float32 under
    ``.half()``/``.to(torch.bfloat16)``; the output has the input dtype.

    Non-finite values: a training step whose χ has a NaN/inf leaves every buffer as it was
    (``iters`` included, so the step does not count) and its backward stores no Ψ; the skip is
    counted in ``nonfinite_skips`` (per process, not saved). The next finite batch trains normally.

    Checkpoints: a BatchNorm/FrozenBN state dict (``running_mean``, ``running_var``, optionally
    ``num_batches_tracked``; no ``iters``) loads with running_var := running_var + running_mean²
    (the second moment MABN divides by), iters := 0 and empty ring buffers, and logs a note. A
    checkpoint whose ring buffers have another size m (or lack them) loads its ``running_var`` with
    iters := 0 and empty ring buffers (warm-up restarts), and logs a note.
    The official implementation's (1, C, 1, 1) ``running_var`` and (1,) ``iters`` are reshaped.

    Args:
        num_features (int): number of channels C.
        buffer_size (int): m, iterations in the simple moving averages.
        warmup_iters (int): iterations normalised with the current batch's χ.
        renorm_free_iters (int): iterations with r fixed to 1.
        rmax (float): clip bound λ of r (≥ 1).
        ema_decay (float): weight of the old value in the EMA of ``running_var`` (paper: 0.98).
        eps (float): added to the second moment inside the square root.
        affine (bool): learnable per-channel ``weight`` (γ, init 1) and ``bias`` (β, init 0).

    State version (``_version``): 2 stores ``running_var`` as (C,) and ``iters`` as a scalar;
    version 1 (``nn.Module``'s: the official layer's (1, C, 1, 1) and (1,) shapes, and d2norm's
    before it had its own version) is migrated on load.
    """

    _version = 2
    kind = "MABN"
    conv_binding = "centralize"

    def __init__(self, num_features, buffer_size=16, warmup_iters=100, renorm_free_iters=1000, rmax=5.0,
                 ema_decay=0.98, eps=1e-5, affine=True):
        super().__init__()
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if warmup_iters < 0 or renorm_free_iters < 0:
            raise ValueError(
                f"warmup_iters and renorm_free_iters must be >= 0, got {warmup_iters}, {renorm_free_iters}"
            )
        if rmax < 1.0:
            raise ValueError(f"rmax must be >= 1, got {rmax}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.num_features = num_features
        self.buffer_size = buffer_size
        self.warmup_iters = warmup_iters
        self.renorm_free_iters = renorm_free_iters
        self.rmax = rmax
        self.ema_decay = ema_decay
        self.eps = eps
        self.affine = affine
        # Set for layers in frozen stages (freeze_statistics): always use the eval map.
        self.frozen = False
        register_affine(self, num_features, affine)
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long))
        self.register_buffer("buffer_x2", torch.zeros(buffer_size, num_features))
        self.register_buffer("buffer_gz", torch.zeros(buffer_size, num_features))
        self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"MovingAverageBatchNorm2d expects (N, C, H, W) input, got {tuple(x.shape)}")
        if not self.training or self.frozen or (x.numel() == 0 and not self.synchronized):
            scale, shift = self.per_channel_affine()
            return _channel_affine(x, scale, shift)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self._normalize_statelessly(x)
        refuse_recomputation(self)
        var, r, slot, use_smas, advanced = self._advance_statistics(x)
        return _MovingAverageNormFunction.apply(
            x, self.weight, self.bias, var, r, self.eps, self.buffer_gz, slot, use_smas, advanced,
            self._backward_reduction(),
        )

    # Statistics over this process only; SyncMovingAverageBatchNorm2d reduces them over a group.
    synchronized = False

    def _batch_second_moment(self, x):
        """χ = mean over (N, H, W) of x², per channel, in the statistics dtype."""
        return x.to(statistics_dtype(x)).square().mean(dim=REDUCE_DIMS)

    def _backward_reduction(self):
        """None: Ψ from this process's values (see :class:`_MovingAverageNormFunction`)."""
        return None

    def per_channel_affine(self):
        """``(scale, shift)`` with eval output ``scale[c]·x + shift[c]``: (γ/√(running_var+eps), β).

        Differentiable in γ and β (eval-mode training, e.g. population statistics frozen late).
        """
        scale = torch.rsqrt(self.running_var + self.eps)
        if not self.affine:
            return scale, torch.zeros_like(scale)
        return self.weight * scale, self.bias.clone()

    def _normalize_statelessly(self, x):
        """γ·x/√(χ+eps) + β with the batch's χ: the warm-up formula, without touching state."""
        scale = torch.rsqrt(self._batch_second_moment(x) + self.eps)
        if not self.affine:
            return _channel_affine(x, scale, torch.zeros_like(scale))
        return _channel_affine(x, self.weight * scale, self.bias)

    def schedule(self, iters):
        """``(use_smas, renormalize)`` at training step ``iters`` (a tensor): whether the forward
        statistic is the SMAS (warm-up over) and whether r is clipped rather than fixed to 1."""
        use_smas = (iters > self.buffer_size) & (iters >= self.warmup_iters)
        return use_smas, iters > max(self.renorm_free_iters, self.warmup_iters)

    @torch.no_grad()
    def _next_step(self, x):
        """Training step t+1 on ``x`` as the official ``MABN2d.forward`` computes it, without changing
        any state: χ, whether it is finite (``advanced``), the counter and ring buffer after the
        write, the schedule, the forward statistic ``var``, the ratio √(var+eps)/√(running_var+eps)
        and the renorm factor r. A non-finite χ advances nothing (its slot keeps its value)."""
        chi = self._batch_second_moment(x)
        advanced = chi.isfinite().all()
        iters = self.iters + advanced
        slot = (iters % self.buffer_size).view(1)
        kept = self.buffer_x2.index_select(0, slot)
        buffer_x2 = self.buffer_x2.index_copy(0, slot, torch.where(advanced, chi.to(self.buffer_x2.dtype)[None], kept))
        use_smas, renormalize = self.schedule(iters)
        var = torch.where(use_smas, buffer_x2.mean(dim=0).to(chi.dtype), chi)
        running_var = self.running_var.to(chi.dtype)
        ratio = torch.sqrt(var + self.eps) / torch.sqrt(running_var + self.eps)
        r = torch.where(renormalize, ratio.clamp(1.0 / self.rmax, self.rmax), torch.ones_like(ratio))
        return _Step(advanced, iters, slot, buffer_x2, use_smas, renormalize, var, running_var, ratio, r)

    @torch.compiler.disable
    @torch.no_grad()
    def _advance_statistics(self, x):
        """Take step t+1 (:meth:`_next_step`): write χ and the counter, update the EMA.

        All schedule decisions stay on the device (no host synchronisation).

        Never compiled: ``torch.compile`` sees var and r as inputs of the normalisation. Traced
        together, its partitioner may recompute them in the backward from the buffers this step
        has already updated in place (wrong gradients once r != 1).
        """
        step = self._next_step(x)
        self.iters.copy_(step.iters)
        self.nonfinite_skips += ~step.advanced
        self.buffer_x2.copy_(step.buffer_x2)
        updated = self.ema_decay * step.running_var + (1.0 - self.ema_decay) * step.var
        self.running_var.copy_(torch.where(step.advanced, updated, step.running_var))
        return step.var, step.r, step.slot, step.use_smas, step.advanced

    # ------------------------------------------------------------------ NormLayer interface
    def estimates_population(self):
        return not self.frozen

    def population_statistics(self):
        return None, self.running_var.detach().clone()

    @torch.no_grad()
    def set_population_statistics(self, mean, second_moment):
        self.running_var.copy_(second_moment)

    def trains_statistics(self, x):
        return (self.training and not self.frozen and torch.is_grad_enabled() and x.requires_grad
                and x.numel() > 0)

    @torch.no_grad()
    def training_statistics(self, x):
        """No mean (MABN does not centre) and the variance (var+eps)/r² - eps, so that the forward's
        x·r/√(var+eps) is x/√(variance+eps); with the fraction of channels whose r is clipped
        (``mabn_clip_rate``), the forward statistic over the EMAS (``mabn_smas_emas_ratio``) and
        the schedule (``mabn_warmed_up``: SMAS in use, ``mabn_renorm``: r clipped, not 1)."""
        step = self._next_step(x)
        renormalize = bool(step.renormalize)
        clipped = (step.ratio < 1.0 / self.rmax) | (step.ratio > self.rmax)
        metrics = {
            "mabn_clip_rate": clipped.float().mean() if renormalize else 0.0,
            "mabn_smas_emas_ratio": (step.var / step.running_var.clamp(min=self.eps)).mean(),
            "mabn_warmed_up": float(bool(step.use_smas)),
            "mabn_renorm": float(renormalize),
        }
        return TrainingStatistics(None, (step.var + self.eps) / step.r.square() - self.eps, metrics)

    @torch.no_grad()
    def backward_statistics(self, g, psi):
        """No g (MABN does not centre); ψ the SMAS of ``buffer_gz`` once warm-up is over (Yan et al.
        2020: the moving average that replaces the batch statistic in backward), else the step's
        own Ψ as its backward stored it (for SyncMABN, the process group's)."""
        use_smas, _ = self.schedule(self.iters)
        current = self.buffer_gz[self.iters % self.buffer_size]
        return None, torch.where(use_smas, self.buffer_gz.mean(dim=0), current).to(psi.dtype)

    def freeze_statistics(self, frozen):
        self.frozen = bool(frozen)

    def cross_iteration_buffers(self):
        return {"buffer_x2": self.buffer_x2, "buffer_gz": self.buffer_gz}

    def in_warmup(self):
        return int(self.iters) <= max(self.warmup_iters, self.renorm_free_iters, self.buffer_size)

    @torch.no_grad()
    def skip_warmup(self):
        self.iters.clamp_(min=max(self.warmup_iters, self.renorm_free_iters, self.buffer_size))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        return keep_float32_buffers(self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        var_key, mean_key, iters_key = prefix + "running_var", prefix + "running_mean", prefix + "iters"
        version = local_metadata.get("version")
        if version is None or version < 2:  # the official layout
            if var_key in state_dict:
                state_dict[var_key] = state_dict[var_key].reshape(-1)
            if iters_key in state_dict:
                state_dict[iters_key] = state_dict[iters_key].reshape(())
        if iters_key in state_dict:
            self._reset_ring_buffers_of_another_size(state_dict, prefix)
        elif mean_key in state_dict and var_key in state_dict:
            running_mean = state_dict.pop(mean_key)
            state_dict.pop(prefix + "num_batches_tracked", None)
            state_dict[var_key] = state_dict[var_key] + running_mean.reshape(-1) ** 2
            state_dict[iters_key] = torch.zeros_like(self.iters)
            state_dict[prefix + "buffer_x2"] = torch.zeros_like(self.buffer_x2)
            state_dict[prefix + "buffer_gz"] = torch.zeros_like(self.buffer_gz)
            logger.info(
                "%s: loaded BatchNorm statistics into MovingAverageBatchNorm2d as the second moment "
                "(running_var := running_var + running_mean**2), iters = 0, empty ring buffers.",
                prefix.rstrip(".") or "MovingAverageBatchNorm2d",
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _reset_ring_buffers_of_another_size(self, state_dict, prefix):
        """Ring buffers of another m (or dropped by a loader for their shape) cannot be continued:
        keep the saved ``running_var``, restart ``iters`` with empty ring buffers."""
        ring = [prefix + "buffer_x2", prefix + "buffer_gz"]
        shapes = [None if key not in state_dict else tuple(state_dict[key].shape) for key in ring]
        if shapes == [tuple(self.buffer_x2.shape)] * 2:
            return
        state_dict[prefix + "iters"] = torch.zeros_like(self.iters)
        state_dict[ring[0]] = torch.zeros_like(self.buffer_x2)
        state_dict[ring[1]] = torch.zeros_like(self.buffer_gz)
        saved = "missing" if None in shapes else f"of size {shapes[0][0]}"
        logger.info(
            "%s: checkpoint ring buffers are %s, this layer has buffer_size %d: loaded running_var, "
            "restarted iters = 0 with empty ring buffers.",
            prefix.rstrip(".") or "MovingAverageBatchNorm2d", saved, self.buffer_size,
        )

    def extra_repr(self):
        return (
            f"{self.num_features}, buffer_size={self.buffer_size}, warmup_iters={self.warmup_iters}, "
            f"renorm_free_iters={self.renorm_free_iters}, rmax={self.rmax}, ema_decay={self.ema_decay}, "
            f"eps={self.eps}, affine={self.affine}"
        )
