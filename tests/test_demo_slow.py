"""The README's demo, run as written (slow: about 10 minutes on a 2-core CPU; `make test-slow`).

Output streams to the terminal under ``pytest -s`` (as ``make test-slow`` runs it): training
progress, the COCO tables and the box AP that the assertion checks.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "mask_rcnn_R_18_FPN_MABN_shapes.yaml"
# Box AP measured for the shipped demo (docs/demo.md), minus a margin for run-to-run noise.
MIN_BOX_AP = 35.0  # the goal; measured: 45.3 (seed 0), 40.9 (seed 1), 42.8 (seed 2)


@pytest.mark.slow
def test_demo_trains_to_a_working_box_ap_and_draws_its_predictions(tmp_path):
    tools = REPO / "tools"
    subprocess.run([sys.executable, str(tools / "train_net.py"), "--config-file", str(DEMO),
                    "OUTPUT_DIR", str(tmp_path)],
                   cwd=REPO, check=True, timeout=3600)
    results = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    box_ap = [r["bbox/AP"] for r in results if "bbox/AP" in r]
    print(f"\ndemo box AP: {box_ap[-1]:.1f} (the test requires >= {MIN_BOX_AP})" if box_ap else "\nno box AP logged")
    assert box_ap and box_ap[-1] >= MIN_BOX_AP
    subprocess.run([sys.executable, str(tools / "predict.py"), "--config-file", str(DEMO),
                    "--weights", str(tmp_path / "model_final.pth"), "--limit", "8",
                    "--grid", str(tmp_path / "predictions.png")], cwd=REPO, check=True, timeout=600)
    assert (tmp_path / "predictions.png").stat().st_size > 0
    # `make demo` then plots the norm statistics next to the checkpoints.
    plot = subprocess.run([sys.executable, str(REPO / "tools" / "plot_norm_stats.py"), str(tmp_path)], cwd=REPO)
    assert plot.returncode == 0
    assert (tmp_path / "norm_stats_parts.png").is_file() and (tmp_path / "norm_stats_layers.png").is_file()
