"""prepare_model: every CBN bound to the conv that feeds it, every MABN conv centralised, names kept."""
import pytest
import torch
import torch.nn as nn
from detectron2.config import get_cfg
from detectron2.layers import Conv2d
from detectron2.modeling import build_model as d2_build_model

import d2norm
from d2norm import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from d2norm.binding import conv_norm_pairs
from d2norm.layers.weight_centralization import is_weight_centralized


def tiny_rcnn_cfg(norm, freeze_at=0):
    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.MASK_ON", "True",
        "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.BACKBONE.FREEZE_AT", str(freeze_at),
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.STEM_OUT_CHANNELS", "32",
        "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']",
        "MODEL.FPN.IN_FEATURES", "['res2', 'res3', 'res4', 'res5']", "MODEL.FPN.OUT_CHANNELS", "16",
        "MODEL.RPN.IN_FEATURES", "['p2', 'p3', 'p4', 'p5', 'p6']",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]",
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_HEADS.IN_FEATURES", "['p2', 'p3', 'p4', 'p5']",
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_CONV", "4",
        "MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "7",
        "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "14",
        "MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm,
        "MODEL.ROI_BOX_HEAD.NORM", norm, "MODEL.ROI_MASK_HEAD.NORM", norm,
    ])
    return cfg


def test_every_cbn_in_a_detector_is_bound_to_the_conv_whose_output_it_normalises():
    model = d2norm.modeling.build_model(tiny_rcnn_cfg("CBN"))
    pairs = list(conv_norm_pairs(model))
    cbns = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(cbns) > 20 and {id(n) for _, n in pairs} == {id(n) for n in cbns}
    for conv, norm in pairs:
        assert conv.norm is norm and norm._bound_conv() is conv


def test_binding_keeps_parameter_names_and_creates_no_module_cycle():
    cfg = tiny_rcnn_cfg("CBN")
    torch.manual_seed(0)
    with d2norm.registry.norm_settings(**d2norm.config.norm_settings_from_config(cfg)):
        plain = d2_build_model(cfg)
    names_before = [n for n, _ in plain.named_parameters()]
    keys_before = list(plain.state_dict())
    d2norm.prepare_model(plain)
    d2norm.prepare_model(plain)  # idempotent
    assert [n for n, _ in plain.named_parameters()] == names_before
    assert list(plain.state_dict()) == keys_before
    assert len(list(plain.modules())) == len({id(m) for m in plain.modules()})


def test_a_cbn_without_a_feeding_conv_is_reported_by_module_path():
    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), CrossIterationBatchNorm2d(4)))
    with pytest.raises(RuntimeError, match=r"'1\.1'"):
        d2norm.prepare_model(model)


def test_sequential_conv_norm_pairs_are_bound_like_in_the_retinanet_head():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    model = nn.Sequential(conv, CrossIterationBatchNorm2d(4, window=2), nn.ReLU())
    d2norm.prepare_model(model)
    assert model[1]._bound_conv() is conv


def test_mabn_convs_are_centralised_and_frozen_stages_use_population_statistics():
    model = d2norm.modeling.build_model(tiny_rcnn_cfg("MABN", freeze_at=2))
    pairs = list(conv_norm_pairs(model))
    assert pairs and all(is_weight_centralized(conv) for conv, _ in pairs)
    stem_norm = model.backbone.bottom_up.stem.conv1.norm
    res3_norm = model.backbone.bottom_up.res3[0].conv1.norm
    assert isinstance(stem_norm, MovingAverageBatchNorm2d) and stem_norm.frozen
    assert not res3_norm.frozen


def test_centralisation_can_be_switched_off():
    cfg = tiny_rcnn_cfg("MABN")
    cfg.D2NORM.MABN.CENTRALIZE_WEIGHTS = False
    model = d2norm.modeling.build_model(cfg)
    assert not any(is_weight_centralized(conv) for conv, _ in conv_norm_pairs(model))


def test_head_warmup_applies_to_mabn_layers_in_the_heads_only():
    cfg = tiny_rcnn_cfg("MABN")
    cfg.D2NORM.MABN.WARMUP_ITERS = 100
    cfg.D2NORM.MABN.HEAD_WARMUP_ITERS = 10000
    model = d2norm.modeling.build_model(cfg)
    heads = {id(m) for m in model.roi_heads.modules()}
    for m in model.modules():
        if isinstance(m, MovingAverageBatchNorm2d):
            assert m.warmup_iters == (10000 if id(m) in heads else 100)


def test_detectron2_conv2d_and_plain_conv_pairs_are_both_found():
    a = Conv2d(3, 4, 1, bias=False, norm=MovingAverageBatchNorm2d(4))
    b = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), MovingAverageBatchNorm2d(4))
    pairs = list(conv_norm_pairs(nn.Sequential(a, b)))
    assert [(c, n) for c, n in pairs] == [(a, a.norm), (b[0], b[1])]
