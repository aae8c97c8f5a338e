"""tools/benchmark_recalibration.py reports recalibration and inference cost side by side."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_reports_both_passes_per_100_images_and_their_ratio(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "benchmark_recalibration.py"), "--batches", "2",
         "--json", str(out), "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
         "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["images"] == 4
    assert result["recalibration_s_per_100_images"] > 0 and result["inference_s_per_100_images"] > 0
    ratio = result["recalibration_s_per_100_images"] / result["inference_s_per_100_images"]
    assert abs(ratio - result["ratio_recalibration_over_inference"]) < 1e-9
    assert "recalibration / inference" in proc.stdout
