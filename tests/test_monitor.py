"""d2norm.statistics.monitor: norm statistics against hand-computed values; training unchanged by the monitor."""
import json
import math

import pytest
import torch
import torch.nn as nn
from test_train_net import DEMO_BASE, parse, tiny_opts, tiny_splits  # noqa: F401 (fixture)
from tool_scripts import load_tool

from d2norm.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.modeling.binding import prepare_model
from d2norm.statistics.monitor import NormStatsProbe, model_part, recalibration_shift
from d2norm.statistics.recalibration import recalibrate


def _column(*values):
    """(N, 1, 1, 1) input with one channel, requiring grad as in a training iteration."""
    return torch.tensor(values, dtype=torch.float64).view(-1, 1, 1, 1).requires_grad_()


def _observe(model, x):
    probe = NormStatsProbe(model)
    with probe.observe():
        model(x)
    return probe.summaries()


def test_parts_follow_detectron2_module_paths():
    assert model_part("backbone.bottom_up.res2.0.conv1.norm") == "backbone"
    assert model_part("backbone.fpn_output3.norm") == "fpn"
    assert model_part("roi_heads.box_head.conv1.norm") == "heads"
    assert model_part("roi_heads.mask_head.mask_fcn1.norm") == "heads"
    assert model_part("head.cls_subnet.1.levels.0") == "heads"
    assert model_part("0") == "other"


def test_bn_inconsistency_is_the_gap_between_batch_and_population_statistics():
    bn = nn.BatchNorm2d(1, eps=1e-12).double()
    bn.running_mean.fill_(0.0)
    bn.running_var.fill_(4.0)
    # Batch [1, 3]: mean 2, biased variance 1. Inference output = y/2 + 1 of the training output y:
    # s = 1/2, δ = (2 - 0)/2 = 1, gap = √(1 + 1/4).
    scalars = _observe(nn.Sequential(bn), _column(1.0, 3.0))
    assert scalars["norm_layer/0/inconsistency"] == pytest.approx(math.sqrt(1.25))
    assert scalars["norm/other/inconsistency"] == pytest.approx(math.sqrt(1.25))


def _cbn_chain(burnin_iters=0):
    conv = nn.Conv2d(1, 1, 1, bias=False).double()
    cbn = CrossIterationBatchNorm2d(1, window=2, burnin_iters=burnin_iters, eps=1e-12).double()
    model = prepare_model(nn.Sequential(conv, cbn), example_inputs=(torch.zeros(1, 1, 2, 2, dtype=torch.float64),))
    with torch.no_grad():
        conv.weight.fill_(1.0)
    return model, conv


def test_cbn_pooled_statistics_compensation_and_valid_fraction():
    model, conv = _cbn_chain()
    scalars = _observe(model, _column(1.0, 3.0))  # W = 1: stores mean 2, variance 1
    assert scalars["norm/other/cbn_pooling"] == 1.0
    assert "norm/other/cbn_valid_fraction" not in scalars  # nothing stored yet
    # Running statistics after one step (momentum 0.1, unbiased variance 2): mean 0.2, variance 1.1.
    with torch.no_grad():
        conv.weight.fill_(1.2)
    scalars = _observe(model, _column(0.0, 2.0))
    # Stored entry moved to W = 1.2 (CBN Eq. 6-7): mean 2 + 2·0.2 = 2.4 (exact: linear in W);
    # variance 1 + (2·W·var_x)·0.2 - 0.4² = 1.24. Current batch [0, 2.4]: mean 1.2, variance 1.44.
    assert scalars["norm/other/cbn_valid_fraction"] == 1.0
    assert scalars["norm/other/cbn_mean_compensation"] == pytest.approx(0.4)  # |Δμ| / σ_old
    assert scalars["norm/other/cbn_var_compensation"] == pytest.approx(0.24)  # |Δσ²| / σ²_old
    # Pooled (Eq. 8-9): mean (1.2 + 2.4)/2 = 1.8, variance (1.44 + 0.36 + 1.24 + 0.36)/2 = 1.7.
    expected = math.sqrt((1.8 - 0.2) ** 2 / 1.1 + (math.sqrt(1.7 / 1.1) - 1) ** 2)
    assert scalars["norm/other/inconsistency"] == pytest.approx(expected)


def test_cbn_entry_with_negative_compensated_variance_is_not_valid():
    model, conv = _cbn_chain()
    _observe(model, _column(1.0, 3.0))
    with torch.no_grad():
        conv.weight.fill_(3.0)  # variance 1 + 2·2·1 - (2·2)² = -11 < 0
    scalars = _observe(model, _column(0.0, 2.0))
    assert scalars["norm/other/cbn_valid_fraction"] == 0.0


def test_cbn_in_burn_in_is_measured_with_its_batch_statistics():
    model, _ = _cbn_chain(burnin_iters=5)
    model[1].running_var.fill_(4.0)
    scalars = _observe(model, _column(1.0, 3.0))
    assert scalars["norm/other/cbn_pooling"] == 0.0
    assert scalars["norm/other/inconsistency"] == pytest.approx(math.sqrt(1.25))
    assert "norm/other/cbn_valid_fraction" not in scalars


def test_mabn_clipping_smas_emas_ratio_and_schedule():
    mabn = MovingAverageBatchNorm2d(1, buffer_size=1, warmup_iters=0, renorm_free_iters=0, rmax=2.0,
                                    ema_decay=0.5, eps=0.0).double()
    model = nn.Sequential(mabn)
    # Step 1 (warm-up: t <= m): batch χ = (1 + 9)/2 = 5 against EMAS 1, ratio √5 > r_max = 2:
    # clipped, r = 2; training divides by √5/2, inference by 1: gap |√5/2 - 1|.
    scalars = _observe(model, _column(1.0, 3.0))
    assert scalars["norm/other/mabn_clip_rate"] == 1.0
    assert scalars["norm/other/mabn_smas_emas_ratio"] == pytest.approx(5.0)
    assert scalars["norm/other/mabn_warmed_up"] == 0.0
    assert scalars["norm/other/mabn_renorm"] == 1.0
    assert scalars["norm/other/inconsistency"] == pytest.approx(math.sqrt(5) / 2 - 1)
    # Step 2: SMAS = χ = 1 against EMAS 0.5·1 + 0.5·5 = 3, ratio 1/√3 within [1/2, 2]: r = ratio,
    # so training and inference divide by the same √3: no inconsistency.
    scalars = _observe(model, _column(1.0, 1.0))
    assert scalars["norm/other/mabn_clip_rate"] == 0.0
    assert scalars["norm/other/mabn_smas_emas_ratio"] == pytest.approx(1 / 3)
    assert scalars["norm/other/mabn_warmed_up"] == 1.0
    assert scalars["norm/other/inconsistency"] == pytest.approx(0.0, abs=1e-12)


def test_precise_bn_is_measured_once_it_has_population_statistics():
    model = nn.Sequential(PreciseBatchNorm2d(1).double())
    assert _observe(model, _column(1.0, 3.0)) == {}
    recalibrate(model, [_column(1.0, 3.0).detach()], 1)
    assert _observe(model, _column(1.0, 3.0))["norm/other/inconsistency"] == pytest.approx(0.0, abs=1e-6)


def test_no_grad_forwards_such_as_recalibration_are_not_measured():
    model = nn.Sequential(nn.BatchNorm2d(1).double())
    probe = NormStatsProbe(model)
    with probe.observe(), torch.no_grad():
        model(_column(1.0, 3.0))
    assert probe.summaries() == {}


def test_recalibration_shift_per_part():
    before = {"backbone.bottom_up.stem.norm": (torch.zeros(1), torch.ones(1), 0.0),
              "roi_heads.box_head.conv1.norm": (None, torch.ones(1), 0.0)}
    after = {"backbone.bottom_up.stem.norm": (torch.ones(1), torch.full((1,), 4.0), 0.0),
             "roi_heads.box_head.conv1.norm": (None, torch.full((1,), 9.0), 0.0)}
    # δ = 1, s = 2: √2; MABN-like (no mean): s = 3, |3 - 1| = 2.
    assert recalibration_shift(before, after) == {
        "norm/backbone/recalibration_shift": pytest.approx(math.sqrt(2)),
        "norm/heads/recalibration_shift": pytest.approx(2.0),
    }


def _train(output_dir, splits, monitor):
    """5 iterations of the tiny detector: MABN in the backbone, CBN in the FPN and heads."""
    train_net = load_tool("train_net")
    opts = tiny_opts("CBN", output_dir, splits, max_iter=5) + [
        "MODEL.RESNETS.NORM", "MABN", "SEED", "7", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
        "D2NORM.PRECISE_BN.PERIOD", "3", "D2NORM.MONITOR.ENABLED", str(monitor), "D2NORM.MONITOR.PERIOD", "1",
    ]
    trainer = train_net.Trainer(train_net.setup(parse(["--config-file", str(DEMO_BASE), *opts])))
    trainer.resume_or_load(resume=False)
    trainer.train()
    metrics = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    return metrics, trainer.model.state_dict()


def _observe_backward(model, x, probe):
    """One observed training iteration: forward, backward of a fixed random loss, summaries."""
    with probe.observe():
        out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype))
    return probe.summaries()


def test_bn_backward_statistics_are_the_terms_of_its_input_gradient():
    """BN: ∂L/∂x = (∂L/∂ẑ − g − ẑ·ψ)/σ with the measured g = mean ∂L/∂ẑ and ψ = mean ẑ·∂L/∂ẑ."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, eps=1e-10).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.3, -0.2, 1.0]))
    probe = NormStatsProbe(nn.Sequential(bn), backward_window=2)
    captured = {}
    probe.backward.add = lambda name, statistics: captured.update(statistics)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    _observe_backward(nn.Sequential(bn), x, probe)
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    z = (x - mean) / torch.sqrt(var + 1e-10)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    grad_z = grad_y * bn.weight.view(1, 3, 1, 1)
    g, psi = grad_z.mean(dim=(0, 2, 3)), (grad_z * z).mean(dim=(0, 2, 3))
    torch.testing.assert_close(captured["g"], g.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(captured["psi"], psi.detach(), rtol=1e-9, atol=1e-12)
    expected = (grad_z - g.view(1, 3, 1, 1) - z * psi.view(1, 3, 1, 1)) / torch.sqrt(var + 1e-10)
    torch.testing.assert_close(x.grad, expected.detach(), rtol=1e-8, atol=1e-10)


def test_mabn_reports_the_moving_average_of_psi_its_backward_used():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    mabn = MovingAverageBatchNorm2d(3, buffer_size=4, warmup_iters=0, renorm_free_iters=0).double()
    model = prepare_model(nn.Sequential(conv, mabn), example_inputs=(torch.zeros(1, 2, 4, 4, dtype=torch.float64),))
    probe = NormStatsProbe(model, backward_window=2)
    reported = []
    probe.backward.add = lambda name, statistics: reported.append(statistics)
    for t in range(6):  # past the m = 4 iterations of warm-up into the SMAS
        x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        _observe_backward(model, x, probe)
        assert reported[-1]["g"] is None  # no centring, no g term
        expected = mabn.buffer_gz.mean(dim=0) if t + 1 > 4 else mabn.buffer_gz[(t + 1) % 4]
        torch.testing.assert_close(reported[-1]["psi"], expected, rtol=1e-10, atol=1e-14)


def test_mabn_backward_statistics_spread_less_than_bn_at_batch_2():
    """The claim MABN rests on (Yan et al. 2020): at batch 2 the batch's backward statistic ψ is
    noisy across iterations; MABN's moving average over m = 16 iterations is much less so."""
    spreads = {}
    for name in ("BN", "MABN"):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        norm = nn.BatchNorm2d(8) if name == "BN" else MovingAverageBatchNorm2d(8, warmup_iters=16,
                                                                               renorm_free_iters=16)
        head = nn.Conv2d(8, 4, 1)
        model = prepare_model(nn.Sequential(conv, norm, nn.ReLU(), head), example_inputs=(torch.zeros(1, 3, 8, 8),))
        probe = NormStatsProbe(model, backward_window=10)
        data = torch.Generator().manual_seed(1)
        for _ in range(30):  # a fixed model: no parameter update; 20 iterations fill MABN's buffers
            x = torch.randn(2, 3, 8, 8, generator=data) * (1 + torch.rand(1, generator=data))
            with probe.observe():
                out = model(x)
            (out - torch.randn(out.shape, generator=data)).square().mean().backward()  # a regression target per batch
            scalars = probe.summaries()
        spreads[name] = scalars["norm_layer/1/backward_psi_spread"], scalars["norm_layer/1/backward_psi"]
    (bn_spread, bn_rms), (mabn_spread, mabn_rms) = spreads["BN"], spreads["MABN"]
    assert 0.5 < mabn_rms / bn_rms < 2  # the same scale of ψ ...
    assert mabn_spread < 0.5 * bn_spread, spreads  # ... far less noise across iterations


def test_training_is_identical_with_the_monitor_on_and_off(tiny_splits, tmp_path):  # noqa: F811
    off, off_state = _train(tmp_path / "off", tiny_splits, monitor=False)
    on, on_state = _train(tmp_path / "on", tiny_splits, monitor=True)
    losses = [{k: v for k, v in m.items() if "loss" in k} for m in off]
    assert losses and losses == [{k: v for k, v in m.items() if "loss" in k} for m in on]
    for key, value in off_state.items():
        assert torch.equal(on_state[key], value), key
    assert not any(k.startswith("norm") for m in off for k in m)
    keys = set().union(*on)
    for part in ("backbone", "fpn", "heads"):
        assert f"norm/{part}/inconsistency" in keys
        assert f"norm/{part}/recalibration_shift" in keys
    assert any(k.startswith("norm_layer/roi_heads.mask_head.") for k in keys)
    assert "norm/backbone/mabn_warmed_up" in keys and "norm/fpn/cbn_pooling" in keys
    for part in ("backbone", "fpn"):  # MABN in the backbone, CBN in the FPN: measured after the backward
        assert f"norm/{part}/backward_psi_spread" in keys
    assert "norm/fpn/backward_g_spread" in keys and "norm/backbone/backward_g" not in keys  # MABN has no g
