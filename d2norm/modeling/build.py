"""``build_model``: detectron2's ``build_model`` with d2norm's settings and post-build pass.

Settings reach the layers as constructor arguments: before the model is built, every norm name
that takes settings (``"CBN"``, ``"MABN"``) is replaced in a copy of the config by its layer
factory with ``cfg.D2NORM``'s values (:func:`configured_norms`, :func:`configured_lazy_norms`), which
detectron2's ``get_norm`` calls like any norm given as a callable.
"""
import copy
import logging
from collections import Counter

from detectron2.modeling import build_model as d2_build_model
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from omegaconf import DictConfig, ListConfig

from ..layers.per_level import make_retinanet_head_per_level
from .binding import prepare_model
from .registry import UnknownNormError, configured_factory, known_norm_names
from .roi_shuffle import shuffle_rois_across_workers

__all__ = ["build_model", "configured_lazy_norms", "configured_norms", "finish_model", "norm_layer_summary"]

logger = logging.getLogger(__name__)

# YAML keys of the norms in the detection heads (D2NORM.MABN.HEAD_WARMUP_ITERS) ...
_YAML_HEAD_KEYS = ("MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM", "MODEL.RETINANET.NORM")
# ... and the LazyConfig model nodes holding them (R-CNN RoI heads, RetinaNet/FCOS head).
_LAZY_HEAD_NODES = ("roi_heads", "head")


def _unknown_norm(name, keys):
    return UnknownNormError(f"Unknown norm {name!r} in {', '.join(keys)}. Known norms: {', '.join(known_norm_names())}",
                            norm=name)


def _norm_keys(node, prefix="MODEL"):
    """``(key, value)`` of every ``*.NORM`` entry under ``cfg.MODEL`` (e.g. ``MODEL.FPN.NORM``)."""
    for name, value in node.items():
        if isinstance(value, dict):
            yield from _norm_keys(value, f"{prefix}.{name}")
        elif name == "NORM":
            yield f"{prefix}.{name}", value


def configured_norms(cfg):
    """A copy of ``cfg`` whose ``MODEL.*.NORM`` names are bound to ``cfg.D2NORM``'s settings.

    Each ``"CBN"``/``"MABN"`` value becomes its layer factory with the settings as constructor
    arguments (``MABN.HEAD_WARMUP_ITERS`` in the heads); other values stay. A name no norm has
    raises :class:`~d2norm.modeling.registry.UnknownNormError` naming every key that holds it.
    :func:`build_model` builds from this copy; a custom builder does the same, then calls
    :func:`d2norm.prepare_model`. A model built from ``cfg`` itself gets the layers' defaults.
    """
    known = set(known_norm_names())
    bound = cfg.clone()
    bound.defrost()
    unknown = {}
    for key, value in _norm_keys(cfg.MODEL):
        if not isinstance(value, str) or not value:
            continue
        if value not in known:
            unknown.setdefault(value, []).append(f"cfg.{key}")
            continue
        factory = configured_factory(value, cfg.D2NORM, in_head=key in _YAML_HEAD_KEYS)
        if factory is not None:
            node = bound
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = factory
    if unknown:
        name, keys = next(iter(unknown.items()))
        raise _unknown_norm(name, keys)
    if cfg.is_frozen():
        bound.freeze()
    return bound


def _is_norm_key(key):
    return isinstance(key, str) and (key == "norm" or key.endswith("_norm"))


def configured_lazy_norms(model_cfg, d2norm_cfg):
    """A copy of the LazyConfig node ``model_cfg`` whose norm names are bound to ``d2norm_cfg``'s
    settings, as :func:`configured_norms` for YAML.

    Norm names are the string values of keys ``norm`` or ``*_norm`` (``conv_norm`` of the box and
    mask heads); those below ``roi_heads`` or ``head`` are in the heads. An unknown name raises
    :class:`~d2norm.modeling.registry.UnknownNormError` naming ``cfg.model.<path>``.
    """
    known = set(known_norm_names())
    bound = copy.deepcopy(model_cfg)
    bound._set_flag("allow_objects", True)  # a factory is a Python object, as detectron2's LazyConfig allows

    def visit(node, path):
        items = node.items() if isinstance(node, DictConfig) else enumerate(node)
        for key, value in list(items):
            if isinstance(value, (DictConfig, ListConfig)):
                visit(value, (*path, str(key)))
            elif _is_norm_key(key) and isinstance(value, str) and value:
                where = ".".join(("cfg.model", *path, key))
                if value not in known:
                    raise _unknown_norm(value, [where])
                factory = configured_factory(value, d2norm_cfg, in_head=bool(path) and path[0] in _LAZY_HEAD_NODES)
                if factory is not None:
                    node[key] = factory

    visit(bound, ())
    return bound


def build_model(cfg):
    """Build the model of ``cfg`` from :func:`configured_norms` (``cfg.D2NORM`` layer settings), then
    :func:`finish_model`."""
    return finish_model(d2_build_model(configured_norms(cfg)), cfg.D2NORM)


def finish_model(model, d2norm_cfg, example_inputs=None):
    """What d2norm does to a built model (YAML and LazyConfig alike), in place:

    * give each d2norm layer of a RetinaNet head (and of its subclass, FCOS's head) one set of
      statistics per FPN level (detectron2 only does so for "BN"/"SyncBN"; Rethinking-BN §5.2);
    * :func:`~d2norm.modeling.binding.prepare_model` (CBN conv binding, MABN weight centralisation);
    * with ``SHUFFLE_ROIS``, :func:`~d2norm.modeling.roi_shuffle.shuffle_rois_across_workers`.

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
    prepare_model(model, centralize_weights=d2norm_cfg.MABN.CENTRALIZE_WEIGHTS, example_inputs=example_inputs)
    if d2norm_cfg.SHUFFLE_ROIS:
        shuffle_rois_across_workers(model)
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
