"""tools/plot_norm_stats.py: PNGs from the monitor's metrics.json, a clear error without them."""
import json

import pytest
from tool_scripts import load_tool

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_writes_part_curves_and_layer_heat_maps(tmp_path):
    _write_metrics(tmp_path / "metrics.json", [
        {"iteration": 19, "total_loss": 2.0, "norm/fpn/inconsistency": 0.3, "norm/heads/inconsistency": 0.5,
         "norm/heads/cbn_valid_fraction": 1.0, "norm_layer/backbone.fpn_lateral2.norm/inconsistency": 0.3,
         "norm_layer/roi_heads.box_head.conv1.norm/inconsistency": 0.5},
        {"iteration": 39, "total_loss": 1.5, "norm/fpn/inconsistency": 0.2, "norm/heads/inconsistency": 0.4,
         "norm_layer/backbone.fpn_lateral2.norm/inconsistency": 0.2,
         "norm_layer/roi_heads.box_head.conv1.norm/inconsistency": 0.4,
         "norm/fpn/backward_psi_spread": 2e-5, "norm_layer/backbone.fpn_lateral2.norm/backward_psi_spread": 2e-5},
        {"iteration": 39, "norm/heads/recalibration_shift": 0.1},
        {"iteration": 40, "bbox/AP": 10.0},
    ])
    tool = load_tool("plot_norm_stats")
    parts, layers = tool.read_norm_metrics(tmp_path / "metrics.json")
    assert parts["inconsistency"] == {"fpn": {19: 0.3, 39: 0.2}, "heads": {19: 0.5, 39: 0.4}}
    assert parts["recalibration_shift"] == {"heads": {39: 0.1}}
    assert list(layers) == ["backbone.fpn_lateral2.norm", "roi_heads.box_head.conv1.norm"]
    assert parts["backward_psi_spread"] == {"fpn": {39: 2e-5}}
    assert tool.read_norm_metrics(tmp_path / "metrics.json", "backward_psi_spread")[1] == {
        "backbone.fpn_lateral2.norm": {39: 2e-5}}
    written = tool.main([str(tmp_path), "--out-dir", str(tmp_path / "plots")])
    assert [p.name for p in written] == ["norm_stats_parts.png", "norm_stats_layers.png",
                                         "norm_stats_backward_layers.png"]
    for path in written:
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_metrics_without_norm_statistics_name_the_config_key(tmp_path):
    _write_metrics(tmp_path / "metrics.json", [{"iteration": 19, "total_loss": 2.0}])
    with pytest.raises(SystemExit, match="D2NORM.MONITOR.ENABLED"):
        load_tool("plot_norm_stats").main([str(tmp_path)])
    with pytest.raises(SystemExit, match="metrics.json does not exist"):
        load_tool("plot_norm_stats").main([str(tmp_path / "missing")])


def test_a_monitored_run_without_monitored_layers_has_nothing_to_plot(tmp_path, capsys):
    """The GroupNorm demo: the monitor is on but no layer has population statistics."""
    _write_metrics(tmp_path / "metrics.json", [{"iteration": 19, "total_loss": 2.0}])
    (tmp_path / "config.yaml").write_text("D2NORM:\n  MONITOR:\n    ENABLED: true\n")
    assert load_tool("plot_norm_stats").main([str(tmp_path)]) == []
    assert "no norm statistics to plot" in capsys.readouterr().out
