"""Per-channel pieces shared by the d2norm layers: statistics dtype and shapes, the affine γ/β,
float32 statistics buffers and the non-finite-update guard."""
import torch
import torch.nn as nn
import torch.nn.functional as F

REDUCE_DIMS = (0, 2, 3)  # statistics are per channel over N, H, W


def statistics_dtype(x):
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (statistics never in half)."""
    return torch.promote_types(x.dtype, torch.float32)


def keep_float32_buffers(module):
    """Return the float16/bfloat16 buffers of ``module`` (not its children's) to float32; returns ``module``.

    Called after ``module._apply`` so that ``.half()``/``.to(torch.bfloat16)`` casts the parameters
    but not the statistics, which would overflow or lose their small updates in half precision
    (as torch's BatchNorm keeps float32 statistics under autocast).
    """
    for name, buf in module._buffers.items():
        if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
            module._buffers[name] = buf.float()
    return module


def all_finite(*tensors):
    """A 0-dim bool tensor: every element of ``tensors`` is finite (decided on the device, no sync)."""
    return torch.stack([t.isfinite().all() for t in tensors]).all()


def per_channel(v):
    """A (C,) tensor shaped to broadcast over (N, C, H, W)."""
    return v.view(1, -1, 1, 1)


def register_affine(module: nn.Module, num_features: int, affine: bool) -> None:
    """Give ``module`` Parameters ``weight`` = 1 and ``bias`` = 0 of length ``num_features``, or ``None``s."""
    if affine:
        module.weight = nn.Parameter(torch.ones(num_features))
        module.bias = nn.Parameter(torch.zeros(num_features))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def batch_norm_keeping_finite_statistics(bn, x, weight, bias):
    """``F.batch_norm`` of ``x`` in training mode with ``bn``'s running statistics, momentum and
    eps, except that a batch with non-finite statistics leaves ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` as they were and adds 1 to ``bn.nonfinite_skips`` (decided on the
    device: F.batch_norm updates copies, which its backward keeps, adopted where finite)."""
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, factor, bn.eps)
    finite = all_finite(running_mean, running_var)
    for buf, updated in ((bn.running_mean, running_mean), (bn.running_var, running_var)):
        buf.copy_(torch.where(finite, updated, buf))
    bn.num_batches_tracked.sub_((~finite).long())
    bn.nonfinite_skips.add_((~finite).long())
    return y


@torch.no_grad()
def batch_norm_affine(bn):
    """``(scale, shift)`` of a BatchNorm in eval mode, ``scale[c] * x + shift[c]``:
    scale = γ / sqrt(running_var + eps), shift = β - running_mean * scale (γ = 1, β = 0 if absent)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift
