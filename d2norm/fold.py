"""Fold d2norm layers into the convs that feed them, for inference at the cost of plain BN (or less).

In eval mode every d2norm layer is a per-channel affine ``y = s * x + t`` (``per_channel_affine``):
CBN and PreciseBN use population mean/variance, MABN the population second moment (MABN Eq. 10
without centring). A conv followed by such an affine is one conv with weight ``s * W`` (``W`` the
weight its forward uses, i.e. the centred weight for MABN) and bias ``s * b + t``.
"""
import torch
import torch.nn as nn
from detectron2.layers import FrozenBatchNorm2d

from .binding import conv_norm_slots
from .layers import D2NORM_LAYER_TYPES
from .layers.weight_centralization import effective_conv_weight, is_weight_centralized

__all__ = ["fold_norms"]


@torch.no_grad()
def fold_norms(model):
    """Fold every d2norm layer (in place) for inference; returns ``model``.

    A layer fed directly by a conv disappears into that conv; any other (e.g. one per FPN level
    behind a shared conv) becomes a ``FrozenBatchNorm2d`` holding its affine. The model must be in
    eval mode: the fold uses population statistics.
    """
    if model.training:
        raise RuntimeError("fold_norms needs a model in eval mode (call model.eval() first)")
    for conv, parent, key in list(conv_norm_slots(model)):
        norm = parent._modules[key]
        if not isinstance(norm, D2NORM_LAYER_TYPES):
            continue
        scale, shift = norm.per_channel_affine()
        weight = effective_conv_weight(conv) * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
        bias = shift if conv.bias is None else shift + scale * conv.bias
        if is_weight_centralized(conv):
            conv.__class__ = type(conv).__bases__[1]  # drop the centralising mixin: W is folded in
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        # detectron2's Conv2d skips a None norm; in a Sequential the norm's place becomes a no-op.
        parent._modules[key] = None if parent is conv else nn.Identity()
    _replace_with_frozen_affine(model)
    return model


def _replace_with_frozen_affine(model):
    """Every d2norm layer still in ``model`` (none has a conv of its own) -> its affine as FrozenBN,
    in the dtype of the model's parameters (statistics may be float32 in a half model) and on the
    layer's device."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if isinstance(child, D2NORM_LAYER_TYPES):
                scale, shift = child.per_channel_affine()
                frozen = FrozenBatchNorm2d(scale.numel(), eps=0.0).to(scale.device, dtype or scale.dtype)
                frozen.weight.copy_(scale)
                frozen.bias.copy_(shift)
                frozen.running_mean.zero_()
                frozen.running_var.fill_(1.0)
                parent._modules[key] = frozen
