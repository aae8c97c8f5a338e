"""Norm names -> layer factories, and the ``get_norm`` rebinding that makes them usable from YAML.

Detectron2 has no norm registry: ``detectron2.layers.get_norm`` looks names up in a dict literal
built inside the function, and every model module (ResNet, FPN, box/mask heads, RetinaNet head, …)
binds ``get_norm`` by name at import time. :func:`install` therefore rebinds the name ``get_norm``
in every already-imported module that holds detectron2's original function, replacing it with
:func:`get_norm`, which resolves d2norm names and defers everything else to the original.

Layer hyper-parameters (window, buffer size, …) come from :func:`norm_settings`, which
:func:`d2norm.modeling.build_model` enters with ``cfg.D2NORM`` while it builds the model; outside
it the layers' own defaults (the papers' settings) apply.
"""
import contextlib
import importlib
import sys
from collections.abc import Callable

import torch.nn as nn

from ..layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d

__all__ = ["UnknownNormError", "get_norm", "install", "known_norm_names", "norm_settings", "register_norm"]

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

_FACTORIES: dict[str, Callable[[int], nn.Module]] = {}
_SETTINGS: dict[str, dict] = {}


class UnknownNormError(KeyError):
    """Raised for a norm name that neither d2norm nor detectron2 knows; ``norm`` is that name."""

    def __init__(self, message, norm=None):
        super().__init__(message)
        self.norm = norm

    def __str__(self):
        return self.args[0]


def register_norm(name: str, factory: Callable[[int], nn.Module]) -> None:
    """Make ``name`` resolvable by :func:`get_norm`; ``factory(channels)`` builds the layer."""
    _FACTORIES[name] = factory


@contextlib.contextmanager
def norm_settings(**settings):
    """Within the block, d2norm factories read their hyper-parameters from ``settings``.

    Keys are the lower-case norm families (``cbn``, ``mabn``), each a dict of constructor kwargs.
    """
    old = dict(_SETTINGS)
    _SETTINGS.update(settings)
    try:
        yield
    finally:
        _SETTINGS.clear()
        _SETTINGS.update(old)


def layer_settings(family: str) -> dict:
    """Constructor kwargs for ``family`` set by the innermost :func:`norm_settings` (or ``{}``)."""
    return dict(_SETTINGS.get(family, {}))


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
    return builtin + sorted(_FACTORIES)


def get_norm(norm, out_channels):
    """Drop-in for ``detectron2.layers.get_norm`` that also knows the d2norm names.

    Args:
        norm (str or callable): a name (``"CBN"``, ``"MABN"``, ``"PreciseBN"`` or any detectron2
            name), ``""``/``None`` for no norm, or a callable ``channels -> nn.Module``.
        out_channels (int): number of channels.
    """
    if isinstance(norm, str) and norm in _FACTORIES:
        return _FACTORIES[norm](out_channels)
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


register_norm("CBN", lambda c: CrossIterationBatchNorm2d(c, **layer_settings("cbn")))
register_norm("MABN", lambda c: MovingAverageBatchNorm2d(c, **layer_settings("mabn")))
register_norm("PreciseBN", PreciseBatchNorm2d)
