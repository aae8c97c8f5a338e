"""CBN: Cross-Iteration Batch Normalization (Yao et al., CVPR 2021, arXiv 2002.05712).

A conv output is normalised with per-channel statistics pooled over the current training iteration
and the previous ``window - 1`` ones. Each past statistic was computed with older conv weights, so it
is first moved to the current weights ``W_t`` by a first-order Taylor step through the conv that
feeds the layer (CBN paper, Sec. 3.2; official ``mmdet/models/utils/CBN.py``):

    mean~ = mean_old + <d mean/dW, W_t - W_old>_c          (exact: the mean is linear in W)
    var~  = var_old  + <d var/dW,  W_t - W_old>_c - (mean~ - mean_old)^2

which is the official code's compensated mean-of-squares rewritten with the biased variance, so
that nothing cancels at the scale of mean^2. Per channel, past entries with ``var~ < 0`` are left out
and the rest are averaged with the current batch (equal weight per iteration). The gradient flows
through the current batch only (official ``CBatchNorm2d.forward`` detaches the past).

Conventions: textbook BN inside the layer (biased variance, eps inside the square
root), so burn-in and ``window=1`` are exactly ``nn.BatchNorm2d``; running statistics come from the
current batch as in ``nn.BatchNorm2d``. Unlike the official code, the current batch always counts
(its variance is non-negative by construction, so the count is never 0) and a non-finite past
entry is dropped rather than propagated. Efficient bookkeeping (CBN paper, Sec. 3.3): per past iteration the layer keeps
the mean input patch (one per conv group), d var/dW (one weight-sized tensor), and the per-channel
scalars ``<d stat/dW, W_old>`` in place of a weight snapshot, all in fixed-size ring buffers.

Robustness: a training batch with non-finite statistics leaves the window and the running
statistics as they were (counted in ``nonfinite_skips``); statistics buffers stay float32 under
``.half()``/``.to(torch.bfloat16)``; no buffer has more than 4 dimensions, so
``model.to(memory_format=torch.channels_last)`` works.
"""
import weakref
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from .._compat import batch_norm_backward_reductions
from .interface import BatchNormStatistics, TrainingStatistics
from .per_channel import (
    REDUCE_DIMS,
    all_finite,
    batch_norm_keeping_finite_statistics,
    keep_float32_buffers,
    per_channel,
    statistics_dtype,
)
from .recomputation import refuse_recomputation

__all__ = [
    "CrossIterationBatchNorm2d", "conv_statistic_gradients", "cross_iteration_batch_norm", "mean_input_patch",
    "pooled_statistics",
]

# Buffers holding the window; restored or reset together (see _load_from_state_dict).
_WINDOW_STATE = (
    "history_length",
    "history_next",
    "history_mean",
    "history_var",
    "history_mean_grad",
    "history_var_grad",
    "history_mean_grad_dot_weight",
    "history_var_grad_dot_weight",
)


def input_patch_sum(conv_input, kernel_size, stride, padding, dilation):
    """``(Σ_m p_m, M)``: the sum over the M = N H_out W_out output positions of the conv's input
    patch (zero padding included), a ``(C_in, kh, kw)`` tensor, and M.

    Tap (u, v) of the patch sums the input over the output grid shifted by (u, v) times the
    dilation. The sum is separable: one strided slice sum per kernel row over the batch-summed,
    padded input, then one per kernel column (a few passes over one image, where a conv
    weight-gradient would unfold the whole batch).
    """
    n, _, h, w = conv_input.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    image = F.pad(conv_input.sum(0), (pw, pw, ph, ph))
    rows = torch.stack([image[:, u * dh: u * dh + (h_out - 1) * sh + 1: sh].sum(1) for u in range(kh)], 1)
    taps = torch.stack([rows[:, :, v * dw: v * dw + (w_out - 1) * sw + 1: sw].sum(2) for v in range(kw)], 2)
    return taps, n * h_out * w_out


def mean_input_patch(conv_input, kernel_size, stride, padding, dilation):
    """(1/M) sum_m p_m, the mean over the M output positions of the conv's input patch
    (:func:`input_patch_sum`): a ``(C_in, kh, kw)`` tensor."""
    taps, count = input_patch_sum(conv_input, kernel_size, stride, padding, dilation)
    return taps / count


def statistic_gradients_from_sums(patch_sum, weight_grad_sum, count, mean, groups):
    """The two derivatives of :func:`conv_statistic_gradients` from sums over M = ``count`` output
    positions (of one process, or of several added together): ``patch_sum`` = Σ_m p_m and
    ``weight_grad_sum`` = ``conv2d_weight(input, W.shape, conv_output)``, with ``mean`` the conv
    output's per-channel mean over the same positions."""
    mean_patch = patch_sum / count
    c_out = weight_grad_sum.shape[0]
    var_grad = weight_grad_sum.contiguous()
    var_grad.view(groups, c_out // groups, -1).mul_(2.0 / count).addcmul_(
        mean.view(groups, -1, 1), mean_patch.view(groups, 1, -1), value=-2.0
    )
    return mean_patch, var_grad


def conv_statistic_gradients(conv_input, conv_output, mean, weight_shape, stride, padding, dilation, groups):
    """Per-output-channel derivatives of the batch mean and biased variance of a conv output w.r.t.
    the conv weight, without autograd (CBN paper, Sec. 3.3: only the diagonal blocks are non-zero).

    ``conv_output = conv2d(conv_input, W, stride, padding, dilation, groups)`` (a bias changes
    nothing) and ``mean`` is its per-channel mean. Both Jacobians are block-diagonal over output
    channels, so only the diagonal blocks are returned:

    - d mean_c / d W[c] = (1/M) sum_m p_m, the mean input patch (:func:`mean_input_patch`),
      identical for every output channel of a group: returned once, as a ``(C_in, kh, kw)`` tensor
      whose channel slice ``[g*C_in/groups, (g+1)*C_in/groups)`` belongs to group g;
    - d var_c / d W[c] = (2/M) sum_m (x_c(m) - mean_c) p_m, returned with the weight's shape.

    The variance term is a conv weight-gradient, linear in its ``grad_output``: it is computed as
    ``(2/M) conv2d_weight(input, x) - 2 mean_c * mean patch``, with the conv output itself as the
    ``grad_output`` (no centred copy of the activation).
    """
    patch_sum, count = input_patch_sum(conv_input, weight_shape[2:], stride, padding, dilation)
    weight_grad_sum = conv2d_weight(conv_input, weight_shape, conv_output, stride, padding, dilation, groups)
    return statistic_gradients_from_sums(patch_sum, weight_grad_sum, count, mean, groups)


def _mean_patch_dot_weight(mean_patch, weight, groups):
    """``<mean patch of c's group, W[c]>`` for every output channel c; ``mean_patch`` is
    ``(L, C_in, kh, kw)``, the result ``(L, C_out)``."""
    entries, c_out = mean_patch.shape[0], weight.shape[0]
    patches = mean_patch.reshape(entries, groups, -1)
    weights = weight.reshape(groups, c_out // groups, -1)
    return torch.einsum("lgp,gop->lgo", patches, weights).reshape(entries, c_out)


def _weight_grad_dot_weight(weight_grad, weight):
    """``<G[c], W[c]>`` for every output channel c; ``weight_grad`` is ``(L, *W.shape)``.

    One row-wise dot product per entry: a single read of the window without batched matrix-vector
    products, and scratch memory of one weight rather than of the whole window."""
    rows = weight.flatten(1)
    return torch.stack([torch.linalg.vecdot(entry, rows) for entry in weight_grad.flatten(2)])


def pooled_statistics(mean, var, past_mean, past_var, past_valid):
    """Mean and biased variance of the union of the current batch and the valid past entries, each
    weighted equally (CBN Eq. 8-9, past entries with a negative compensated variance excluded per
    channel as in the official code), and the count.

    ``mean``, ``var`` are (C,); ``past_mean``, ``past_var``, ``past_valid`` are (L, C).
    """
    count = 1 + past_valid.sum(0)
    pooled_mean = (mean + torch.where(past_valid, past_mean, 0).sum(0)) / count
    spread = torch.where(past_valid, past_var + (past_mean - pooled_mean) ** 2, 0).sum(0)
    pooled_var = (var + (mean - pooled_mean) ** 2 + spread) / count
    return pooled_mean, pooled_var, count


class _CrossIterationBatchNormFunction(torch.autograd.Function):
    """Normalise with the current batch's statistics pooled with fixed past ones (official ``CBatchNorm2d.forward``).

    Both directions run on torch's fused BatchNorm kernels. Forward: the inference form of
    ``F.batch_norm`` with the pooled statistics, y = gamma (x - mean_p) / sqrt(var_p + eps) + beta.
    Backward: with x_hat = (x - mean_p) / sqrt(var_p + eps), s = gamma / sqrt(var_p + eps) and n = k M
    (k pooled entries of M = N H W values), the gradient through the current batch's statistics is

        dL/dx = s (g - sum(g) / n - x_hat sum(g x_hat) / n),

    BN's backward with both batch terms divided by the k entries: ``native_batch_norm_backward``
    gives sum(g) and sum(g x_hat) in one reduction, and dL/dx = s g + A x + B per channel.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, past_mean, past_var, past_valid, eps, reduce, samples):
        dtype = mean.dtype
        pooled_mean, pooled_var, count = pooled_statistics(mean, var, past_mean, past_var, past_valid)
        gamma = torch.ones_like(mean) if weight is None else weight.to(dtype)
        beta = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, gamma, pooled_mean, pooled_var, count)
        ctx.eps = eps
        ctx.reduce, ctx.samples = reduce, samples  # None and M, or a group's sum and its M
        ctx.affine_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return F.batch_norm(x, pooled_mean, pooled_var, gamma, beta, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad_y):
        x, gamma, pooled_mean, pooled_var, count = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.affine_dtypes
        if x.numel() == 0:  # a process without values still takes part in the reduction
            sum_g_x_hat, sum_g = torch.zeros_like(pooled_mean), torch.zeros_like(pooled_mean)
        else:
            _, sum_g_x_hat, sum_g = batch_norm_backward_reductions(
                grad_y, x, gamma, pooled_mean, pooled_var, ctx.eps, input_grad=False)
        total_g_x_hat, total_g = (sum_g_x_hat, sum_g) if ctx.reduce is None else ctx.reduce(sum_g_x_hat, sum_g)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            inv_std = torch.rsqrt(pooled_var + ctx.eps)
            scale = gamma * inv_std
            per_entry = scale / (count * ctx.samples)
            slope = -per_entry * inv_std * total_g_x_hat
            offset = -per_entry * total_g - slope * pooled_mean
            grad_x = torch.addcmul(per_channel(offset), x, per_channel(slope))
            grad_x = grad_x.addcmul_(grad_y, per_channel(scale)).to(x.dtype)
        if weight_dtype is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_g_x_hat.to(weight_dtype)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_g.to(bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def cross_iteration_batch_norm(x, weight, bias, mean, var, past_mean, past_var, past_valid, eps, reduce=None,
                               samples=None):
    """Functional core of CBN's training forward.

    Args:
        x: (N, C, H, W) input; differentiable.
        weight, bias: (C,) affine parameters or None; differentiable.
        mean, var: (C,) mean and biased variance of ``x``, in the statistics dtype (constants).
        past_mean, past_var: (L, C) compensated statistics of past iterations (constants).
        past_valid: (L, C) bool, which past entries each channel pools.
        eps: added to the pooled variance inside the square root.
        reduce: None, or ``(sum_a, sum_b) -> (sum_a, sum_b)`` summing the backward's per-channel batch
            sums over a process group (then ``mean``/``var`` must be the group's statistics).
        samples: M, the values per channel that ``mean``/``var`` are taken over (default: those of ``x``).

    Per channel, the pooled mean and variance are those of the union of ``1 + sum(past_valid)``
    equal-weight entries (the current batch and the valid past ones); the gradient reaches ``x``
    through the current batch's statistics only.
    """
    samples = x.numel() // x.shape[1] if samples is None else samples
    return _CrossIterationBatchNormFunction.apply(
        x, weight, bias, mean, var, past_mean, past_var, past_valid, eps, reduce, samples
    )


class CrossIterationBatchNorm2d(BatchNormStatistics, nn.BatchNorm2d):
    """Cross-Iteration BatchNorm over the conv that feeds it (Yao et al., CVPR 2021; Howal/Cross-iterationBatchNorm).

    Args:
        num_features: C, the channel count.
        window: k, iterations pooled including the current one (the official ``buffer_num`` + 1).
        burnin_iters: training iterations of plain ``nn.BatchNorm2d`` before pooling starts.
        rho: ρ, the weight of the Taylor compensation of the past statistics (the official ``rho``);
            1 is CBN, 0 pools the stored statistics as they are ("naive CBN", the paper's baseline).
        momentum, eps, affine: as ``nn.BatchNorm2d``.

    A training forward with autograd enabled and an input that requires grad is one *iteration*:
    it advances ``train_iterations``, and after burn-in normalises with the pooled window and
    pushes the current statistics into it (the window grows 1, 2, ..., k after the switch). Every
    other forward (eval, ``torch.no_grad``, frozen input, empty batch) is ``nn.BatchNorm2d``'s and
    leaves the window and the counter untouched. The window needs the conv that feeds the layer:
    :meth:`bind_conv` (called by ``d2norm.prepare_model``).

    No training forward reads a device tensor back to the host: burn-in is decided by a Python
    mirror of ``train_iterations`` (set when a state is loaded), and everything else runs on the
    device. A training batch whose mean or variance is not finite updates neither the window nor the
    running statistics (``train_iterations`` still counts it); ``nonfinite_skips`` (per process,
    not saved) counts such batches.

    State version (``_version``, torch's convention): 3 stores ``history_var_grad`` flattened to
    (k-1, C, C_in·kh·kw); version 2 (``nn.BatchNorm2d``'s, which CBN inherited before it had its
    own) may hold it 5-D and is migrated on load.
    """

    _version = 3
    kind = "CBN"
    conv_binding = "bind"

    def __init__(self, num_features, window=8, burnin_iters=0, rho=1.0, momentum=0.1, eps=1e-5, affine=True):
        if int(window) != window or window < 1:
            raise ValueError(f"CBN window must be an integer >= 1, got {window!r}")
        if int(burnin_iters) != burnin_iters or burnin_iters < 0:
            raise ValueError(f"CBN burnin_iters must be an integer >= 0, got {burnin_iters!r}")
        if not rho >= 0:
            raise ValueError(f"CBN rho must be a number >= 0, got {rho!r}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.window = int(window)
        self.burnin_iters = int(burnin_iters)
        self.rho = float(rho)
        past = self.window - 1
        self.register_buffer("train_iterations", torch.zeros((), dtype=torch.long))
        # Ring buffer of the past iterations: slots [0, history_length) are filled, the next write
        # goes to history_next. The derivative buffers get the conv's shape in bind_conv.
        self.register_buffer("history_length", torch.zeros((), dtype=torch.long))
        self.register_buffer("history_next", torch.zeros((), dtype=torch.long))
        self.register_buffer("history_mean", torch.zeros(past, num_features))
        self.register_buffer("history_var", torch.zeros(past, num_features))
        self.register_buffer("history_mean_grad", torch.zeros(past, 0, 0, 0))
        self.register_buffer("history_var_grad", torch.zeros(past, num_features, 0))  # dvar/dW, (C_out, -1)
        # <d stat/dW, W_old>_c, which stands in for the old weight in the Taylor step.
        self.register_buffer("history_mean_grad_dot_weight", torch.zeros(past, num_features))
        self.register_buffer("history_var_grad_dot_weight", torch.zeros(past, num_features))
        self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.long), persistent=False)
        self._conv_ref = None  # weakref to the bound conv (never a submodule: that is a module cycle)
        self._conv_hook = None
        self._conv_call = None  # (conv, conv input) of the current forward, set by the conv's pre-hook
        # ``train_iterations`` mirrored on the host: the schedule never reads a device tensor.
        self._iterations = 0

    def extra_repr(self):
        rho = "" if self.rho == 1.0 else f", rho={self.rho}"
        return f"{super().extra_repr()}, window={self.window}, burnin_iters={self.burnin_iters}{rho}"

    # ------------------------------------------------------------------ conv binding
    def bind_conv(self, conv):
        """Feed this layer the weight and input of ``conv``, the conv whose output it normalises.

        ``conv`` is a ``torch.nn.Conv2d`` (``detectron2.layers.Conv2d`` included) with integer zero
        padding. Registers a forward pre-hook on it; idempotent, and binding another conv replaces
        the previous binding. Parameter names and state_dict keys do not change. Returns ``self``.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"CBN can only be bound to a torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.out_channels != self.num_features:
            raise ValueError(f"conv has {conv.out_channels} output channels, CBN has {self.num_features}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("CBN supports convs with integer zero padding only")
        if self._conv_hook is not None:
            self._conv_hook.remove()
        self._conv_hook = conv.register_forward_pre_hook(self._receive_conv_input)
        self._conv_ref = weakref.ref(conv)
        self._shape_history(conv)
        return self

    def _bound_conv(self):
        return None if self._conv_ref is None else self._conv_ref()

    def _receive_conv_input(self, conv, args):
        if self.training and self.window > 1 and torch.is_grad_enabled():
            self._conv_call = (conv, args[0])

    def _shape_history(self, conv):
        """Size the derivative buffers for ``conv``; a size change empties the window."""
        past, weight_shape = self.window - 1, tuple(conv.weight.shape)
        shapes = {
            "history_mean_grad": (past, conv.in_channels, *weight_shape[2:]),
            "history_var_grad": (past, weight_shape[0], conv.weight[0].numel()),
        }
        for name, shape in shapes.items():
            buf = getattr(self, name)
            if tuple(buf.shape) != shape:
                setattr(self, name, buf.new_zeros(shape))
                self.history_length.zero_()
                self.history_next.zero_()

    # ------------------------------------------------------------------ forward
    def forward(self, x):
        conv_call, self._conv_call = self._conv_call, None  # never keep the conv input alive
        if not (self.training and torch.is_grad_enabled() and x.requires_grad) or (
                x.numel() == 0 and not self.synchronized):
            return self._batch_norm(x)
        refuse_recomputation(self)
        pools = self._count_iteration()
        self.train_iterations.add_(1)
        if not pools:  # burn-in: BN (over the process group when synchronized)
            return self._batch_norm(x) if not self.synchronized else self._pooled_forward(x, None, None)
        if conv_call is None:
            if self._bound_conv() is None:
                raise RuntimeError(
                    "CrossIterationBatchNorm2d is not bound to the conv that feeds it; "
                    "call d2norm.prepare_model(model) after building the model"
                )
            raise RuntimeError("CrossIterationBatchNorm2d: its bound conv did not run right before it")
        return self._pooled_forward(x, *conv_call)

    def _batch_norm(self, x):
        """``nn.BatchNorm2d``'s forward, except that the affine is cast to the statistics' dtype
        (float32 buffers in a half model) and a training batch with non-finite statistics leaves the
        running statistics as they were."""
        self._check_input_dim(x)
        weight, bias = (None if p is None else p.to(self.running_mean.dtype) for p in (self.weight, self.bias))
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
        return batch_norm_keeping_finite_statistics(self, x, weight, bias)

    @torch.compiler.disable
    def _count_iteration(self):
        """Advance the host-side counter; whether this iteration pools. Never compiled: torch.compile
        would specialise on the counter and recompile at every iteration."""
        pools = self.pools_window()
        self._iterations += 1
        return pools

    def pools_window(self):
        """Whether the next training iteration pools the window (burn-in over and ``window > 1``)."""
        return self.window > 1 and self._iterations >= self.burnin_iters

    @torch.no_grad()
    def compensated_window(self):
        """``(past_mean, past_var, past_valid)``, each (k - 1, C): the stored past statistics moved to
        the bound conv's current weight and which of them the next training forward would pool
        (empty slots and negative compensated variances are not valid); None if no conv is bound."""
        conv = self._bound_conv()
        if conv is None:
            return None
        weight = conv.weight.detach().to(torch.promote_types(conv.weight.dtype, torch.float32))
        return self._compensated_history(weight, conv.groups)

    def _pooled_forward(self, x, conv, conv_input):
        """The training forward with the window (``conv`` given) or, without ``conv``, with the
        current batch alone (a synchronised layer's burn-in)."""
        dtype = statistics_dtype(x)
        device = x.device.type  # "meta" has no autocast
        no_autocast = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else None
        with torch.no_grad(), no_autocast or nullcontext():
            xs = x.detach().to(dtype)
            mean, var, samples = self._batch_statistics(xs)
            finite = all_finite(mean, var)
            if conv is None:
                past_mean = past_var = mean.new_zeros(0, self.num_features)
                past_valid = past_mean.bool()
            else:
                weight = conv.weight.detach().to(dtype)
                past_mean, past_var, past_valid = self._compensated_history(weight, conv.groups)
                mean_grad, var_grad = self._statistic_gradients(conv, conv_input.detach().to(dtype), xs, mean)
                self._push_history(conv.groups, mean_grad, var_grad, mean, var, weight, finite)
            self._update_running_stats(mean, var * (samples / (samples - 1)), finite)
            self.nonfinite_skips.add_((~finite).long())
        return cross_iteration_batch_norm(
            x, self.weight, self.bias, mean, var, past_mean, past_var, past_valid, self.eps,
            self._backward_reduction(), samples,
        )

    # Statistics over this process only; SyncCrossIterationBatchNorm2d reduces them over a group.
    synchronized = False

    def _batch_statistics(self, xs):
        """``(mean, biased variance, M)`` of ``xs`` over its M = N H W values per channel."""
        samples = xs.numel() // xs.shape[1]
        if samples == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(xs.shape)}"
            )
        # Two passes (mean, then the centred second moment): exact like torch.var_mean and,
        # over (N, H, W) of an NCHW tensor on CPU, several times faster than its one-pass kernel.
        mean = xs.mean(dim=REDUCE_DIMS)
        var = (xs - per_channel(mean)).square_().mean(dim=REDUCE_DIMS)
        return mean, var, samples

    def _statistic_gradients(self, conv, conv_input, conv_output, mean):
        """d mean/dW and d var/dW of this batch (:func:`conv_statistic_gradients`)."""
        return conv_statistic_gradients(conv_input, conv_output, mean, conv.weight.shape, conv.stride, conv.padding,
                                        conv.dilation, conv.groups)

    def _backward_reduction(self):
        """None: the backward's batch sums are this process's."""
        return None

    def _compensated_history(self, weight, groups):
        """Past statistics moved to ``weight`` (the Taylor step of the module docstring) and their
        per-channel validity."""
        dtype = weight.dtype
        if self.window == 1:  # no past
            empty = weight.new_zeros(0, self.num_features)
            return empty, empty, empty.bool()
        mean_shift = _mean_patch_dot_weight(self.history_mean_grad.to(dtype), weight, groups)
        mean_shift = self.rho * (mean_shift - self.history_mean_grad_dot_weight.to(dtype))
        var_shift = _weight_grad_dot_weight(self.history_var_grad.to(dtype), weight)
        var_shift = self.rho * (var_shift - self.history_var_grad_dot_weight.to(dtype))
        mean = self.history_mean.to(dtype) + mean_shift
        var = self.history_var.to(dtype) + var_shift - mean_shift**2
        filled = torch.arange(self.window - 1, device=mean.device) < self.history_length
        return mean, var, filled[:, None] & (var >= 0)

    def _push_history(self, groups, mean_grad, var_grad, mean, var, weight, finite):
        """Write the current iteration into the ring buffer (stored as the module docstring describes)
        if ``finite`` (a 0-dim bool tensor); otherwise the slot keeps its value and the ring does not move."""
        entry = {
            "history_mean": mean,
            "history_var": var,
            "history_mean_grad": mean_grad,
            "history_var_grad": var_grad.flatten(1),
            "history_mean_grad_dot_weight": _mean_patch_dot_weight(mean_grad[None], weight, groups)[0],
            "history_var_grad_dot_weight": _weight_grad_dot_weight(var_grad[None], weight)[0],
        }
        slot = self.history_next.view(1)
        for name, value in entry.items():
            buf = getattr(self, name)
            buf.index_copy_(0, slot, torch.where(finite, value[None].to(buf.dtype), buf.index_select(0, slot)))
        step = finite.long()
        self.history_next.add_(step).remainder_(self.window - 1)
        self.history_length.add_(step).clamp_(max=self.window - 1)

    def _update_running_stats(self, mean, unbiased_var, finite):
        """As ``nn.BatchNorm2d``: EMA of the current batch's mean and unbiased variance, if ``finite``."""
        self.num_batches_tracked.add_(finite.long())
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        for buf, value in ((self.running_mean, mean), (self.running_var, unbiased_var)):
            updated = buf.mul(1 - factor).add_(value.to(buf.dtype), alpha=factor)
            buf.copy_(torch.where(finite, updated, buf))

    # ------------------------------------------------------------------ NormLayer interface
    def trains_statistics(self, x):
        return self.training and torch.is_grad_enabled() and x.requires_grad and x.numel() > 0

    @torch.no_grad()
    def training_statistics(self, x):
        """The batch's statistics in burn-in, else those pooled with the compensated window
        (Eq. 8-9), with the window's metrics: whether it pools (``cbn_pooling``), the fraction of
        stored entries pooled (``cbn_valid_fraction``) and the size of the Taylor step relative to
        the statistic (``cbn_mean_compensation`` |Δμ|/σ_old, ``cbn_var_compensation`` |Δσ²|/σ²_old)."""
        batch = super().training_statistics(x)
        pools = self.pools_window()
        metrics = {"cbn_pooling": float(pools)}
        window = self.compensated_window() if pools else None
        if window is None:
            return TrainingStatistics(batch.mean, batch.var, metrics)
        past_mean, past_var, past_valid = window
        filled = int(self.history_length)
        if filled > 0:
            stored_mean = self.history_mean[:filled].to(batch.mean.dtype)
            stored_var = self.history_var[:filled].to(batch.var.dtype)
            std = torch.sqrt(stored_var + self.eps)
            metrics["cbn_valid_fraction"] = past_valid[:filled].float().mean()
            metrics["cbn_mean_compensation"] = ((past_mean[:filled] - stored_mean).abs() / std).mean()
            metrics["cbn_var_compensation"] = ((past_var[:filled] - stored_var).abs() / (stored_var + self.eps)).mean()
        mean, var, _ = pooled_statistics(batch.mean, batch.var, past_mean, past_var, past_valid)
        return TrainingStatistics(mean, var, metrics)

    def cross_iteration_buffers(self):
        return {name: getattr(self, name) for name in _WINDOW_STATE}

    def in_warmup(self):
        return not (self.pools_window() and int(self.history_length) > 0)

    @torch.no_grad()
    def skip_warmup(self):
        self._iterations = max(self._iterations, self.burnin_iters)
        self.train_iterations.fill_(self._iterations)

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """A checkpoint without window state (``nn.BatchNorm2d``) or with an empty window loads with
        an empty window whatever the conv; an unbound layer takes the checkpoint's derivative-buffer
        shapes."""
        state_dict.setdefault(prefix + "train_iterations", self.train_iterations)
        self._iterations = int(state_dict[prefix + "train_iterations"])  # a checkpoint's tensor, on the CPU
        var_grad_key = prefix + "history_var_grad"
        version = local_metadata.get("version")
        if (version is None or version < 3) and var_grad_key in state_dict and state_dict[var_grad_key].dim() == 5:
            state_dict[var_grad_key] = state_dict[var_grad_key].flatten(2)
        keys = {name: prefix + name for name in _WINDOW_STATE}
        saved_length = state_dict.get(keys["history_length"])
        if not all(key in state_dict for key in keys.values()) or int(saved_length) == 0:
            for name, key in keys.items():
                state_dict[key] = getattr(self, name)
            state_dict[keys["history_length"]] = torch.zeros_like(self.history_length)
            state_dict[keys["history_next"]] = torch.zeros_like(self.history_next)
        elif self._bound_conv() is None:
            for name in ("history_mean_grad", "history_var_grad"):
                saved, buf = state_dict[keys[name]], getattr(self, name)
                if saved.shape[0] == buf.shape[0] and saved.shape != buf.shape:
                    setattr(self, name, buf.new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        return keep_float32_buffers(self)

    def __getstate__(self):
        # Pickle/deepcopy the bound conv by strong reference, so a copied model's CBN refers to
        # the copied conv (the conv's pre-hook, a bound method, follows the copied CBN).
        state = super().__getstate__()
        state["_conv_ref"] = self._bound_conv()
        state["_conv_call"] = None
        return state

    def __setstate__(self, state):
        conv = state.pop("_conv_ref", None)
        state.pop("_pooling", None)  # pickled before the host counter
        state.setdefault("_iterations", int(state["_buffers"]["train_iterations"]))
        super().__setstate__(state)
        self._conv_ref = None if conv is None else weakref.ref(conv)
