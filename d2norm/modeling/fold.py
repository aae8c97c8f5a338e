"""Fold d2norm layers into the convs that feed them, for inference at the cost of plain BN (or less).

In eval mode every d2norm layer is a per-channel affine ``y = s * x + t`` (``per_channel_affine``):
CBN and PreciseBN use population mean/variance, MABN the population second moment (MABN Eq. 10
without centring). A conv followed by such an affine is one conv with weight ``s * W`` (``W`` the
weight its forward uses, i.e. the centred weight for MABN) and bias ``s * b + t``. That holds only
when the layer's input *is* the conv's output: the pairing comes from an observed forward
(:mod:`d2norm.modeling.conv_inputs`), so an activation, a sum or another consumer of the conv output
between them is never folded across.
"""
import torch
import torch.nn as nn
from detectron2.layers import FrozenBatchNorm2d

from ..layers import NormLayer
from ..layers.weight_centralization import effective_conv_weight, remove_weight_centralization
from .conv_inputs import find_norm_inputs

__all__ = ["fold_norms"]


@torch.no_grad()
def fold_norms(model, example_inputs=None):
    """Fold every d2norm layer (in place) for inference; returns ``model``.

    A layer whose input is the output of a ``Conv2d`` that feeds nothing else disappears into that
    conv; any other (after an activation, after a transposed conv, one per FPN level behind a
    shared conv) becomes a ``FrozenBatchNorm2d`` holding its affine, in place. The model must be
    in eval mode: the fold uses population statistics.

    Args:
        model (nn.Module): the model.
        example_inputs (tuple or None): positional arguments of one forward, to observe which conv
            feeds each layer; optional for detectron2 meta-architectures.
    """
    if model.training:
        raise RuntimeError("fold_norms needs a model in eval mode (call model.eval() first)")
    parents = {id(child): (parent, key) for parent in model.modules() for key, child in parent._modules.items()
               if child is not None}
    for item in find_norm_inputs(model, example_inputs):
        if not (item.fed_by_conv2d and item.exclusive and id(item.norm) in parents):
            continue
        conv, norm = item.conv, item.norm
        scale, shift = norm.per_channel_affine()
        weight = effective_conv_weight(conv) * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
        bias = shift if conv.bias is None else shift + scale * conv.bias
        remove_weight_centralization(conv)  # W̃ is folded into the weight
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        # detectron2's Conv2d skips a None norm; anywhere else the norm's place becomes a no-op.
        parent, key = parents[id(norm)]
        parent._modules[key] = None if parent is conv and key == "norm" else nn.Identity()
    _replace_with_frozen_affine(model)
    return model


def _replace_with_frozen_affine(model):
    """Every d2norm layer still in ``model`` (no conv of its own to enter) -> its affine as FrozenBN,
    in the dtype of the model's parameters (statistics may be float32 in a half model) and on the
    layer's device."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if isinstance(child, NormLayer):
                scale, shift = child.per_channel_affine()
                frozen = FrozenBatchNorm2d(scale.numel(), eps=0.0).to(scale.device, dtype or scale.dtype)
                frozen.weight.copy_(scale)
                frozen.bias.copy_(shift)
                frozen.running_mean.zero_()
                frozen.running_var.fill_(1.0)
                parent._modules[key] = frozen
