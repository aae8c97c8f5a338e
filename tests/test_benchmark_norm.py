"""tools/benchmark_norm.py and tools/norm_cost: report structure, memory measure, official-style CBN baseline."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from tool_scripts import load_tool

from d2norm.layers import CrossIterationBatchNorm2d

REPO = Path(__file__).resolve().parents[1]
bench = load_tool("benchmark_norm")  # puts tools/ on sys.path for its package, norm_cost
from norm_cost import measure, official_cbn, variants  # noqa: E402

BLOCK_NORMS = {"BN", "PreciseBN", "CBN floor", "CBN", "MABN", "official-style CBN"}
TINY = ["--device", "cpu", "--shapes", "8x6", "--window", "4", "--repeats", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``--threads`` sets torch's global thread count; keep it from leaking into other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def block_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "report.json"
    bench.main(TINY + ["--skip-detector", "--json", str(path)])
    return json.loads(path.read_text())


def test_block_report_has_every_variant_and_positive_ratios(block_report):
    (block,) = block_report["blocks"]
    assert set(block["results"]) == BLOCK_NORMS
    for r in block["results"].values():
        assert len(r["times_s"]) == 2 and _positive(r["time_s"])
        assert _positive(r["peak_bytes"]) and _positive(r["forward_bytes"])
    assert set(block["ratios"]) == {
        "PreciseBN/BN", "CBN floor/BN", "CBN/BN", "MABN/BN", "official-style CBN/BN", "CBN/CBN floor",
        "CBN/official-style CBN",
    }
    for ratios in block["ratios"].values():
        assert ratios.keys() >= {"time", "peak_memory", "forward_memory"}
        assert all(_positive(v) for v in ratios.values())
    assert block_report["detector"] is None  # --skip-detector


def test_block_windows_are_full_when_timed(block_report):
    """Warm-up defaults to the window length, so both CBNs pool k-1 past iterations while timed."""
    assert block_report["blocks"][0]["window_filled"] == {"CBN": 3, "official-style CBN": 3, "max": 3}


def test_window_state_of_ours_is_about_a_third_of_official(block_report):
    """Official: a weight copy and two weight-sized gradients per past iteration
    (Howal/Cross-iterationBatchNorm CBN.py); ours: one weight-sized derivative plus per-channel scalars
    and one mean patch."""
    ratio = block_report["blocks"][0]["ratios"]["CBN/official-style CBN"]["window_state"]
    assert 0.2 < ratio < 0.5
    assert block_report["blocks"][0]["results"]["BN"]["window_state_bytes"] == 0


def test_markdown_table_lists_absolute_numbers_and_ratios(capsys):
    bench.main(TINY + ["--skip-detector", "--warmup", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| norm | time (ms) | time / BN |" in out
    for name in ("| BN |", "| CBN |", "| MABN |", "| official-style CBN |", "| CBN/official-style CBN |"):
        assert name in out
    assert "load average" in out and "TorchDispatchMode" in out  # says how memory was measured


def test_time_ratio_is_the_median_of_per_round_ratios():
    """Load that changes between rounds slows every variant of that round alike and cancels."""
    slow_then_fast = {"times_s": [2.0, 20.0, 3.0], "peak_bytes": 2, "forward_bytes": 1}
    baseline = {"times_s": [1.0, 10.0, 1.0], "peak_bytes": 1, "forward_bytes": 1}
    ratios = measure.ratios(slow_then_fast, baseline)
    assert ratios == {"time": 2.0, "peak_memory": 2.0, "forward_memory": 1.0}


def test_step_memory_counts_new_storages_only():
    """Peak = largest sum of live tensors created in the step; views and in-place ops add nothing."""
    def forward():
        ones = torch.ones(1000)  # 4000 bytes, freed once the product exists
        return ones * 2

    def backward(out):
        out.view(10, 100).add_(1)

    held, peak = measure.step_memory(forward, backward, torch.device("cpu"))
    assert (held, peak) == (4000, 8000)


def test_official_style_baseline_computes_the_same_normalization_as_d2norm_cbn():
    """The timing comparison is like for like: with the weight moving between steps, the baseline's
    output and input gradient equal d2norm's CBN (same window, compensation and validity rule)."""
    torch.manual_seed(0)
    conv_a = nn.Conv2d(3, 5, 3, padding=1, bias=False).double()
    conv_b = nn.Conv2d(3, 5, 3, padding=1, bias=False).double()
    conv_b.load_state_dict(conv_a.state_dict())
    ours = CrossIterationBatchNorm2d(5, window=3).double().bind_conv(conv_a)
    official = official_cbn.OfficialStyleCrossIterationBN(5, window=3).double()
    for _ in range(5):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(conv_a(xa)), official(conv_b(xb), conv_b.weight)
        torch.testing.assert_close(ya, yb)
        grad = torch.randn_like(ya)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad)
        with torch.no_grad():
            delta = 0.05 * torch.randn_like(conv_a.weight)
            conv_a.weight += delta
            conv_b.weight += delta
    assert len(official.history) == 2 and int(ours.history_length) == 2


def test_detector_report_has_bn_cbn_mabn_with_active_windows(tmp_path):
    """A small Mask R-CNN (the demo's R-18 config) stands in for R50 to keep the test fast."""
    path = tmp_path / "report.json"
    bench.main(TINY + [
        "--warmup", "1", "--repeats", "1", "--json", str(path),
        "--detector-config", str(REPO / "configs" / "demo" / "Base-Demo-Shapes.yaml"),
        "--detector-size", "64", "--detector-warmup", "1", "--detector-steps", "1",
    ])
    detector = json.loads(path.read_text())["detector"]
    assert set(detector["results"]) == {"BN", "PreciseBN", "CBN floor", "CBN", "MABN"}
    for r in detector["results"].values():
        assert _positive(r["time_s"]) and _positive(r["peak_bytes"]) and r["norm_layers"] > 0
    assert detector["results"]["CBN"]["layers_past_warmup"] == detector["results"]["CBN"]["norm_layers"]
    assert detector["results"]["MABN"]["layers_past_warmup"] == detector["results"]["MABN"]["norm_layers"]
    for ratios in detector["ratios"].values():
        assert all(_positive(v) for v in ratios.values())
    # every variant's heads work on the same RoIs (shared proposals), whatever its untrained RPN proposes
    assert len({r["foreground_rois_per_image"] for r in detector["results"].values()}) == 1


def test_cbn_floor_adds_one_weight_gradient_to_convs_that_feed_batch_norm_only(monkeypatch):
    """The floor is BN plus CBN's unavoidable extra (a conv weight-gradient of the norm's input) and
    nothing else: same outputs and gradients as BN, one extra pass per norm-fed conv per training step."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    floor = variants.add_cbn_floor(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)),
        (torch.zeros(2, 3, 5, 5),),
    )
    floor.load_state_dict(plain.state_dict())
    calls = []
    real = variants.conv2d_weight
    monkeypatch.setattr(variants, "conv2d_weight", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x = torch.randn(2, 3, 5, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), floor(xb)
    torch.testing.assert_close(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    assert calls == [torch.Size([4, 3, 3, 3])]  # the first conv only, once
    with torch.no_grad():
        floor(x)
    assert len(calls) == 1  # not in inference


def test_default_block_shapes_are_the_two_goal_shapes_and_bad_shapes_are_named():
    assert bench.parse_args([]).shapes == [(256, 32), (64, 128)]
    assert bench.parse_args(["--shapes", "64X16"]).shapes == [(64, 16)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "256"])


def test_every_requested_shape_gets_its_block_section(tmp_path, capsys):
    path = tmp_path / "report.json"
    bench.main(TINY[:2] + ["--shapes", "8x6", "4x5"] + TINY[4:] + ["--skip-detector", "--json", str(path)])
    blocks = json.loads(path.read_text())["blocks"]
    assert [(b["config"]["channels"], b["config"]["size"]) for b in blocks] == [(8, 6), (4, 5)]
    out = capsys.readouterr().out
    assert "conv3x3 8->8 + norm, N=2, 6x6" in out and "conv3x3 4->4 + norm, N=2, 5x5" in out
