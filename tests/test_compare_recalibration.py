"""tools/compare_recalibration.py on a tiny trained detector: both regimes recalibrate and evaluate."""
import math

import pytest
from test_train_net import DEMO_BASE, parse, tiny_opts, tiny_splits  # noqa: F401 (fixture)
from tool_scripts import load_tool


def test_compares_the_two_regimes_on_a_trained_checkpoint(tiny_splits, tmp_path, capsys):  # noqa: F811
    opts = tiny_opts("PreciseBN", tmp_path, tiny_splits, max_iter=2) + ["TEST.EVAL_PERIOD", "0", "SEED", "3"]
    load_tool("train_net").main(parse(["--config-file", str(DEMO_BASE), *opts]))

    tool = load_tool("compare_recalibration")
    (row,) = tool.main([str(tmp_path), "--num-iter", "2", "--max-passes", "3", "--tolerance", "0"])
    assert row["norm"] == "PreciseBN" and row["seed"] == 3 and row["num_iter"] == 2
    assert row["passes"] == 3  # tolerance 0: every allowed pass runs on a deep model
    for regime in ("training", "inference"):
        for task in ("bbox", "segm"):
            assert math.isfinite(row[f"{regime}_{task}_ap"])
    table = capsys.readouterr().out
    assert f"| {tmp_path} | model_final.pth | PreciseBN |" in table
    assert "| PreciseBN | box |" in table and "| PreciseBN | mask |" in table


def test_last_checkpoint_and_missing_files_are_named(tmp_path):
    tool = load_tool("compare_recalibration")
    (tmp_path / "model_0000199.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("model_0000199.pth")
    assert tool.checkpoint_file(tmp_path, "last") == tmp_path / "model_0000199.pth"
    with pytest.raises(SystemExit, match="model_final.pth does not exist"):
        tool.checkpoint_file(tmp_path, "model_final.pth")


def test_a_config_without_test_set_asks_for_one(tmp_path):
    (tmp_path / "config.yaml").write_text("DATASETS:\n  TEST: []\n")
    with pytest.raises(SystemExit, match="has no DATASETS.TEST: pass --dataset"):
        load_tool("compare_recalibration").compare(tmp_path)
