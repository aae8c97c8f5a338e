"""What ``import d2norm`` does: the layers need torch only; the norm names and built-in datasets
reach detectron2 whichever is imported first."""
import subprocess
import sys

import pytest

from d2norm._post_import import after_import


def run(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_the_layers_import_and_run_without_detectron2():
    out = run("import sys, torch\n"
              "import d2norm.layers as L\n"
              "m = L.CrossIterationBatchNorm2d(4); m(torch.randn(2, 4, 3, 3))\n"
              "L.MovingAverageBatchNorm2d(4)(torch.randn(2, 4, 3, 3))\n"
              "print(sorted({n.split('.')[0] for n in sys.modules} & {'detectron2', 'fvcore'}))")
    assert out == ["[]"]


@pytest.mark.parametrize("imports", ["import d2norm; import detectron2.modeling",
                                     "import detectron2.modeling; import d2norm",
                                     "import d2norm; import detectron2.data; import detectron2.engine"])
def test_norm_names_and_datasets_reach_detectron2_in_any_import_order(imports):
    out = run(f"{imports}\n"
              "from detectron2.data import DatasetCatalog\n"
              "from detectron2.modeling.backbone import fpn, resnet\n"
              "from detectron2.modeling.roi_heads import mask_head\n"
              "print(*[type(m.get_norm('MABN', 8)).__name__ for m in (fpn, resnet, mask_head)])\n"
              "print('d2norm_shapes_train' in DatasetCatalog.list())")
    assert out == ["MovingAverageBatchNorm2d"] * 3 + ["True"]


def test_after_import_calls_back_once_after_the_module_has_run(tmp_path, monkeypatch):
    (tmp_path / "d2norm_probe_module.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    after_import("d2norm_probe_module", lambda m: seen.append(m.VALUE))
    after_import("d2norm_probe_module", lambda m: seen.append(m.VALUE))  # a second hook waits too
    assert seen == []
    import inspect

    import d2norm_probe_module
    assert seen == [42, 42]
    assert inspect.getsource(d2norm_probe_module) == "VALUE = 42\n"
    assert type(d2norm_probe_module.__loader__).__name__ == "SourceFileLoader"  # the module's own loader
    after_import("d2norm_probe_module", lambda m: seen.append("now"))
    assert seen == [42, 42, "now"]
    monkeypatch.delitem(sys.modules, "d2norm_probe_module")
