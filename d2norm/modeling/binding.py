"""``prepare_model``: connect each d2norm layer to the conv that feeds it.

Detectron2 builds a norm from a channel count alone and calls it with one argument, so a norm never
sees its conv. After the model is built, this pass finds the conv whose output each CBN/MABN layer
normalises by observing a forward (:mod:`d2norm.modeling.conv_inputs`: tensor identity, whatever the module
layout) and

* binds each CBN to its conv (Taylor compensation needs the conv's weight and input, CBN Eq. 6-7);
  a CBN fed by anything else (an activation, a sum, a transposed conv) is an error naming the
  layer and what feeds it, never a silent wrong pairing;
* makes each conv (or transposed conv) feeding an MABN weight-centralised (MABN §4.3), unless
  disabled, and warns about the MABN layers no conv feeds;
* marks MABN layers whose parameters are frozen (``FREEZE_AT``) as ``frozen`` (population stats).

No module is registered under another (no cycles), and parameter names do not change.
"""
import logging

from ..layers import NormLayer
from ..layers.weight_centralization import centralize_conv_weight
from .conv_inputs import CONV_TRANSPOSE2D, find_norm_inputs

__all__ = ["prepare_model", "conv_norm_pairs"]

logger = logging.getLogger(__name__)


def conv_norm_pairs(model, example_inputs=None, norm_types=(NormLayer,)):
    """``(conv, norm)`` for every layer of ``norm_types`` fed directly by a conv or transposed conv
    in one observed forward (see :func:`d2norm.modeling.conv_inputs.find_norm_inputs`)."""
    return [(i.conv, i.norm) for i in find_norm_inputs(model, example_inputs, norm_types=norm_types)
            if i.conv is not None]


def _uses_its_conv(module):
    return isinstance(module, NormLayer) and module.conv_binding is not None


def prepare_model(model, centralize_weights=True, example_inputs=None):
    """Bind CBN layers to their convs and weight-centralise convs feeding MABN. Idempotent.

    The pairing is observed on one forward without gradients in eval mode
    (:func:`~d2norm.modeling.conv_inputs.find_norm_inputs`): on ``example_inputs``, or for a detectron2
    meta-architecture on a black image when none are given.

    Args:
        model (nn.Module): a built (not yet DDP-wrapped) model.
        centralize_weights (bool): ``D2NORM.MABN.CENTRALIZE_WEIGHTS``.
        example_inputs (tuple or None): positional arguments of one forward of ``model``
            (required unless it is a detectron2 meta-architecture).

    Returns:
        the same model.

    Raises:
        RuntimeError: CBN layers not fed directly by a ``Conv2d``; the message names each one's
            module path and what feeds it.
        ValueError: no ``example_inputs`` for a model that is not a detectron2 meta-architecture.
    """
    for module in model.modules():
        if isinstance(module, NormLayer):
            params = list(module.parameters())
            module.freeze_statistics(bool(params) and not any(p.requires_grad for p in params))
    if any(_uses_its_conv(m) for m in model.modules()):
        norm_inputs = find_norm_inputs(model, example_inputs, norm_types=(NormLayer,))
        _bind([item for item in norm_inputs if _uses_its_conv(item.norm)], centralize_weights)
    return model


def _bind(norm_inputs, centralize_weights):
    errors, uncentralized = [], []
    for item in norm_inputs:
        if item.norm.conv_binding == "bind":
            reason = _cbn_problem(item)
            if reason:
                errors.append(f"'{item.name}': {reason}")
        elif item.conv is not None:
            if centralize_weights:
                centralize_conv_weight(item.conv)
        else:
            uncentralized.append(f"'{item.name}' ({item.reason})")
    if uncentralized and centralize_weights:
        logger.warning(f"No conv feeds these MABN layers directly, so nothing is weight-centralised "
                       f"for them: {'; '.join(uncentralized)}")
    if errors:
        raise RuntimeError(
            "CBN needs the Conv2d whose output it normalises (its Taylor compensation uses that "
            "conv's weight and input, CBN Eq. 6-7), but these CBN layers are not fed directly by "
            "one: " + "; ".join(errors) + ". Use another norm there, or put the CBN right after the conv."
        )


def _cbn_problem(item):
    """Why ``item``'s CBN cannot bind, or "" after binding it."""
    if item.kind == CONV_TRANSPOSE2D:
        return (f"it is fed by the transposed conv '{item.conv_name}', which CBN's compensation "
                "(derived for Conv2d) does not cover")
    if not item.fed_by_conv2d:
        return item.reason
    try:
        item.norm.bind_conv(item.conv)
    except (TypeError, ValueError) as e:
        return f"its conv '{item.conv_name}' cannot be used: {e}"
    return ""
