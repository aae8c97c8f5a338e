"""d2norm.build_model / configured_norms: cfg.D2NORM reaches the layers, config errors name their key."""
import pytest
import torch
from detectron2.modeling import build_model as d2_build_model
from test_binding import tiny_rcnn_cfg

import d2norm
from d2norm import CrossIterationBatchNorm2d
from d2norm.modeling.registry import UnknownNormError


def _cbn_windows(model):
    return {m.window for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)}


def test_build_model_and_a_custom_builder_inside_configured_norms_both_apply_d2norm_settings():
    cfg = tiny_rcnn_cfg("CBN")
    cfg.D2NORM.CBN.WINDOW = 3
    assert _cbn_windows(d2norm.build_model(cfg)) == {3}
    custom = d2_build_model(d2norm.configured_norms(cfg))
    d2norm.prepare_model(custom)
    assert _cbn_windows(custom) == {3}
    # and the checkpoint of one loads into the other tensor for tensor (window-sized buffers match)
    custom.load_state_dict(d2norm.build_model(cfg).state_dict())


def test_a_model_built_from_the_unbound_config_gets_the_papers_defaults():
    cfg = tiny_rcnn_cfg("CBN")
    cfg.D2NORM.CBN.WINDOW = 3
    assert _cbn_windows(d2_build_model(cfg)) == {8}


def test_an_unknown_norm_in_the_config_names_the_key_that_held_it():
    cfg = tiny_rcnn_cfg("BN")
    cfg.MODEL.ROI_BOX_HEAD.NORM = "CrossBN"
    with pytest.raises(UnknownNormError) as info:
        d2norm.build_model(cfg)
    message = str(info.value)
    assert "cfg.MODEL.ROI_BOX_HEAD.NORM" in message and "'CrossBN'" in message
    assert "cfg.MODEL.FPN.NORM" not in message  # it holds "BN"
    assert "CBN" in message.split("Known norms: ")[1]


def test_package_exposes_the_readme_names():
    assert d2norm.modeling.fold.fold_norms is d2norm.fold_norms
    assert d2norm.modeling.build_model is d2norm.build_model
    model = d2norm.build_model(tiny_rcnn_cfg("CBN")).eval()
    with torch.no_grad():
        d2norm.fold_norms(model)
    assert _cbn_windows(model) == set()
