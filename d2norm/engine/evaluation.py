"""COCO evaluation that works on the pure-Python detectron2 install as well as on a compiled one."""

__all__ = ["fast_coco_eval_available"]


def fast_coco_eval_available():
    """Whether detectron2's compiled COCO evaluator exists (not in the pure-Python v0.6 install,
    whose ``detectron2._C`` is d2norm's stub: ``tools/install_detectron2.py``)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "IS_D2NORM_STUB", False)
