"""PreciseBatchNorm2d: batch statistics in training, recalibrated population statistics in eval."""
import pytest
import torch
import torch.nn as nn

from d2norm.layers import PreciseBatchNorm2d
from d2norm.layers.precise_bn import NotRecalibratedError


def _layer(channels=3, affine=True):
    torch.manual_seed(0)
    layer = PreciseBatchNorm2d(channels, affine=affine)
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
    return layer


def _set_population(layer, mean, var):
    with torch.no_grad():
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        layer.recalibrated.fill_(True)


def test_training_normalizes_with_batch_statistics_and_leaves_population_untouched():
    layer = _layer()
    x = torch.randn(4, 3, 5, 6) * 3 + 2
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    weight, bias = layer.weight.view(1, -1, 1, 1), layer.bias.view(1, -1, 1, 1)
    expected = (x - mean) / torch.sqrt(var + layer.eps) * weight + bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    for key, value in layer.state_dict().items():  # no EMA, no counter, not recalibrated
        assert torch.equal(value, before[key]), key


def test_gradient_flows_through_batch_statistics_like_torch_bn():
    layer, reference = _layer(), nn.BatchNorm2d(3)
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "recalibrated"})
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    grad_layer = torch.autograd.grad(layer(x).square().sum(), (x, layer.weight))
    grad_reference = torch.autograd.grad(reference(x).square().sum(), (x, reference.weight))
    for a, b in zip(grad_layer, grad_reference):
        torch.testing.assert_close(a, b)


def test_evaluating_without_recalibration_raises_and_names_the_fix():
    layer = _layer().eval()
    with pytest.raises(RuntimeError, match=r"d2norm\.recalibrate.*D2NORM\.PRECISE_BN") as info:
        layer(torch.randn(1, 3, 2, 2))
    assert isinstance(info.value, NotRecalibratedError)
    with pytest.raises(NotRecalibratedError):
        layer.per_channel_affine()


@pytest.mark.parametrize("affine", [True, False])
def test_eval_output_is_the_per_channel_affine_of_the_population_statistics(affine):
    layer = _layer(affine=affine)
    mean, var = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0, 0.25, 1.0])
    _set_population(layer, mean, var)
    layer.eval()
    x = torch.randn(2, 3, 4, 5)
    scale, shift = layer.per_channel_affine()
    assert scale.shape == shift.shape == (3,)
    torch.testing.assert_close(layer(x), scale.view(1, -1, 1, 1) * x + shift.view(1, -1, 1, 1))
    weight = layer.weight if affine else torch.ones(3)
    bias = layer.bias if affine else torch.zeros(3)
    expected = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + layer.eps)
    torch.testing.assert_close(layer(x), expected * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))


def test_affine_false_has_no_parameters():
    assert list(PreciseBatchNorm2d(4, affine=False).parameters()) == []


def test_checkpoint_keeps_the_recalibrated_flag():
    layer = _layer()
    _set_population(layer, torch.ones(3), torch.full((3,), 2.0))
    restored = PreciseBatchNorm2d(3)
    restored.load_state_dict(layer.state_dict())
    assert bool(restored.recalibrated)
    x = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(restored.eval()(x), layer.eval()(x))


def test_plain_batchnorm_checkpoint_loads_strictly_but_does_not_count_as_recalibrated():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(1.0)
    layer = PreciseBatchNorm2d(3)
    layer.load_state_dict(bn.state_dict())
    assert torch.equal(layer.running_mean, bn.running_mean)
    assert not bool(layer.recalibrated)


def test_half_precision_input_matches_float32_statistics():
    layer = _layer()
    x = torch.randn(2, 3, 8, 8) * 4 + 3
    y_half = layer(x.to(torch.bfloat16))
    assert y_half.dtype == torch.bfloat16
    torch.testing.assert_close(y_half.float(), layer(x.to(torch.bfloat16).float()), rtol=2e-2, atol=2e-2)


def test_training_output_does_not_depend_on_other_samples_statistics_being_tracked():
    """Training never reads running statistics: corrupting them changes nothing."""
    layer = _layer()
    x = torch.randn(3, 3, 4, 4)
    y = layer(x)
    _set_population(layer, torch.full((3,), 100.0), torch.full((3,), 1e-6))
    torch.testing.assert_close(layer(x), y)
