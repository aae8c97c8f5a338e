"""Built-in dataset: procedurally generated shapes for instance segmentation, no download needed.

Importing this package registers the COCO-format splits ``d2norm_shapes_train`` (512 images) and
``d2norm_shapes_val`` (100 images) of 128-pixel images under :func:`default_shapes_root`; the
files are generated on first use and regenerated when the cache is corrupt.
"""
from .catalog import (
    SHAPES_TRAIN,
    SHAPES_VAL,
    default_shapes_root,
    register_shapes_dataset,
    register_shapes_split,
)
from .shapes import SHAPE_CATEGORIES
from .splits import ensure_shapes_split, generate_shapes_split

__all__ = [
    "SHAPES_TRAIN",
    "SHAPES_VAL",
    "SHAPE_CATEGORIES",
    "default_shapes_root",
    "ensure_shapes_split",
    "generate_shapes_split",
    "register_shapes_dataset",
    "register_shapes_split",
]

register_shapes_dataset()
