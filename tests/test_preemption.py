"""Preemption: a SIGTERM to a 2-process training becomes one checkpoint and exit code 75, and
``--resume`` continues from it with every norm layer's state."""
import os
import signal
import subprocess
import sys
import time

import torch
from test_train_net import DEMO_BASE, tiny_opts, tiny_splits, train_script  # noqa: F401  (fixture)

from d2norm.engine.preemption import REQUEUE_EXIT_CODE


def _start(script, argv, data_root):
    return subprocess.Popen(
        [sys.executable, str(script), "--config-file", str(DEMO_BASE), *argv], cwd=script.parent,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "DATA_ROOT": str(data_root)},
    )


def _wait_for(path, text, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        assert proc.poll() is None, proc.communicate()[0][-6000:]
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


def test_sigterm_checkpoints_exits_to_be_requeued_and_resume_continues(tiny_splits, tmp_path):  # noqa: F811
    script, out = train_script(tmp_path), tmp_path / "out"

    def argv(max_iter, *extra):
        return ["--num-gpus", "2", "--dist-url", "auto", *extra,
                *tiny_opts("CBN", out, tiny_splits, max_iter=max_iter),
                "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "100000",
                "D2NORM.PRECISE_BN.ENABLED", "False"]

    proc = _start(script, argv(100000), tmp_path / "data")
    _wait_for(out / "log.txt", "Starting training from iteration 0", proc)
    time.sleep(10)  # some iterations
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM signals every process of the job step
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-6000:]
    assert "Preempted: stopped by SIGTERM after iteration" in output
    name = (out / "last_checkpoint").read_text().strip()
    stopped_at = int(name.removeprefix("model_").removesuffix(".pth"))
    saved = torch.load(out / name, map_location="cpu", weights_only=False)
    assert saved["iteration"] == stopped_at and (stopped_at + 1) % 10 == 0  # at an agreed check
    cbn_counters = [v for k, v in saved["model"].items() if k.endswith("norm.train_iterations")]
    assert cbn_counters and all(int(v) == stopped_at + 1 for v in cbn_counters)

    resumed = _start(script, argv(stopped_at + 3, "--resume"), tmp_path / "data")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-6000:]
    assert f"Starting training from iteration {stopped_at + 1}" in (out / "log.txt").read_text()
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert all(int(v) == stopped_at + 3 for k, v in final.items() if k.endswith("norm.train_iterations"))
