"""tools/install_detectron2.py: never replaces an existing detectron2; compiled ops fail clearly."""
import os
import subprocess
import sys
import types
from pathlib import Path

import detectron2
import pytest
from tool_scripts import load_tool

REPO = Path(__file__).resolve().parents[1]


def stub_module():
    module = types.ModuleType("detectron2_C_stub")
    exec(load_tool("install_detectron2").C_STUB, module.__dict__)
    return module


def test_an_importable_detectron2_is_left_alone(tmp_path):
    init = Path(detectron2.__file__)
    before = init.stat().st_mtime_ns
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "install_detectron2.py"),
                           "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "leaving it alone" in proc.stdout
    assert init.stat().st_mtime_ns == before
    assert not os.listdir(tmp_path)  # nothing downloaded


def test_a_compiled_op_raises_import_error_naming_the_op():
    stub = stub_module()
    with pytest.raises(ImportError, match="box_iou_rotated"):
        stub.box_iou_rotated(None, None)
    with pytest.raises(ImportError, match="COCOevalAccumulate"):
        stub.COCOevalAccumulate({}, [])


def test_the_stub_imports_and_answers_environment_queries():
    """v0.6 imports _C at module top and collect_env (default_setup) asks for versions."""
    stub = stub_module()
    assert stub.IS_D2NORM_STUB is True
    assert "not built" in stub.get_compiler_version() and stub.has_cuda() is False
    assert getattr(stub, "__path__", None) is None  # dunder probes behave like a normal module


def test_the_sdist_is_pinned_by_hash():
    installer = load_tool("install_detectron2")
    assert installer.SDIST_URL.endswith("pb1-detectron2-0.6.tar.gz")
    assert len(installer.SDIST_SHA256) == 64
