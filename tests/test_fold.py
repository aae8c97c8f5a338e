"""Inference costs what BN costs: every d2norm layer folds into a per-channel affine / its conv,
and only into a conv whose output it receives unchanged (never across an activation)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import Conv2d, FrozenBatchNorm2d

import d2norm
from d2norm import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.layers.per_level import PerLevelNorm
from d2norm.modeling.build import build_model
from d2norm.modeling.fold import fold_norms

D2NORM_TYPES = (CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d, PerLevelNorm)
_LAYERS = {"CBN": CrossIterationBatchNorm2d, "MABN": MovingAverageBatchNorm2d, "PreciseBN": PreciseBatchNorm2d}


def trained_block(norm_name, steps=6):
    """detectron2 Conv2d(norm=...) + prepare_model, trained a few SGD steps so statistics are non-trivial."""
    torch.manual_seed(0)
    settings = {"CBN": {"window": 3}, "MABN": {"buffer_size": 2, "warmup_iters": 2, "renorm_free_iters": 3}}
    norm = _LAYERS[norm_name](8, **settings.get(norm_name, {}))
    block = nn.Sequential(Conv2d(3, 8, 3, padding=1, bias=False, norm=norm))
    d2norm.prepare_model(block, example_inputs=torch.zeros(2, 3, 6, 6))
    opt = torch.optim.SGD(block.parameters(), lr=0.05)
    batches = [torch.randn(2, 3, 6, 6) * 2 + 1 for _ in range(steps)]
    for x in batches:
        (block(x) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    if norm_name == "PreciseBN":
        d2norm.recalibrate(block, batches, num_iters=steps)
    return block.eval()


@pytest.mark.parametrize("norm_name", ["CBN", "MABN", "PreciseBN"])
def test_conv_and_norm_fold_into_one_conv_with_identical_output(norm_name):
    block = trained_block(norm_name)
    x = torch.randn(4, 3, 6, 6)
    expected = block(x)
    fold_norms(block, example_inputs=(x,))
    conv = block[0]
    assert conv.norm is None and type(conv) is Conv2d  # no centralising subclass left either
    assert conv.bias is not None
    assert not any(isinstance(m, D2NORM_TYPES) for m in block.modules())
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_refuses_a_model_in_training_mode():
    block = trained_block("CBN").train()
    with pytest.raises(RuntimeError, match="eval mode"):
        fold_norms(block, example_inputs=(torch.randn(2, 3, 6, 6),))


def test_fold_needs_example_inputs_for_a_model_that_is_not_a_detector():
    with pytest.raises(ValueError, match="pass example_inputs"):
        fold_norms(trained_block("CBN"))


def _with_statistics(model):
    for m in model.modules():
        if isinstance(m, MovingAverageBatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def test_an_activation_between_conv_and_norm_is_never_folded_across():
    """Sequential(Conv2d(activation=relu), norm): folding the affine into the conv would put it
    before the ReLU; the layer must stay after it (as a FrozenBatchNorm2d)."""
    torch.manual_seed(0)
    model = _with_statistics(nn.Sequential(Conv2d(3, 8, 3, padding=1, activation=F.relu), MovingAverageBatchNorm2d(8)))
    x = torch.randn(2, 3, 6, 6) * 3
    weight, expected = model[0].weight.clone(), model(x)
    fold_norms(model, example_inputs=(x,))
    assert isinstance(model[1], FrozenBatchNorm2d) and torch.equal(model[0].weight, weight)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), MovingAverageBatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_conv_whose_output_also_goes_elsewhere_is_not_folded():
    torch.manual_seed(0)
    model = _with_statistics(Residual())
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    fold_norms(model, example_inputs=(x,))
    assert isinstance(model.bn, FrozenBatchNorm2d)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_retinanet_with_per_level_cbn_folds_to_frozen_affines(dtype):
    """Per-level norms behind a shared conv cannot enter the conv: they become FrozenBatchNorm2d,
    in the model's dtype."""
    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "RetinaNet",
        "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']", "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']",
        "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.RETINANET.NORM", "CBN", "MODEL.RETINANET.NUM_CONVS", "1",
        "MODEL.RETINANET.NUM_CLASSES", "5", "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    ])
    model = build_model(cfg).eval().to(dtype)
    head = model.head
    assert sum(isinstance(m, PerLevelNorm) for m in head.modules()) == 2
    for m in head.modules():
        if isinstance(m, CrossIterationBatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    features = [torch.randn(1, 16, s, s, dtype=dtype) for s in (8, 4, 2, 1, 1)]
    expected = head(features)
    fold_norms(model)
    assert not any(isinstance(m, CrossIterationBatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in head.modules()) == 2 * 5
    with torch.no_grad():  # inference: FrozenBatchNorm2d takes its fused F.batch_norm path
        folded = head(features)
    for got, want in zip(folded, expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
