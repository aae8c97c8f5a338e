"""PerLevelNorm: one norm per FPN level (own statistics and state), shared affine (Rethinking-BN §5.2)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

import d2norm  # noqa: F401  (registers the norm names)
from d2norm.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.layers.per_level import PerLevelNorm, make_retinanet_head_per_level
from d2norm.modeling.binding import prepare_model
from d2norm.statistics.recalibration import recalibrate

NUM_LEVELS = 3
LEVEL_SIZES = ((8, 8), (4, 4), (2, 2))


def _head(norm):
    torch.manual_seed(0)
    shapes = [ShapeSpec(channels=4)] * NUM_LEVELS
    return RetinaNetHead(input_shape=shapes, num_classes=2, num_anchors=1, conv_dims=[4, 4], norm=norm)


def _features(seed, batch_size=2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, 4, h, w, generator=generator) * (1 + level) + level
            for level, (h, w) in enumerate(LEVEL_SIZES)]


def _assert_close(actual, expected):
    torch.testing.assert_close(actual.double().flatten(), expected, rtol=1e-5, atol=1e-5)


def _per_level_norms(head):
    return [m for m in head.modules() if isinstance(m, PerLevelNorm)]


@pytest.mark.parametrize("norm", ["PreciseBN", "CBN", "MABN"])
def test_retinanet_head_gets_one_per_level_norm_per_tower_position(norm):
    head = _head(norm)
    assert make_retinanet_head_per_level(head, NUM_LEVELS) == 4  # 2 convs x 2 towers
    assert make_retinanet_head_per_level(head, NUM_LEVELS) == 0  # idempotent
    for tower in (head.cls_subnet, head.bbox_subnet):
        assert [type(m) for m in tower] == [nn.Conv2d, PerLevelNorm, nn.ReLU] * 2
    for per_level in _per_level_norms(head):
        assert per_level.num_levels == NUM_LEVELS
        assert all(list(level.parameters()) == [] for level in per_level.per_level_layers())
        assert [name for name, _ in per_level.named_parameters()] == ["weight", "bias"]


def test_builtin_bn_heads_are_left_to_detectron2():
    assert make_retinanet_head_per_level(_head("BN"), NUM_LEVELS) == 0


def test_levels_keep_the_layer_settings_and_state_and_the_shared_affine_its_parameters():
    layer = CrossIterationBatchNorm2d(4, window=5, burnin_iters=7, momentum=0.3, eps=1e-3)
    with torch.no_grad():
        layer.weight.fill_(2.0)
        layer.bias.fill_(-1.0)
        layer.running_mean.fill_(0.5)  # e.g. loaded from a checkpoint before the conversion
    per_level = PerLevelNorm.from_layer(layer, NUM_LEVELS)
    for level in per_level.per_level_layers():
        assert type(level) is CrossIterationBatchNorm2d
        assert (level.window, level.burnin_iters, level.momentum, level.eps) == (5, 7, 0.3, 1e-3)
        assert torch.equal(level.running_mean, layer.running_mean)
    assert torch.equal(per_level.weight, layer.weight) and torch.equal(per_level.bias, layer.bias)
    settings = dict(buffer_size=3, warmup_iters=5, renorm_free_iters=9, rmax=2.0, ema_decay=0.9)
    for level in PerLevelNorm.from_layer(MovingAverageBatchNorm2d(4, **settings), 2).per_level_layers():
        assert {key: getattr(level, key) for key in settings} == settings


def test_training_normalizes_each_level_with_its_own_batch_then_the_shared_affine():
    per_level = PerLevelNorm(PreciseBatchNorm2d, 4, NUM_LEVELS)
    with torch.no_grad():
        per_level.weight.uniform_(0.5, 1.5)
        per_level.bias.uniform_(-1, 1)
    features = _features(0)
    outputs = [per_level(x) for x in features]
    weight, bias = per_level.weight, per_level.bias
    for x, y in zip(features, outputs):
        torch.testing.assert_close(y, F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5))
    sum(y.square().sum() for y in outputs).backward()
    assert per_level.weight.grad is not None and per_level.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", ["PreciseBN", "CBN", "MABN"])
def test_recalibration_gives_each_level_the_statistics_of_that_level(norm):
    head = _head(norm)
    make_retinanet_head_per_level(head, NUM_LEVELS)
    prepare_model(head, example_inputs=(_features(0),))
    batches = [_features(seed) for seed in range(3)]

    captured = copy.deepcopy(head)  # capture each level norm's inputs on a copy
    inputs = {}
    for name, module in captured.named_modules():
        if isinstance(module, PerLevelNorm):
            for level, layer in enumerate(module.per_level_layers()):
                layer.register_forward_pre_hook(
                    lambda m, args, key=(name, level): inputs.setdefault(key, []).append(args[0]))
    with torch.no_grad():
        for features in batches:
            captured(features)

    recalibrate(head, batches, len(batches))
    for name, module in head.named_modules():
        if not isinstance(module, PerLevelNorm):
            continue
        for level, layer in enumerate(module.per_level_layers()):
            xs = inputs[(name, level)]
            x = torch.cat([x.double().transpose(0, 1).reshape(4, -1) for x in xs], dim=1)
            assert x.shape[1] == len(batches) * 2 * LEVEL_SIZES[level][0] * LEVEL_SIZES[level][1]
            if isinstance(layer, MovingAverageBatchNorm2d):
                _assert_close(layer.running_var, x.square().mean(1))
            else:
                _assert_close(layer.running_mean, x.mean(1))
                _assert_close(layer.running_var, x.var(1, unbiased=False))
        variances = [layer.running_var for layer in module.per_level_layers()]
        assert not torch.allclose(variances[0], variances[-1])  # the levels really differ


@pytest.mark.parametrize("norm", ["PreciseBN", "CBN", "MABN"])
def test_eval_uses_the_statistics_of_each_level_folded_with_the_shared_affine(norm):
    head = _head(norm)
    make_retinanet_head_per_level(head, NUM_LEVELS)
    prepare_model(head, example_inputs=(_features(0),))
    recalibrate(head, [_features(seed) for seed in range(2)], 2)
    head.eval()
    per_level = head.cls_subnet[1]
    with torch.no_grad():
        per_level.weight.uniform_(0.5, 1.5)
        per_level.bias.uniform_(-1, 1)
        for level, x in enumerate(_features(5)):
            scale, shift = per_level.per_channel_affine(level)
            expected = scale.view(1, -1, 1, 1) * x + shift.view(1, -1, 1, 1)
            torch.testing.assert_close(per_level(x), expected)


class _TowerHead(nn.Module):
    """RetinaNetHead's calling pattern without its check on the number of levels."""

    def __init__(self):
        super().__init__()
        self.cls_subnet = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), PreciseBatchNorm2d(4))
        self.bbox_subnet = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), PreciseBatchNorm2d(4))

    def forward(self, features):
        return [self.cls_subnet(x) + self.bbox_subnet(x) for x in features]


def test_a_forward_that_calls_the_head_for_a_wrong_number_of_levels_is_an_error():
    head = _TowerHead()
    make_retinanet_head_per_level(head, NUM_LEVELS)
    with pytest.raises(RuntimeError, match="not a multiple of its 3 levels"):
        head(_features(0)[:2])
    head(_features(0))  # a later correct forward starts again at level 0
    assert all(m.position == 0 for m in _per_level_norms(head))


def test_per_level_statistics_survive_a_checkpoint():
    head = _head("PreciseBN")
    make_retinanet_head_per_level(head, NUM_LEVELS)
    recalibrate(head, [_features(0)], 1)
    restored = _head("PreciseBN")
    make_retinanet_head_per_level(restored, NUM_LEVELS)
    restored.load_state_dict(head.state_dict())
    assert "cls_subnet.1.levels.2.running_var" in head.state_dict()
    head.eval(), restored.eval()
    with torch.no_grad():
        for a, b in zip(head(_features(1))[0], restored(_features(1))[0]):
            torch.testing.assert_close(a, b)
