"""d2norm: small-batch normalization layers for Detectron2.

The layers (:mod:`d2norm.layers`) need torch only. ``import d2norm`` also registers, as soon as
``detectron2.modeling`` is imported (at once if it already is), the norm names ``"CBN"``, ``"MABN"``,
``"PreciseBN"`` and ``"BRN"`` with every Detectron2 module that builds norms through ``get_norm`` (ResNet, FPN,
box/mask heads, RetinaNet head, …), so they can be selected from YAML, and, once ``detectron2.data``
is imported, the built-in datasets (:mod:`d2norm.data`). The detectron2-facing functions below are
imported on first use.
"""
import importlib

from ._post_import import after_import
from .layers import BatchRenorm2d, CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d

# name -> the subpackage that defines it (imported, with detectron2, on first access)
_LAZY = {
    "add_d2norm_config": "config",
    "validate_d2norm_config": "config",
    "get_norm": "modeling",
    "known_norm_names": "modeling",
    "register_norm": "modeling",
    "build_model": "modeling",
    "configured_norms": "modeling",
    "fold_norms": "modeling",
    "prepare_model": "modeling",
    "recalibrate": "statistics",
}
_SUBPACKAGES = ("config", "data", "engine", "lazy", "modeling", "statistics", "study")

__all__ = ["BatchRenorm2d", "CrossIterationBatchNorm2d", "MovingAverageBatchNorm2d", "PreciseBatchNorm2d", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY, *_SUBPACKAGES])


def _install_norms(_modeling):
    importlib.import_module(".modeling.registry", __name__).install()


def _register_datasets(_data):
    importlib.import_module(".data", __name__)


after_import("detectron2.modeling", _install_norms)
after_import("detectron2.data", _register_datasets)
