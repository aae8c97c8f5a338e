"""d2norm: small-batch normalization layers for Detectron2.

Importing this package registers the norm names ``"CBN"``, ``"MABN"`` and ``"PreciseBN"`` with
every Detectron2 module that builds norms through ``get_norm`` (ResNet, FPN, box/mask heads,
RetinaNet head, …), so they can be selected from YAML.
"""
from ._compat import silence_third_party_warnings

silence_third_party_warnings()  # before the first detectron2 import below

from . import data  # noqa: F401,E402  (importing data registers the built-in dataset)
from .modeling import registry  # noqa: E402
from .config.defaults import add_d2norm_config, validate_d2norm_config
from .layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from .modeling.registry import get_norm, known_norm_names, layer_settings, register_norm
from .modeling.binding import prepare_model
from .modeling.build import build_model, configured_norms
from .statistics.recalibration import recalibrate
from .modeling.fold import fold_norms

__all__ = [
    "CrossIterationBatchNorm2d",
    "MovingAverageBatchNorm2d",
    "PreciseBatchNorm2d",
    "add_d2norm_config",
    "validate_d2norm_config",
    "get_norm",
    "known_norm_names",
    "register_norm",
    "build_model",
    "configured_norms",
    "fold_norms",
    "prepare_model",
    "recalibrate",
]

register_norm("CBN", lambda c: CrossIterationBatchNorm2d(c, **layer_settings("cbn")))
register_norm("MABN", lambda c: MovingAverageBatchNorm2d(c, **layer_settings("mabn")))
register_norm("PreciseBN", lambda c: PreciseBatchNorm2d(c))
registry.install()
