"""The README's Python snippets run as written (from the repository root), in order, in one namespace."""
import re
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog

from d2norm import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from d2norm.data import register_shapes_demo_dataset

REPO = Path(__file__).resolve().parents[1]


def python_snippets():
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


@pytest.fixture
def small_demo_splits(tmp_path):
    """The demo splits the snippets' config names, made small (the snippets do not depend on their size)."""
    register_shapes_demo_dataset(tmp_path, train_images=4, val_images=2)
    yield
    register_shapes_demo_dataset()


def test_readme_python_snippets_run_as_written(small_demo_splits, monkeypatch):
    snippets = python_snippets()
    assert snippets, "the README has no python snippet"
    monkeypatch.chdir(REPO)
    namespace = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)
    assert len(DatasetCatalog.get("d2norm_shapes_demo_train")) == 4  # the small splits were used
    cfg = namespace["cfg"]
    windows = {m.window for m in namespace["same_layers"].modules() if isinstance(m, CrossIterationBatchNorm2d)}
    assert windows == {cfg.D2NORM.CBN.WINDOW} != {8}  # cfg.D2NORM reached the custom builder's layers
    assert not any(isinstance(m, CrossIterationBatchNorm2d) for m in namespace["model"].modules())  # folded
    lazy_norms = list(namespace["lazy_model"].modules())  # the LazyConfig snippet's settings reached the layers
    assert any(isinstance(m, MovingAverageBatchNorm2d) for m in lazy_norms)
    assert {m.window for m in lazy_norms if isinstance(m, CrossIterationBatchNorm2d)} == {4}
