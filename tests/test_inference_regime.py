"""d2norm.statistics.inference_regime: population statistics of the inputs each layer sees at inference."""
import copy

import pytest
import torch
import torch.nn as nn
from test_recalibrate import NORM_TYPES, _batches, _model, _state, _train_steps

from d2norm.layers import MovingAverageBatchNorm2d
from d2norm.statistics.inference_regime import recalibrate_in_inference_regime
from d2norm.statistics.recalibration import population_norm_layers, recalibrate


@torch.no_grad()
def _inference_regime_reference(model, batches):
    """Layer by layer, in network order: the statistics of a layer's inputs with the whole model in
    eval mode and every layer before it already set this way (each layer's inputs are then exactly
    those it sees at inference)."""
    model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    for _, layer in population_norm_layers(model):  # downstream layers' values do not matter
        if hasattr(layer, "recalibrated"):
            layer.recalibrated.fill_(True)
    for _, layer in population_norm_layers(model):
        inputs = []
        handle = layer.register_forward_pre_hook(lambda m, args, inputs=inputs: inputs.append(args[0].double()))
        for batch in batches:
            model(batch)
        handle.remove()
        x = torch.cat([i.transpose(0, 1).reshape(i.shape[1], -1) for i in inputs], dim=1)
        if isinstance(layer, MovingAverageBatchNorm2d):
            layer.running_var.copy_(x.square().mean(dim=1))
        else:
            layer.running_mean.copy_(x.mean(dim=1))
            layer.running_var.copy_(x.var(dim=1, unbiased=False))
    model.train(was_training)
    return {name: layer.running_var.clone() for name, layer in population_norm_layers(model)}, model


def _variances(model):
    return {name: layer.running_var.double() for name, layer in population_norm_layers(model)}


@pytest.mark.parametrize("norm", list(NORM_TYPES))
def test_a_chain_of_three_layers_reaches_the_inference_regime_in_three_passes(norm):
    model = _model(norm, norm, norm)
    _train_steps(model)
    batches = _batches()
    expected, reference = _inference_regime_reference(model, batches)

    training_regime = copy.deepcopy(model)
    recalibrate(training_regime, batches, len(batches))
    # The first layer sees the same inputs in both regimes, the last one does not.
    torch.testing.assert_close(_variances(training_regime)["1"], expected["1"].double())
    assert not torch.allclose(_variances(training_regime)["7"], expected["7"].double(), rtol=1e-3)

    passes, change = recalibrate_in_inference_regime(model, batches, len(batches), max_passes=3, tolerance=0.0)
    assert passes == 3 and change > 0
    for name, var in _variances(model).items():
        torch.testing.assert_close(var, expected[name].double(), rtol=1e-5, atol=1e-6)
    for name, layer in population_norm_layers(reference):
        if not isinstance(layer, MovingAverageBatchNorm2d):
            torch.testing.assert_close(dict(population_norm_layers(model))[name].running_mean, layer.running_mean,
                                       rtol=1e-5, atol=1e-6)


def test_passes_stop_at_the_fixed_point():
    model = _model("BN", "BN", "BN")
    _train_steps(model)
    passes, change = recalibrate_in_inference_regime(model, _batches(), 3, max_passes=10, tolerance=1e-9)
    assert passes == 4  # pass 4 reproduces pass 3 exactly: same inputs, same statistics
    assert change == pytest.approx(0.0, abs=1e-12)


class _RandomHalf(nn.Module):
    """Keeps a random half of the samples, like detectron2's RoI sampling between backbone and heads."""

    def forward(self, x):
        return x[torch.randperm(x.shape[0])[: max(1, x.shape[0] // 2)]]


def test_random_sampling_repeats_in_every_pass_so_the_fixed_point_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), _RandomHalf(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    _train_steps(model)
    batches = _batches(shapes=((4, 5, 5), (6, 4, 4), (4, 6, 6)))
    passes, change = recalibrate_in_inference_regime(model, batches, 3, max_passes=10, tolerance=0.0)
    assert (passes, change) == (3, 0.0)


def test_one_pass_is_the_training_regime_recalibration():
    model = _model("BN", "CBN", "MABN")
    _train_steps(model)
    expected = copy.deepcopy(model)
    recalibrate(expected, _batches(), 3)
    assert recalibrate_in_inference_regime(model, _batches(), 3, max_passes=1) == (1, 0.0)
    for (_, a), (_, b) in zip(population_norm_layers(model), population_norm_layers(expected)):
        assert torch.equal(a.running_var, b.running_var)


def test_modes_and_other_buffers_are_restored_and_the_loader_is_read_once():
    model = _model("CBN", "MABN", "PreciseBN")
    _train_steps(model)
    modes, state = _state(model)
    iterator = iter(_batches() + _batches(seed=5))
    recalibrate_in_inference_regime(model, iterator, 3, max_passes=3, tolerance=0.0)
    assert len(list(iterator)) == 3
    assert {name: m.training for name, m in model.named_modules()} == modes
    statistics = {f"{name}.{key}" for name, _ in population_norm_layers(model)
                  for key in ("running_mean", "running_var", "recalibrated")}
    for key, value in model.state_dict().items():
        if key not in statistics:
            assert torch.equal(value, state[key]), key


def test_bad_max_passes_is_rejected():
    with pytest.raises(ValueError, match="max_passes"):
        recalibrate_in_inference_regime(_model("BN"), _batches(), 3, max_passes=-1)


def test_automatic_pass_limit_reaches_the_exact_fixed_point():
    model = _model("BN", "BN", "BN")
    _train_steps(model)
    expected, _ = _inference_regime_reference(model, _batches())
    passes, change = recalibrate_in_inference_regime(model, _batches(), 3, tolerance=0.0)
    assert passes == 4 and change == 0.0  # 3 layers + 1: the last pass confirms the fixed point
    for name, var in _variances(model).items():
        torch.testing.assert_close(var, expected[name].double(), rtol=1e-5, atol=1e-6)
