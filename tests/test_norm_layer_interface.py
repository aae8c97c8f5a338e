"""The one interface of a d2norm norm layer (``d2norm.layers.NormLayer``): what each layer reports
is what it does, and a norm type written against the interface alone works with every consumer."""
import pytest
import torch
import torch.nn as nn
from detectron2.layers import Conv2d

import d2norm
from d2norm.layers import (
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    NormLayer,
    PreciseBatchNorm2d,
    SyncCrossIterationBatchNorm2d,
    SyncMovingAverageBatchNorm2d,
    TrainingStatistics,
    norm_layer,
)
from d2norm.layers.interface import BatchNormStatistics
from d2norm.statistics.monitor import NormStatsProbe


def _block(norm):
    torch.manual_seed(0)
    block = nn.Sequential(Conv2d(3, 6, 3, padding=1, bias=False, norm=norm))
    d2norm.prepare_model(block, example_inputs=torch.zeros(2, 3, 8, 8))
    return block


def _train(block, steps, seed=1):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(block.parameters(), lr=0.2)
    for step in range(steps):
        x = torch.randn(2, 3, 8, 8) * (1 + step % 3) + step % 2
        opt.zero_grad()
        (block(x) ** 2).mean().backward()
        opt.step()


_LAYERS = {
    "BRN": lambda: BatchRenorm2d(6, rmax=1.1, dmax=0.05, warmup_iters=1, rmax_iters=3, dmax_iters=3),
    "CBN": lambda: CrossIterationBatchNorm2d(6, window=3),
    "MABN": lambda: MovingAverageBatchNorm2d(6, buffer_size=2, warmup_iters=0, renorm_free_iters=0, rmax=1.05),
    "PreciseBN": lambda: PreciseBatchNorm2d(6),
    "BatchNorm2d": lambda: nn.BatchNorm2d(6),
}


def test_every_registered_d2norm_layer_implements_the_interface_under_its_name():
    for name, layer in (("CBN", CrossIterationBatchNorm2d), ("MABN", MovingAverageBatchNorm2d),
                        ("PreciseBN", PreciseBatchNorm2d), ("BRN", BatchRenorm2d),
                        ("SyncMABN", SyncMovingAverageBatchNorm2d), ("SyncCBN", SyncCrossIterationBatchNorm2d)):
        built = d2norm.get_norm(name, 4)
        assert isinstance(built, layer) and isinstance(built, NormLayer) and built.kind == name
        assert norm_layer(built) is built
    assert norm_layer(nn.BatchNorm2d(4)).kind == "BatchNorm2d"
    assert norm_layer(nn.GroupNorm(2, 4)) is None and norm_layer(d2norm.get_norm("FrozenBN", 4)) is None


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_the_reported_training_statistics_are_the_ones_the_next_forward_normalizes_with(name):
    """For CBN past burn-in (pooled, compensated window), MABN with a clipped renorm factor, PreciseBN
    and torch's BN: (x - mean) / sqrt(var + eps) * gamma + beta with the statistics reported before the
    forward is its output, and asking changes no state."""
    block = _block(_LAYERS[name]())
    layer = block[0].norm
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    _train(block, 5)
    seen = {}

    def before(module, args):
        state = {k: v.clone() for k, v in module.state_dict().items()}
        seen["statistics"] = norm_layer(module).training_statistics(args[0])
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
        seen["input"] = args[0].detach().clone()

    layer.register_forward_pre_hook(before)
    layer.register_forward_hook(lambda m, args, out: seen.update(output=out.detach()))
    x = torch.randn(2, 3, 8, 8) * 3 + 1
    block(x).sum().backward()
    statistics = seen["statistics"]
    assert isinstance(statistics, TrainingStatistics)
    if name == "CBN":
        assert statistics.metrics["cbn_pooling"] == 1.0 and "cbn_valid_fraction" in statistics.metrics
    if name == "BRN":
        assert statistics.metrics["brn_renorm"] == 1.0 and float(statistics.metrics["brn_r_clip_rate"]) > 0
    if name == "MABN":
        assert statistics.mean is None and statistics.metrics["mabn_renorm"] == 1.0
        assert float(statistics.metrics["mabn_clip_rate"]) > 0  # r != 1: the renormalised statistic is reported
    mean = 0.0 if statistics.mean is None else statistics.mean.view(1, -1, 1, 1)
    expected = (seen["input"].double() - mean) / torch.sqrt(statistics.var.view(1, -1, 1, 1) + layer.eps)
    expected = expected * layer.weight.detach().view(1, -1, 1, 1) + layer.bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(seen["output"].double(), expected, rtol=1e-5, atol=1e-5)


class _ShrunkBatchNorm2d(BatchNormStatistics, nn.BatchNorm2d):
    """A norm type written against the interface only: BN whose population variance is set to
    half of the recalibrated one (so that every consumer's use of the interface is visible)."""

    kind = "ShrunkBN"

    def set_population_statistics(self, mean, second_moment):
        super().set_population_statistics(mean, second_moment)
        self.running_var.mul_(0.5)


def test_a_new_norm_type_is_one_class_and_a_registration(monkeypatch):
    """Registered by name, it is selected from a detectron2 module, recalibrated, monitored and
    folded without any consumer knowing its class."""
    monkeypatch.setattr(d2norm.modeling.registry, "_REGISTRY", dict(d2norm.modeling.registry._REGISTRY))
    d2norm.register_norm("ShrunkBN", _ShrunkBatchNorm2d)
    block = nn.Sequential(Conv2d(3, 6, 3, padding=1, bias=False, norm=d2norm.get_norm("ShrunkBN", 6)))
    norm = block[0].norm
    batches = [torch.randn(4, 3, 8, 8) + 2 for _ in range(3)]
    d2norm.recalibrate(block, batches, 3)
    features = torch.cat([nn.functional.conv2d(b, block[0].weight, padding=1) for b in batches])
    var, mean = torch.var_mean(features.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(norm.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var.double(), 0.5 * var, rtol=1e-5, atol=1e-6)

    probe = NormStatsProbe(block)
    with probe.observe():
        block(batches[0].requires_grad_())
    assert probe.summaries()["norm/other/inconsistency"] > 0.2  # batch variance vs half of it

    block.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = block(x)
    d2norm.fold_norms(block, example_inputs=(x,))
    assert not any(isinstance(m, _ShrunkBatchNorm2d) for m in block.modules())
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
