"""tools/train_net.py from a user's point of view: train -> COCO AP, resume, two CPU processes."""
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.engine import HookBase, default_argument_parser
from tool_scripts import load_tool

from d2norm import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d, PreciseBatchNorm2d
from d2norm.data import register_shapes_split
from d2norm.engine.checkpoint import CheckpointError
from d2norm.engine.launch import free_port
from d2norm.engine.output_lock import OutputDirBusyError, output_dir_lock

REPO = Path(__file__).resolve().parents[1]
DEMO_BASE = REPO / "configs" / "demo" / "Base-Demo-Shapes.yaml"


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    register_shapes_split("test_shapes_train", root / "train", num_images=8, seed=3)
    register_shapes_split("test_shapes_val", root / "val", num_images=4, seed=4)
    return "test_shapes_train", "test_shapes_val"


def tiny_opts(norm, output_dir, splits, max_iter=3):
    """The demo architecture shrunk: R-18 (32-channel stem), 16-channel FPN and heads, 96 px, few RoIs,
    a 4conv1fc box head."""
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


class SeedEachStep(HookBase):
    """Seeds torch's RNG with the iteration before each step (RoI sampling is random)."""

    def before_step(self):
        torch.manual_seed(self.trainer.iter)


def fixed_batch_trainer(train_net, batch):
    """The script's Trainer fed ``batch`` at every iteration, with :class:`SeedEachStep`."""

    class FixedBatchTrainer(train_net.Trainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return itertools.repeat(batch)

        def build_hooks(self):
            return [SeedEachStep()] + super().build_hooks()

    return FixedBatchTrainer


@pytest.mark.parametrize("norm", ["CBN", "MABN"])
def test_resume_continues_exactly_like_the_uninterrupted_run(norm, tiny_splits, tmp_path):
    """Parameters, SGD momentum, LR schedule and norm state after resuming at iteration 3 of 6 equal
    those of the uninterrupted run, bit for bit, given the same batches and RNG seeds."""
    train_net = load_tool("train_net")
    base = ["TEST.EVAL_PERIOD", "0", "D2NORM.PRECISE_BN.ENABLED", "False", "SOLVER.CHECKPOINT_PERIOD", "3",
            "SOLVER.STEPS", "(4,)", "D2NORM.MABN.RENORM_FREE_ITERS", "3"]
    cfg = train_net.setup(parse(["--config-file", str(DEMO_BASE), *tiny_opts(norm, tmp_path / "full", tiny_splits,
                                                                             max_iter=6), *base]))
    batch = next(iter(train_net.Trainer.build_train_loader(cfg)))
    Trainer = fixed_batch_trainer(train_net, batch)
    full = Trainer(cfg)
    full.resume_or_load(resume=False)
    full.train()

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "full" / "model_0000002.pth", resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_0000002.pth")
    resumed = Trainer(_with_output(cfg, resumed_dir))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    resumed.train()

    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    full_opt, resumed_opt = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert full_opt["param_groups"] == resumed_opt["param_groups"]
    for index, state in full_opt["state"].items():
        assert torch.equal(resumed_opt["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert full.scheduler.state_dict() == resumed.scheduler.state_dict()


def test_resume_restores_the_amp_grad_scaler(tiny_splits, tmp_path):
    """AMP trains on GPUs only (detectron2's AMPTrainer asserts CUDA); the scaler's state round-trips."""
    train_net = load_tool("train_net")
    opts = tiny_opts("CBN", tmp_path, tiny_splits) + ["TEST.EVAL_PERIOD", "0", "SOLVER.AMP.ENABLED", "True"]
    cfg = train_net.setup(parse(["--config-file", str(DEMO_BASE), *opts]))
    trainer = train_net.Trainer(cfg)
    trainer._trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**5, growth_interval=7)
    trainer.checkpointer.save("model_0000000")
    resumed = train_net.Trainer(cfg)
    resumed._trainer.grad_scaler = torch.amp.GradScaler("cpu")
    resumed.resume_or_load(resume=True)
    assert resumed._trainer.grad_scaler.state_dict() == trainer._trainer.grad_scaler.state_dict()


def test_a_second_training_into_a_busy_output_dir_is_refused_before_writing(tiny_splits, tmp_path):
    train_net = load_tool("train_net")
    args = parse(["--config-file", str(DEMO_BASE), *tiny_opts("CBN", tmp_path, tiny_splits)])
    with output_dir_lock(str(tmp_path)):  # the first training
        with pytest.raises(OutputDirBusyError, match=f"OUTPUT_DIR {tmp_path} is in use"):
            train_net.main(args)
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "metrics.json").exists()


def test_random_bytes_as_weights_give_an_error_naming_the_file(tiny_splits, tmp_path):
    train_net = load_tool("train_net")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(os.urandom(2048))
    opts = tiny_opts("CBN", tmp_path, tiny_splits) + ["MODEL.WEIGHTS", str(weights)]
    with pytest.raises(CheckpointError, match=f"Cannot read checkpoint file {weights}"):
        train_net.main(parse(["--config-file", str(DEMO_BASE), "--eval-only", *opts]))
    trainer = train_net.Trainer(train_net.setup(parse(["--config-file", str(DEMO_BASE), *opts])))
    with pytest.raises(CheckpointError, match=f"Cannot read checkpoint file {weights}"):
        trainer.resume_or_load(resume=False)


def _with_output(cfg, output_dir):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.freeze()
    return cfg


def train_script(tmp_path):
    """tools/train_net.py behind a script that registers the tiny splits under $DATA_ROOT first.

    Workers are spawned: they re-import this script, which registers the splits and d2norm.
    """
    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys\n"
        "from d2norm.data import register_shapes_split\n"
        "root = os.environ['DATA_ROOT']\n"
        "register_shapes_split('test_shapes_train', os.path.join(root, 'train'), num_images=8, seed=3)\n"
        "register_shapes_split('test_shapes_val', os.path.join(root, 'val'), num_images=4, seed=4)\n"
        f"sys.path.insert(0, {str(REPO / 'tools')!r})\n"
        "import train_net\n"
        "if __name__ == '__main__':\n"
        "    train_net.invoke_main()\n"
    )
    return script


def start_training(script, argv, data_root):
    return subprocess.Popen(
        [sys.executable, str(script), "--config-file", str(DEMO_BASE), *argv], cwd=script.parent,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "DATA_ROOT": str(data_root)},
    )


def test_two_cpu_processes_train_with_gloo(tiny_splits, tmp_path):
    """`--num-gpus 2 --dist-url auto` without GPUs: two gloo processes; CBN resolves in the spawned workers."""
    out = tmp_path / "out"
    opts = tiny_opts("CBN", out, tiny_splits, max_iter=3) + ["TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    proc = start_training(train_script(tmp_path), ["--num-gpus", "2", "--dist-url", "auto", *opts], tmp_path / "data")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-6000:]
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log
    assert "launching 2 CPU processes with the gloo backend" in output  # the launcher's own line
    assert (out / "model_final.pth").exists()


def test_two_machines_with_one_cpu_process_each_train_together(tiny_splits, tmp_path):
    """`--num-machines 2 --machine-rank r --dist-url tcp://127.0.0.1:PORT`, both "machines" on localhost."""
    script, out = train_script(tmp_path), tmp_path / "out"
    url = f"tcp://127.0.0.1:{free_port()}"
    opts = tiny_opts("CBN", out, tiny_splits, max_iter=3) + ["TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    machines = [
        start_training(script, ["--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(rank),
                                "--dist-url", url, *opts], tmp_path / f"data{rank}")
        for rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=600)[0] for proc in machines]
    for proc, output in zip(machines, outputs):
        assert proc.returncode == 0, output[-6000:]
    assert "World size: 2" in (out / "log.txt").read_text()
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()]
    assert iterations[-1] == 2 and (out / "model_final.pth").exists()


def test_eval_only_evaluates_a_trained_precisebn_checkpoint_without_recalibrating(tiny_splits, tmp_path):
    """The saved model carries its recalibrated population statistics: --eval-only just evaluates."""
    train_net = load_tool("train_net")
    opts = tiny_opts("PreciseBN", tmp_path, tiny_splits, max_iter=2) + ["TEST.EVAL_PERIOD", "0"]
    train_net.main(parse(["--config-file", str(DEMO_BASE), *opts]))
    weights = str(tmp_path / "model_final.pth")
    results = train_net.main(parse(["--config-file", str(DEMO_BASE), "--eval-only", *opts, "MODEL.WEIGHTS", weights]))
    assert math.isfinite(results["bbox"]["AP"]) and math.isfinite(results["segm"]["AP"])
