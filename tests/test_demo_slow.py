"""The README's demo, run as written (slow: about 10 minutes on a 2-core CPU; `make test-slow`)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "mask_rcnn_R_18_FPN_CBN_shapes.yaml"
# Box AP measured for the shipped demo (README, Measurements), minus a margin for run-to-run noise.
MIN_BOX_AP = 8.0  # measured: 12.7 (2000 iterations)


@pytest.mark.slow
def test_demo_trains_and_reaches_a_working_box_ap(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(DEMO), "OUTPUT_DIR", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    box_ap = [r["bbox/AP"] for r in results if "bbox/AP" in r]
    assert box_ap and box_ap[-1] >= MIN_BOX_AP
    # `make demo` then plots the norm statistics next to the checkpoints.
    plot = subprocess.run([sys.executable, str(REPO / "tools" / "plot_norm_stats.py"), str(tmp_path)], cwd=REPO)
    assert plot.returncode == 0
    assert (tmp_path / "norm_stats_parts.png").is_file() and (tmp_path / "norm_stats_layers.png").is_file()
