"""``build_model``: detectron2's ``build_model`` with d2norm's settings and post-build pass."""
import contextlib
import logging
from collections import Counter

from detectron2.modeling import build_model as d2_build_model
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

from ..config.defaults import norm_settings_from_config
from ..layers import MovingAverageBatchNorm2d
from ..layers.per_level import make_retinanet_head_per_level
from .binding import prepare_model
from .registry import UnknownNormError, known_norm_names, norm_settings

__all__ = ["build_model", "configured_norms", "finish_model", "norm_layer_summary"]

logger = logging.getLogger(__name__)

# Submodules that are "heads" for D2NORM.MABN.HEAD_WARMUP_ITERS (R-CNN RoI heads, RetinaNet head).
_HEAD_NAMES = ("roi_heads", "head")


def _norm_keys(node, prefix="MODEL"):
    """``(key, value)`` of every ``*.NORM`` entry under ``cfg.MODEL`` (e.g. ``MODEL.FPN.NORM``)."""
    for name, value in node.items():
        if isinstance(value, dict):
            yield from _norm_keys(value, f"{prefix}.{name}")
        elif name == "NORM":
            yield f"{prefix}.{name}", value


@contextlib.contextmanager
def configured_norms(cfg):
    """Within the block, d2norm layers built by ``get_norm`` take their settings from
    ``cfg.D2NORM`` (outside it they get the papers' defaults), and an unknown norm name raises an
    error naming the config key that held it. :func:`build_model` builds inside this block; a
    custom builder does the same, then calls :func:`d2norm.prepare_model`."""
    try:
        with norm_settings(**norm_settings_from_config(cfg)):
            yield
    except UnknownNormError as error:
        keys = [key for key, value in _norm_keys(cfg.MODEL) if value == error.norm] or ["(not a MODEL.*.NORM key)"]
        raise UnknownNormError(
            f"Unknown norm {error.norm!r} in cfg.{', cfg.'.join(keys)}. Known norms: {', '.join(known_norm_names())}",
            norm=error.norm,
        ) from None


def build_model(cfg):
    """Build the model of ``cfg`` with ``cfg.D2NORM`` layer settings (:func:`configured_norms`), then
    :func:`finish_model`."""
    with configured_norms(cfg):
        model = d2_build_model(cfg)
    return finish_model(model, cfg.D2NORM)


def finish_model(model, d2norm_cfg, example_inputs=None):
    """What d2norm does to a built model (YAML and LazyConfig alike), in place:

    * give each d2norm layer of a RetinaNet head (and of its subclass, FCOS's head) one set of
      statistics per FPN level (detectron2 only does so for "BN"/"SyncBN"; Rethinking-BN §5.2);
    * apply ``MABN.HEAD_WARMUP_ITERS`` to MABN layers in the heads (MABN §5: batch statistics in
      the heads for the first 10k iterations);
    * :func:`~d2norm.modeling.binding.prepare_model` (CBN conv binding, MABN weight centralisation).

    Args:
        model (nn.Module): the built model, on its device.
        d2norm_cfg: the ``D2NORM`` node (a detectron2 ``CfgNode``).
        example_inputs (tuple or None): for :func:`~d2norm.modeling.binding.prepare_model`.

    Returns:
        ``model``.
    """
    for module in model.modules():
        if isinstance(module, RetinaNetHead):
            make_retinanet_head_per_level(module, module._num_features)
    head_warmup = d2norm_cfg.MABN.HEAD_WARMUP_ITERS
    if head_warmup >= 0:
        for name in _HEAD_NAMES:
            head = getattr(model, name, None)
            for m in head.modules() if head is not None else ():
                if isinstance(m, MovingAverageBatchNorm2d):
                    m.warmup_iters = head_warmup
    prepare_model(model, centralize_weights=d2norm_cfg.MABN.CENTRALIZE_WEIGHTS, example_inputs=example_inputs)
    logger.info(f"Normalization layers: {norm_layer_summary(model)}")
    return model


def norm_layer_summary(model):
    """``{"<top-level child>": {"<norm type>": count}}`` for every normalization layer."""
    summary = {}
    for name, module in model.named_modules():
        type_name = type(module).__name__
        if "Norm" in type_name and "List" not in type_name and name:
            top = name.split(".")[0]
            summary.setdefault(top, Counter())[type_name] += 1
    return {k: dict(v) for k, v in summary.items()}
