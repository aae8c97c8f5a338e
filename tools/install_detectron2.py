#!/usr/bin/env python3
"""Install detectron2 v0.6 (pure-Python sources) into the running interpreter.

Detectron2 has no official PyPI release. ``pb1-detectron2==0.6`` is the official v0.6 sdist's
Python sources without ``detectron2/layers/csrc``, so its own build fails. This script:

1. leaves any importable detectron2 alone (e.g. built from source on a GPU cluster);
2. downloads the sdist from PyPI (pinned URL + sha256; cached under ``--cache-dir``);
3. stages ``detectron2/`` with a ``detectron2/_C.py`` whose attributes raise ``ImportError``
   naming the compiled op (deformable conv, rotated boxes, fast COCO eval), so that v0.6's
   top-level ``from detectron2 import _C`` imports succeed;
4. ``pip install``s the staged package as distribution ``detectron2==0.6`` (no dependencies:
   ``requirements/cpu.txt`` pins those).
"""
import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/"
    "48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz"
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

C_STUB = '''"""Stand-in for detectron2's compiled extension (not built in this install).

Importing it succeeds so that detectron2 v0.6 imports; using any compiled op raises ImportError.
Installed by d2norm's tools/install_detectron2.py.
"""

IS_D2NORM_STUB = True


# Queried by detectron2.utils.collect_env (run by default_setup): answer instead of failing.
def get_compiler_version():
    return "not built (pure-Python detectron2 install by d2norm)"


def get_cuda_version():
    return "not built"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _CompiledOp(name)


class _CompiledOp:
    """Any compiled op: looking it up succeeds, using it raises ImportError naming it."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise ImportError(
            f"detectron2._C.{self.name} is a compiled op, and this detectron2 was installed "
            "without its C++/CUDA extension (d2norm's pure-Python install). Deformable "
            "convolution, rotated boxes and the fast COCO evaluator are unavailable; build "
            "detectron2 from source to use them."
        )

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _CompiledOp(f"{self.name}.{attr}")
'''

SETUP_PY = '''from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="0.6",
    description="detectron2 v0.6 Python sources (no compiled ops), staged by d2norm",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    python_requires=">=3.6",
)
'''


def _download(cache_dir):
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, os.path.basename(SDIST_URL))
    if not (os.path.exists(path) and _sha256(path) == SDIST_SHA256):
        print(f"[install_detectron2] downloading {SDIST_URL}", flush=True)
        tmp = path + ".part"
        with urllib.request.urlopen(SDIST_URL, timeout=300) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f)
        digest = _sha256(tmp)
        if digest != SDIST_SHA256:
            os.remove(tmp)
            raise SystemExit(f"sha256 mismatch for {SDIST_URL}: got {digest}, want {SDIST_SHA256}")
        os.replace(tmp, path)
    return path


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stage(sdist, stage_dir):
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["detectron2"]]
        tar.extractall(stage_dir, members=members, filter="data")
    (top,) = os.listdir(stage_dir)
    src = os.path.join(stage_dir, top)
    with open(os.path.join(src, "detectron2", "_C.py"), "w") as f:
        f.write(C_STUB)
    with open(os.path.join(src, "setup.py"), "w") as f:
        f.write(SETUP_PY)
    return src


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/d2norm"))
    args = parser.parse_args()

    spec = importlib.util.find_spec("detectron2")
    if spec is not None:
        print(f"[install_detectron2] detectron2 already importable at {spec.origin}; leaving it alone")
        return
    sdist = _download(args.cache_dir)
    with tempfile.TemporaryDirectory() as stage_dir:
        src = _stage(sdist, stage_dir)
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", src]
        )
    print("[install_detectron2] installed detectron2 0.6 (pure Python; compiled ops raise ImportError)")


if __name__ == "__main__":
    main()
