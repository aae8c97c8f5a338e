"""prepare_model: every CBN bound to the conv whose output it normalises (CBN Eq. 6-7), every conv
feeding an MABN centralised (MABN §4.3), in any module layout; a CBN fed by anything but a conv is
an error naming the layer and what feeds it; names kept."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import Conv2d
from detectron2.modeling import build_model as d2_build_model

import d2norm
from d2norm import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from d2norm.layers.weight_centralization import is_weight_centralized
from d2norm.modeling.binding import conv_norm_pairs
from d2norm.modeling.conv_inputs import find_norm_inputs


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
        "MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "7",
        "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "14",
        "MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm,
        "MODEL.ROI_BOX_HEAD.NORM", norm, "MODEL.ROI_MASK_HEAD.NORM", norm,
    ])
    return cfg


def train_steps(model, x, steps=3):
    """A few SGD steps with gradients reaching every layer (CBN pools past iterations after step 1)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        out = model(x)
        outputs = out.values() if isinstance(out, dict) else [out]
        loss = sum((o**2).mean() for o in outputs)
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_every_cbn_in_a_detector_is_bound_to_the_conv_whose_output_it_normalises():
    model = d2norm.modeling.build_model(tiny_rcnn_cfg("CBN"))
    pairs = conv_norm_pairs(model)
    cbns = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(cbns) > 20 and {id(n) for _, n in pairs} == {id(n) for n in cbns}
    for conv, norm in pairs:
        assert conv.norm is norm and norm._bound_conv() is conv


def test_binding_keeps_parameter_names_and_creates_no_module_cycle():
    cfg = tiny_rcnn_cfg("CBN")
    torch.manual_seed(0)
    plain = d2_build_model(d2norm.configured_norms(cfg))
    names_before = [n for n, _ in plain.named_parameters()]
    keys_before = list(plain.state_dict())
    d2norm.prepare_model(plain)
    d2norm.prepare_model(plain)  # idempotent
    assert [n for n, _ in plain.named_parameters()] == names_before
    assert list(plain.state_dict()) == keys_before
    assert len(list(plain.modules())) == len({id(m) for m in plain.modules()})


def test_a_cbn_without_a_feeding_conv_is_reported_by_module_path():
    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), CrossIterationBatchNorm2d(4)))
    with pytest.raises(RuntimeError, match=r"'1\.1': its input is the output of `relu` in '0'"):
        d2norm.prepare_model(model, example_inputs=torch.randn(2, 4, 3, 3))


def test_sequential_conv_norm_pairs_are_bound_like_in_the_retinanet_head():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    model = nn.Sequential(conv, CrossIterationBatchNorm2d(4, window=2), nn.ReLU())
    d2norm.prepare_model(model, example_inputs=torch.randn(2, 3, 5, 5))
    assert model[1]._bound_conv() is conv


def test_an_activation_between_conv_and_cbn_is_an_error_not_a_pairing():
    """Sequential(Conv2d(activation=relu), norm): the norm sees relu(conv(x)), not conv(x)."""
    model = nn.Sequential(Conv2d(3, 4, 3, padding=1, activation=F.relu), CrossIterationBatchNorm2d(4))
    with pytest.raises(RuntimeError, match=r"'1': its input is the output of `relu` in '0', not of a conv"):
        d2norm.prepare_model(model, example_inputs=torch.randn(2, 3, 5, 5))
    assert model[1]._bound_conv() is None


class SumBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn = CrossIterationBatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x))


class InplaceBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), CrossIterationBatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        F.relu_(y)
        return self.bn(y)


class ConvRunsTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), CrossIterationBatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        self.conv(x * 2)
        return self.bn(y)


@pytest.mark.parametrize("block, reason", [
    (SumBlock, r"'bn': its input is the output of `add` in the top-level SumBlock, not of a conv"),
    (InplaceBlock, r"'bn': its input was modified in place by `relu_` in the top-level InplaceBlock"),
    (ConvRunsTwice, r"'bn': its conv ran again in 'conv' before the layer used its output"),
])
def test_a_cbn_fed_by_a_sum_an_in_place_op_or_a_stale_conv_output_is_an_error(block, reason):
    with pytest.raises(RuntimeError, match=reason):
        d2norm.prepare_model(block(), example_inputs=torch.randn(2, 3, 4, 4))


class UserBlock(nn.Module):
    """A user module with conv and norm as attributes, called in its own forward."""

    def __init__(self, norm):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = d2norm.get_norm(norm, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))))


def test_user_module_attributes_are_bound_and_train():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    model = d2norm.prepare_model(UserBlock("CBN"), example_inputs=x)
    assert model.bn._bound_conv() is model.conv
    train_steps(model, x)
    assert int(model.bn.history_length) == 3  # every iteration pooled through the bound conv
    mabn = d2norm.prepare_model(UserBlock("MABN"), example_inputs=(x,))
    assert is_weight_centralized(mabn.conv) and not is_weight_centralized(mabn.head)


def test_a_model_that_is_not_a_detector_needs_example_inputs():
    with pytest.raises(ValueError, match="UserBlock is not a detectron2 meta-architecture: pass example_inputs"):
        d2norm.prepare_model(UserBlock("CBN"))


class Upsample(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.norm = d2norm.get_norm(norm, 6)

    def forward(self, x):
        return self.norm(self.up(x))


def test_a_transposed_conv_feeding_cbn_is_an_error_and_is_centralised_for_mabn():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"'norm': it is fed by the transposed conv 'up'"):
        d2norm.prepare_model(Upsample("CBN"), example_inputs=x)
    model = d2norm.prepare_model(Upsample("MABN"), example_inputs=x)
    assert is_weight_centralized(model.up)
    # Zero-mean filter per output channel: a constant input gives a zero-mean output channel.
    with torch.no_grad():
        y = model.up(torch.full((1, 4, 5, 5), 3.0)) - model.up.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(6), rtol=0, atol=1e-5)


def test_mabn_layers_no_conv_feeds_are_named_in_a_warning(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), MovingAverageBatchNorm2d(4))
    with caplog.at_level(logging.WARNING, logger="d2norm.modeling.binding"):
        d2norm.prepare_model(model, example_inputs=torch.randn(2, 3, 4, 4))
    assert "'2' (its input is the output of `relu` in '1', not of a conv)" in caplog.text
    assert not is_weight_centralized(model[0])


def test_mabn_convs_are_centralised_and_frozen_stages_use_population_statistics():
    model = d2norm.modeling.build_model(tiny_rcnn_cfg("MABN", freeze_at=2))
    pairs = conv_norm_pairs(model)
    assert len(pairs) > 20 and all(is_weight_centralized(conv) for conv, _ in pairs)
    stem_norm = model.backbone.bottom_up.stem.conv1.norm
    res3_norm = model.backbone.bottom_up.res3[0].conv1.norm
    assert isinstance(stem_norm, MovingAverageBatchNorm2d) and stem_norm.frozen
    assert not res3_norm.frozen
    # Every MABN is fed by a centralised conv in the forward itself, also the FPN's, whose forward
    # runs its convs from plain Python lists (a replaced module would not reach them).
    fed = {id(norm) for _, norm in pairs}
    assert all(id(m) in fed for m in model.modules() if isinstance(m, MovingAverageBatchNorm2d))
    assert all(is_weight_centralized(conv) for conv in model.backbone.lateral_convs + model.backbone.output_convs)


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
    pairs = conv_norm_pairs(nn.Sequential(a, b), example_inputs=torch.randn(2, 3, 2, 2))
    assert [(c, n) for c, n in pairs] == [(a, a.norm), (b[0], b[1])]


@pytest.mark.parametrize("norm", ["CBN", "MABN"])
def test_regnet_stem_blocks_and_shortcuts_are_paired_and_train(norm):
    """RegNet keeps conv and norm as sibling attributes (stem.conv/stem.bn, f.a/f.a_bn, proj/bn)."""
    from detectron2.modeling.backbone.regnet import RegNet, ResBottleneckBlock, SimpleStem

    torch.manual_seed(0)
    model = RegNet(stem_class=SimpleStem, stem_width=8, block_class=ResBottleneckBlock, depth=2, w_a=8.0,
                   w_0=8, w_m=2.0, group_width=8, se_ratio=0.25, norm=norm, out_features=["s2"])
    x = torch.randn(2, 3, 16, 16)
    d2norm.prepare_model(model, example_inputs=(x,))
    inputs = find_norm_inputs(model, (x,))
    assert len(inputs) == 1 + 2 * 3 + 2  # stem, 2 blocks x (a, b, c), 2 shortcut projections
    for item in inputs:
        prefix = item.name.rsplit(".", 1)[0]
        conv_attr = {"bn": "conv" if "stem" in item.name else "proj", "a_bn": "a", "b_bn": "b", "c_bn": "c"}
        assert item.conv_name == f"{prefix}.{conv_attr[item.name.rsplit('.', 1)[1]]}", item
        if norm == "CBN":
            assert item.norm._bound_conv() is item.conv
        else:
            assert is_weight_centralized(item.conv)
    train_steps(model, x)


def _vit():
    return pytest.importorskip("detectron2.modeling.backbone.vit", reason="ViTDet modules are in detectron2 main only")


@pytest.mark.parametrize("norm", ["CBN", "MABN"])
def test_vitdet_residual_bottleneck_block_is_paired_and_trains(norm):
    vit = _vit()
    torch.manual_seed(0)
    block = vit.ResBottleneckBlock(in_channels=8, out_channels=8, bottleneck_channels=4, norm=norm)
    x = torch.randn(2, 8, 6, 6)
    d2norm.prepare_model(block, example_inputs=(x,))
    inputs = find_norm_inputs(block, (x,))
    assert [(i.name, i.conv_name) for i in inputs] == [("norm1", "conv1"), ("norm2", "conv2"), ("norm3", "conv3")]
    train_steps(block, x)


def _simple_feature_pyramid(norm, scale_factors):
    vit = _vit()
    pytest.importorskip("timm", reason="detectron2's ViT blocks import timm")
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    backbone = vit.ViT(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, window_size=0,
                       use_rel_pos=False, pretrain_img_size=32, out_feature="last_feat")
    return vit.SimpleFeaturePyramid(backbone, in_feature="last_feat", out_channels=8,
                                    scale_factors=scale_factors, top_block=LastLevelMaxPool(), norm=norm,
                                    square_pad=32)


def test_simple_feature_pyramid_cbn_after_a_transposed_conv_is_an_error():
    model = _simple_feature_pyramid("CBN", (4.0, 2.0, 1.0, 0.5))
    with pytest.raises(RuntimeError, match=r"'simfp_2\.1': it is fed by the transposed conv 'simfp_2\.0'"):
        d2norm.prepare_model(model, example_inputs=(torch.randn(1, 3, 32, 32),))


@pytest.mark.parametrize("norm, scale_factors", [("CBN", (2.0, 1.0, 0.5)), ("MABN", (4.0, 2.0, 1.0, 0.5))])
def test_simple_feature_pyramid_convs_are_paired_and_train(norm, scale_factors):
    torch.manual_seed(0)
    model = _simple_feature_pyramid(norm, scale_factors)
    x = torch.randn(2, 3, 32, 32)
    d2norm.prepare_model(model, example_inputs=(x,))
    inputs = find_norm_inputs(model, (x,))
    assert inputs and all(i.conv is not None for i in inputs)
    if norm == "MABN":
        assert any(isinstance(i.conv, nn.ConvTranspose2d) and is_weight_centralized(i.conv) for i in inputs)
    model.train()
    out = model(x)
    sum((o**2).mean() for o in out.values()).backward()


class TensorOnlyDetector(nn.Module):
    """Looks like a detectron2 meta-architecture (backbone, pixel_mean) but takes a tensor."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), CrossIterationBatchNorm2d(4))
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1))

    def forward(self, images):
        return self.backbone(images - self.pixel_mean)


def test_a_failing_black_image_forward_asks_for_example_inputs():
    with pytest.raises(RuntimeError, match="on a black image .* pass example_inputs instead"):
        d2norm.prepare_model(TensorOnlyDetector())
    model = d2norm.prepare_model(TensorOnlyDetector(), example_inputs=torch.zeros(2, 3, 4, 4))
    assert model.backbone[1]._bound_conv() is model.backbone[0]
