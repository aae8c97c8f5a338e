"""The third-party warnings detectron2 v0.6 / fvcore trigger in torch 2.x are silenced by d2norm's
entry points, and only those; the library itself installs no process-wide filter."""
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run(script, cwd):
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_importing_d2norm_installs_no_warning_or_log_filter(tmp_path):
    proc = run("import logging, warnings\n"
               "import detectron2.modeling, detectron2.data\n"
               "before = list(warnings.filters)\n"
               "import d2norm, d2norm.modeling, d2norm.data\n"  # registration runs here
               "print(warnings.filters == before, logging.getLogger('torch.utils.cpp_extension').filters)\n",
               tmp_path)
    assert proc.stdout.split() == ["True", "[]"]


def test_a_training_process_silences_exactly_the_third_party_deprecation_warnings(tmp_path):
    script = (
        "from d2norm.engine.third_party_warnings import silence_third_party_warnings\n"
        "silence_third_party_warnings()\n"
        "from detectron2.modeling import anchor_generator\n"
        "from detectron2.utils.collect_env import collect_env_info\n"
        "collect_env_info()\n"
        "from detectron2.config import get_cfg\n"
        "import torch\n"
        "cfg = get_cfg()\n"
        "generator = anchor_generator.build_anchor_generator(cfg, [anchor_generator.ShapeSpec(stride=4)])\n"
        "generator([torch.zeros(1, 1, 4, 4)])\n"
        "import warnings; warnings.warn('still shown', UserWarning)\n"
    )
    proc = run(script, tmp_path)
    assert "still shown" in proc.stderr
    for noise in ("torch.jit.script", "meshgrid", "No CUDA runtime"):
        assert noise not in proc.stderr + proc.stdout


@pytest.mark.parametrize("tool", ["train_net.py", "lazyconfig_train_net.py", "predict.py"])
def test_entry_points_silence_before_importing_detectron2(tool):
    lines = (TOOLS / tool).read_text().splitlines()
    silenced = next(i for i, line in enumerate(lines) if line.startswith("silence_third_party_warnings()"))
    first_detectron2 = next(i for i, line in enumerate(lines)
                            if line.startswith(("from detectron2", "import detectron2")))
    assert silenced < first_detectron2
