"""tools/predict.py on a tiny trained checkpoint: PNGs, COCO-style json, a grid; folded = unfolded; no load warnings."""
import json
import subprocess
import sys

import cv2
import pytest
import torch
from detectron2.data import DatasetCatalog
from test_train_net import DEMO_BASE, REPO, parse, tiny_opts
from tool_scripts import load_tool

from d2norm.data import register_shapes_split


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A CBN model trained 3 iterations (window 2, so the cross-iteration buffers are filled), and its opts."""
    root = tmp_path_factory.mktemp("predict")
    register_shapes_split("predict_shapes_train", root / "train", num_images=4, seed=5)
    register_shapes_split("predict_shapes_val", root / "val", num_images=3, seed=6)
    opts = tiny_opts("CBN", root / "out", ("predict_shapes_train", "predict_shapes_val"), max_iter=3)
    opts += ["TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    load_tool("train_net").main(parse(["--config-file", str(DEMO_BASE), *opts]))
    DatasetCatalog.get("predict_shapes_val")  # generates the images
    return root / "out" / "model_final.pth", opts, root / "val" / "images"


def test_images_and_a_folder_in_pngs_json_and_grid_out_without_loading_warnings(checkpoint, tmp_path):
    weights, opts, images = checkpoint
    single = sorted(images.iterdir())[0]
    out = tmp_path / "vis"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "predict.py"), "--config-file", str(DEMO_BASE), "--weights", str(weights),
         "--input", str(images), str(single), "--output", str(out), "--json", str(tmp_path / "det.json"),
         "--grid", str(tmp_path / "grid.png"), "--score-thresh", "0", *opts],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Skip loading" not in log and "not found in the checkpoint" not in log and "Warning" not in log
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in images.iterdir())
    grid = cv2.imread(str(tmp_path / "grid.png"))
    drawn = cv2.imread(str(out / single.name))
    assert grid.shape[1] > 3 * drawn.shape[1] and drawn.shape[0] >= 128  # 4 images in a row, enlarged
    detections = json.loads((tmp_path / "det.json").read_text())
    assert detections and {d["image_id"] for d in detections} <= {1, 2, 3, 4}
    for d in detections:
        assert set(d) >= {"image_id", "category_id", "bbox", "score", "segmentation", "file_name"}
        assert d["score"] >= 0 and len(d["bbox"]) == 4


def test_folded_norms_predict_what_the_unfolded_model_predicts(checkpoint):
    weights, opts, images = checkpoint
    predict = load_tool("predict")
    argv = ["--config-file", str(DEMO_BASE), "--weights", str(weights), "--json", "unused",
            "--score-thresh", "0", *opts]
    cfg = predict.setup_cfg(predict.parse_args(argv))
    folded, unfolded = predict.Predictor(cfg, fold=True), predict.Predictor(cfg, fold=False)
    assert not any("Norm" in type(m).__name__ and "Frozen" not in type(m).__name__ for m in folded.model.modules())
    image = cv2.imread(str(sorted(images.iterdir())[0]))
    a, b = folded(image), unfolded(image)
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-2, rtol=1e-4)
