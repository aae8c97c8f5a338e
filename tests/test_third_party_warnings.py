"""import d2norm silences the third-party warnings detectron2 v0.6 / fvcore trigger in torch 2.x, and only those."""
import subprocess
import sys


def test_a_training_run_prints_no_third_party_deprecation_warnings(tmp_path):
    """`import d2norm` silences the warnings detectron2 v0.6 / fvcore trigger in torch 2.x on every run."""
    script = (
        "import d2norm, logging\n"
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
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "still shown" in proc.stderr
    for noise in ("torch.jit.script", "meshgrid", "No CUDA runtime"):
        assert noise not in proc.stderr + proc.stdout
