"""Norm names resolve through detectron2's get_norm and every module that imported it by name."""
import importlib

import pytest
import torch.nn as nn
from detectron2.layers import FrozenBatchNorm2d

import d2norm
from d2norm import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.modeling.registry import UnknownNormError

IMPORTERS = [
    "detectron2.layers",
    "detectron2.layers.batch_norm",
    "detectron2.layers.blocks",
    "detectron2.layers.aspp",
    "detectron2.modeling.backbone.resnet",
    "detectron2.modeling.backbone.fpn",
    "detectron2.modeling.backbone.regnet",
    "detectron2.modeling.roi_heads.box_head",
    "detectron2.modeling.roi_heads.mask_head",
    "detectron2.modeling.meta_arch.retinanet",
    "detectron2.modeling.meta_arch.semantic_seg",
]
D2NORM_TYPES = {"CBN": CrossIterationBatchNorm2d, "MABN": MovingAverageBatchNorm2d, "PreciseBN": PreciseBatchNorm2d}
BUILTIN_TYPES = {"BN": nn.BatchNorm2d, "FrozenBN": FrozenBatchNorm2d, "GN": nn.GroupNorm, "SyncBN": nn.SyncBatchNorm}


@pytest.mark.parametrize("module_name", IMPORTERS)
@pytest.mark.parametrize("norm", sorted({**D2NORM_TYPES, **BUILTIN_TYPES}))
def test_every_importer_resolves_d2norm_and_builtin_names(module_name, norm):
    module = importlib.import_module(module_name)
    layer = module.get_norm(norm, 64)
    assert isinstance(layer, {**D2NORM_TYPES, **BUILTIN_TYPES}[norm])
    assert layer.weight.shape == (64,)


def test_empty_name_and_callable_keep_detectron2_semantics():
    assert d2norm.get_norm("", 8) is None
    assert d2norm.get_norm(None, 8) is None
    assert isinstance(d2norm.get_norm(lambda c: nn.GroupNorm(2, c), 8), nn.GroupNorm)


def test_unknown_name_lists_every_known_name():
    with pytest.raises(KeyError) as info:
        importlib.import_module("detectron2.modeling.backbone.fpn").get_norm("CrossBN", 8)
    assert isinstance(info.value, UnknownNormError)
    message = str(info.value)
    assert "'CrossBN'" in message
    for name in ["BN", "SyncBN", "FrozenBN", "GN", "naiveSyncBN", "CBN", "MABN", "PreciseBN"]:
        assert name in message.split("Known norms: ")[1].split(", ")


def test_install_is_idempotent_and_keeps_the_original_reachable():
    from detectron2.layers import batch_norm

    d2norm.modeling.registry.install()
    d2norm.modeling.registry.install()
    assert batch_norm.get_norm is d2norm.get_norm
    assert d2norm.get_norm.__wrapped__ is not d2norm.get_norm
    assert isinstance(d2norm.get_norm.__wrapped__("BN", 4), nn.BatchNorm2d)


def test_settings_reach_the_layers_as_constructor_arguments_and_a_name_alone_gets_the_defaults():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.D2NORM.CBN.WINDOW, cfg.D2NORM.CBN.BURNIN_ITERS = 3, 7
    factory = d2norm.modeling.registry.configured_factory("CBN", cfg.D2NORM)
    assert factory.keywords == {"window": 3, "burnin_iters": 7, "rho": 1.0}  # visible, no global state
    layer = factory(4)
    assert (layer.window, layer.burnin_iters) == (3, 7)
    default = d2norm.get_norm("CBN", 4)
    assert (default.window, default.burnin_iters) == (8, 0)
    assert d2norm.modeling.registry.configured_factory("PreciseBN", cfg.D2NORM) is None  # takes no settings
