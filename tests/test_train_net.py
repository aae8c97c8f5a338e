"""tools/train_net.py from a user's point of view: train -> COCO AP, resume, two CPU processes."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.engine import default_argument_parser

from d2norm import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.data import register_shapes_split
from tool_scripts import load_tool

REPO = Path(__file__).resolve().parents[1]
DEMO_BASE = REPO / "configs" / "demo" / "Base-Demo-Shapes.yaml"


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    register_shapes_split("test_shapes_train", root / "train", num_images=8, seed=3)
    register_shapes_split("test_shapes_val", root / "val", num_images=4, seed=4)
    return "test_shapes_train", "test_shapes_val"


def tiny_opts(norm, output_dir, splits, max_iter=3):
    """The demo architecture shrunk: R-18 (32-channel stem), 16-channel FPN and heads, 96 px, few RoIs, a 4conv1fc box head."""
    train, val = splits
    return [
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)",
        "DATALOADER.NUM_WORKERS", "0",
        "MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm,
        "MODEL.ROI_BOX_HEAD.NORM", norm, "MODEL.ROI_MASK_HEAD.NORM", norm,
        "MODEL.RESNETS.STEM_OUT_CHANNELS", "32",
        "MODEL.FPN.OUT_CHANNELS", "16",
        "MODEL.ROI_BOX_HEAD.NUM_CONV", "4", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.BASE_LR", "0.01", "SOLVER.CHECKPOINT_PERIOD", "2",
        "D2NORM.CBN.WINDOW", "2", "D2NORM.CBN.BURNIN_ITERS", "1",
        "D2NORM.MABN.BUFFER_SIZE", "2", "D2NORM.MABN.WARMUP_ITERS", "1", "D2NORM.MABN.RENORM_FREE_ITERS", "1",
        "D2NORM.PRECISE_BN.NUM_ITER", "2",
    ]


def parse(argv):
    return default_argument_parser().parse_args(argv)


@pytest.mark.parametrize(
    "norm, layer_type",
    [("CBN", CrossIterationBatchNorm2d), ("MABN", MovingAverageBatchNorm2d), ("PreciseBN", PreciseBatchNorm2d)],
)
def test_tiny_detector_trains_and_reports_coco_ap(norm, layer_type, tiny_splits, tmp_path):
    train_net = load_tool("train_net")
    args = parse(["--config-file", str(DEMO_BASE), *tiny_opts(norm, tmp_path, tiny_splits)])
    model = train_net.Trainer.build_model(train_net.setup(args))
    for part in (model.backbone.bottom_up, model.backbone, model.roi_heads.box_head, model.roi_heads.mask_head):
        assert any(isinstance(m, layer_type) for m in part.modules())
    results = train_net.main(args)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert all(math.isfinite(m["total_loss"]) for m in metrics if "total_loss" in m)
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert math.isfinite(results[task]["AP"])


def test_resume_continues_from_the_last_checkpoint_with_norm_state(tiny_splits, tmp_path):
    train_net = load_tool("train_net")
    opts = tiny_opts("CBN", tmp_path, tiny_splits, max_iter=4) + ["TEST.EVAL_PERIOD", "0"]
    cfg = train_net.setup(parse(["--config-file", str(DEMO_BASE), *opts]))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    counters = {k: v for k, v in saved.items() if k.endswith("num_batches_tracked") and "norm" in k}
    assert counters

    opts = tiny_opts("CBN", tmp_path, tiny_splits, max_iter=6) + ["TEST.EVAL_PERIOD", "0"]
    cfg = train_net.setup(parse(["--config-file", str(DEMO_BASE), "--resume", *opts]))
    resumed = train_net.Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    state = resumed.model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def test_two_cpu_processes_train_with_gloo(tiny_splits, tmp_path):
    """`--num-gpus 2` without GPUs: two gloo processes; CBN resolves in the spawned workers."""
    script = tmp_path / "run.py"
    script.write_text(
        "import runpy, sys\n"
        "from d2norm.data import register_shapes_split\n"
        f"register_shapes_split('test_shapes_train', {str(tmp_path / 'data')!r}, num_images=8, seed=3)\n"
        f"register_shapes_split('test_shapes_val', {str(tmp_path / 'data_val')!r}, num_images=4, seed=4)\n"
        f"sys.path.insert(0, {str(REPO / 'tools')!r})\n"
        "import train_net\n"
        "if __name__ == '__main__':\n"
        "    train_net.invoke_main()\n"
    )
    # Workers are spawned: they re-import this script, which registers the splits and d2norm.
    out = tmp_path / "out"
    opts = tiny_opts("CBN", out, tiny_splits, max_iter=3) + ["TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    proc = subprocess.run(
        [sys.executable, str(script), "--num-gpus", "2", "--config-file", str(DEMO_BASE), *opts],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log
    assert "launching 2 CPU processes with the gloo backend" in proc.stdout  # the launcher's own line
    assert (out / "model_final.pth").exists()


def test_eval_only_evaluates_a_trained_precisebn_checkpoint_without_recalibrating(tiny_splits, tmp_path):
    """The saved model carries its recalibrated population statistics: --eval-only just evaluates."""
    train_net = load_tool("train_net")
    opts = tiny_opts("PreciseBN", tmp_path, tiny_splits, max_iter=2) + ["TEST.EVAL_PERIOD", "0"]
    train_net.main(parse(["--config-file", str(DEMO_BASE), *opts]))
    weights = str(tmp_path / "model_final.pth")
    results = train_net.main(parse(["--config-file", str(DEMO_BASE), "--eval-only", *opts, "MODEL.WEIGHTS", weights]))
    assert math.isfinite(results["bbox"]["AP"]) and math.isfinite(results["segm"]["AP"])
