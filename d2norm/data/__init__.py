"""Built-in dataset: procedurally generated shapes for instance segmentation, no download needed.

Importing this package registers the COCO-format splits ``d2norm_shapes_train`` (512 images),
``d2norm_shapes_val`` (100 images) and ``d2norm_shapes_val500`` (500 other images) of 128-pixel
images under :func:`default_shapes_root`, and the easier splits of the demo,
``d2norm_shapes_demo_train`` (1000 images) and ``d2norm_shapes_demo_val`` (100 images), and the
shifted target domain of the study data, ``d2norm_shapes_shifted_train`` (256 images) and
``d2norm_shapes_shifted_val`` (500); the files are generated on first use and regenerated when the
cache is corrupt.
"""
from .catalog import (
    SHAPES_DEMO_TRAIN,
    SHAPES_DEMO_VAL,
    SHAPES_SHIFTED_TRAIN,
    SHAPES_SHIFTED_VAL,
    SHAPES_TRAIN,
    SHAPES_VAL,
    SHAPES_VAL500,
    default_shapes_root,
    register_shapes_dataset,
    register_shapes_demo_dataset,
    register_shapes_shifted_dataset,
    register_shapes_split,
)
from .shapes import SHAPE_CATEGORIES
from .splits import ensure_shapes_split, generate_shapes_split
from .styles import DEMO, SHIFTED, STUDY, SceneStyle

__all__ = [
    "DEMO",
    "SHIFTED",
    "SHAPES_DEMO_TRAIN",
    "SHAPES_DEMO_VAL",
    "SHAPES_SHIFTED_TRAIN",
    "SHAPES_SHIFTED_VAL",
    "SHAPES_TRAIN",
    "SHAPES_VAL",
    "SHAPES_VAL500",
    "SHAPE_CATEGORIES",
    "STUDY",
    "SceneStyle",
    "default_shapes_root",
    "ensure_shapes_split",
    "generate_shapes_split",
    "register_shapes_dataset",
    "register_shapes_demo_dataset",
    "register_shapes_shifted_dataset",
    "register_shapes_split",
]

register_shapes_dataset()
register_shapes_demo_dataset()
register_shapes_shifted_dataset()
