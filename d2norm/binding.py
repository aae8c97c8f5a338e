"""``prepare_model``: connect each d2norm layer to the conv that feeds it.

Detectron2 builds a norm from a channel count alone and calls it with one argument, so a norm never
sees its conv (``detectron2/layers/wrappers.py``, ``Conv2d``). After the model is built, this pass finds every
``conv -> norm`` pair — ``detectron2.layers.Conv2d(..., norm=...)`` (backbone, FPN, box/mask heads)
and consecutive ``conv, norm`` entries of an ``nn.Sequential`` (RetinaNet head, where the norm may
be a :class:`~d2norm.layers.per_level.PerLevelNorm`) — and

* binds each CBN to its conv (Taylor compensation needs the conv's weight and input, CBN Eq. 6-7);
* makes each conv feeding an MABN weight-centralised (MABN §4.3), unless disabled;
* marks MABN layers whose parameters are frozen (``FREEZE_AT``) as ``frozen`` (population stats).

No module is registered under another (no cycles), and parameter names do not change.
"""
import logging

import torch.nn as nn

from .layers.cbn import CrossIterationBatchNorm2d
from .layers.mabn import MovingAverageBatchNorm2d
from .layers.per_level import PerLevelNorm
from .layers.weight_centralization import centralize_conv_weight

__all__ = ["prepare_model", "conv_norm_pairs", "conv_norm_slots"]

logger = logging.getLogger(__name__)

_BOUND_TYPES = (CrossIterationBatchNorm2d, MovingAverageBatchNorm2d)


def _norm_layers(module, norm_types):
    """The layers of ``norm_types`` that ``module`` applies to one conv output (itself or per-level children)."""
    if isinstance(module, norm_types):
        return [module]
    if isinstance(module, PerLevelNorm):
        return [m for m in module.per_level_layers() if isinstance(m, norm_types)]
    return []


def conv_norm_slots(model):
    """Yield ``(conv, parent, key)`` for every module stored right after a conv: a detectron2
    ``Conv2d``'s ``norm`` (``parent`` is the conv, ``key`` is "norm") or the element after a conv in
    an ``nn.Sequential``; that module is ``parent._modules[key]``."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and isinstance(getattr(module, "norm", None), nn.Module):
            yield module, module, "norm"
        elif isinstance(module, nn.Sequential):
            keys = list(module._modules)
            for prev_key, key in zip(keys, keys[1:]):
                if isinstance(module._modules[prev_key], nn.Conv2d):
                    yield module._modules[prev_key], module, key


def conv_norm_pairs(model, norm_types=_BOUND_TYPES):
    """Yield ``(conv, norm_layer)`` for every layer of ``norm_types`` fed directly by a conv."""
    for conv, parent, key in conv_norm_slots(model):
        for norm in _norm_layers(parent._modules[key], norm_types):
            yield conv, norm


def prepare_model(model, centralize_weights=True):
    """Bind CBN layers to their convs and weight-centralise convs feeding MABN. Idempotent.

    Args:
        model (nn.Module): a built (not yet DDP-wrapped) model.
        centralize_weights (bool): ``D2NORM.MABN.CENTRALIZE_WEIGHTS``.

    Returns:
        the same model.

    Raises:
        RuntimeError: a CBN layer that no conv feeds (the message names its module path).
    """
    paired = set()
    for conv, norm in conv_norm_pairs(model):
        paired.add(id(norm))
        if isinstance(norm, CrossIterationBatchNorm2d):
            norm.bind_conv(conv)
        else:
            if centralize_weights:
                centralize_conv_weight(conv)
            params = list(norm.parameters())
            norm.frozen = bool(params) and not any(p.requires_grad for p in params)
    for name, module in model.named_modules():
        if id(module) in paired:
            continue
        if isinstance(module, CrossIterationBatchNorm2d):
            raise RuntimeError(
                f"CBN layer '{name}' is not fed directly by a conv (detectron2 Conv2d(norm=...) or "
                "an nn.Sequential conv -> norm), so its Taylor compensation has no weight to use."
            )
        if isinstance(module, MovingAverageBatchNorm2d) and centralize_weights:
            logger.warning(f"MABN layer '{name}' has no conv directly before it; nothing to centralise.")
    return model
