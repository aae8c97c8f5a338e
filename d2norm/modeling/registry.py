"""Norm names -> layer factories, and the ``get_norm`` rebinding that makes them usable from YAML.

Detectron2 has no norm registry: ``detectron2.layers.get_norm`` looks names up in a dict literal
built inside the function, and every model module (ResNet, FPN, box/mask heads, RetinaNet head, …)
binds ``get_norm`` by name at import time. :func:`install` therefore rebinds the name ``get_norm``
in every already-imported module that holds detectron2's original function, replacing it with
:func:`get_norm`, which resolves d2norm names and defers everything else to the original.

A name resolves to its layer with the layer's own defaults (the papers' settings). Hyper-parameters
from a config reach a layer as constructor arguments: :func:`configured_factory` gives the factory
with ``cfg.D2NORM``'s values, which :func:`d2norm.modeling.configured_norms` puts in the config in
place of the name before the model is built.
"""
import functools
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from ..config.defaults import brn_settings, cbn_settings, mabn_settings
from ..layers import (
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    PreciseBatchNorm2d,
    SyncCrossIterationBatchNorm2d,
    SyncMovingAverageBatchNorm2d,
)

__all__ = ["UnknownNormError", "configured_factory", "get_norm", "install", "known_norm_names", "register_norm"]

# Modules that bind ``get_norm`` by name (detectron2 v0.6 and main); imported before rebinding.
_IMPORTERS = (
    "detectron2.layers",
    "detectron2.layers.batch_norm",
    "detectron2.layers.blocks",
    "detectron2.layers.aspp",
    "detectron2.modeling",
    "detectron2.modeling.backbone.resnet",
    "detectron2.modeling.backbone.fpn",
    "detectron2.modeling.backbone.regnet",
    "detectron2.modeling.backbone.vit",
    "detectron2.modeling.roi_heads.box_head",
    "detectron2.modeling.roi_heads.mask_head",
    "detectron2.modeling.meta_arch.retinanet",
    "detectron2.modeling.meta_arch.semantic_seg",
)
# Names detectron2's own get_norm may accept (v0.6 and main); filtered by what this install knows.
_BUILTIN_CANDIDATES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")



@dataclass(frozen=True)
class _Registration:
    factory: Callable[..., nn.Module]
    settings: Callable[..., dict] | None


_REGISTRY: dict[str, _Registration] = {}


class UnknownNormError(KeyError):
    """Raised for a norm name that neither d2norm nor detectron2 knows; ``norm`` is that name."""

    def __init__(self, message, norm=None):
        super().__init__(message)
        self.norm = norm

    def __str__(self):
        return self.args[0]


def register_norm(name: str, factory: Callable[..., nn.Module], settings: Callable[..., dict] | None = None):
    """Make ``name`` resolvable by :func:`get_norm`: ``factory(channels)`` builds the layer.

    Args:
        settings: optional ``settings(d2norm_cfg, in_head) -> kwargs`` giving ``factory``'s keyword
            arguments from the ``D2NORM`` config node, for a layer in a detection head
            (``in_head``) or elsewhere; a model built from a config then gets
            ``factory(channels, **kwargs)``.
    """
    _REGISTRY[name] = _Registration(factory, settings)


def configured_factory(name: str, d2norm_cfg, in_head: bool = False):
    """``channels -> layer`` for the registered ``name`` with the settings of ``d2norm_cfg`` (a
    ``functools.partial`` of the layer class), or None if ``name`` takes no settings from a config."""
    registration = _REGISTRY.get(name)
    if registration is None or registration.settings is None:
        return None
    return functools.partial(registration.factory, **registration.settings(d2norm_cfg, in_head))


def _original_get_norm():
    from detectron2.layers import batch_norm

    fn = batch_norm.get_norm
    return getattr(fn, "__wrapped__", fn)


def known_norm_names():
    """Every norm name that resolves: d2norm's and the installed detectron2's own."""
    original = _original_get_norm()
    builtin = []
    for name in _BUILTIN_CANDIDATES:
        try:
            original(name, 32)
        except KeyError:
            continue
        builtin.append(name)
    return builtin + sorted(_REGISTRY)


def get_norm(norm, out_channels):
    """Drop-in for ``detectron2.layers.get_norm`` that also knows the d2norm names.

    Args:
        norm (str or callable): a name (``"CBN"``, ``"MABN"``, ``"PreciseBN"`` or any detectron2
            name), ``""``/``None`` for no norm, or a callable ``channels -> nn.Module``.
        out_channels (int): number of channels.
    """
    if isinstance(norm, str) and norm in _REGISTRY:
        return _REGISTRY[norm].factory(out_channels)
    try:
        return _original_get_norm()(norm, out_channels)
    except KeyError:
        if not isinstance(norm, str):
            raise
        raise UnknownNormError(
            f"Unknown norm {norm!r}. Known norms: {', '.join(known_norm_names())}", norm=norm
        ) from None


def install():
    """Rebind ``get_norm`` in every imported module holding detectron2's original. Idempotent.

    Modules imported later that bind ``get_norm`` by name (e.g. a detectron2 project) need
    another call.
    """
    for name in _IMPORTERS:
        try:
            importlib.import_module(name)
        except ImportError:  # module absent in this detectron2 version (vit.py is main-only)
            continue
    original = _original_get_norm()
    get_norm.__wrapped__ = original
    for module in list(sys.modules.values()):
        if getattr(module, "__dict__", {}).get("get_norm") is original:
            module.get_norm = get_norm


register_norm("CBN", CrossIterationBatchNorm2d, cbn_settings)
register_norm("SyncCBN", SyncCrossIterationBatchNorm2d, cbn_settings)
register_norm("MABN", MovingAverageBatchNorm2d, mabn_settings)
register_norm("SyncMABN", SyncMovingAverageBatchNorm2d, mabn_settings)
register_norm("PreciseBN", PreciseBatchNorm2d)
register_norm("BRN", BatchRenorm2d, brn_settings)
