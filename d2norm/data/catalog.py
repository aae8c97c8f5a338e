"""Registration of the built-in dataset in detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

Registering touches no file: a split is generated (or validated, see
:func:`~d2norm.data.splits.ensure_shapes_split`) each time ``DatasetCatalog.get(name)`` runs,
which ``build_detection_{train,test}_loader`` do before the evaluator reads ``json_file``.
"""
import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import SHAPE_CATEGORIES
from .splits import ensure_shapes_split, split_files
from .styles import DEMO, SHIFTED, STUDY, SceneStyle

__all__ = [
    "SHAPES_TRAIN", "SHAPES_VAL", "SHAPES_VAL500", "SHAPES_DEMO_TRAIN", "SHAPES_DEMO_VAL", "default_shapes_root",
    "SHAPES_SHIFTED_TRAIN", "SHAPES_SHIFTED_VAL", "register_shapes_split", "register_shapes_dataset",
    "register_shapes_demo_dataset", "register_shapes_shifted_dataset",
]

SHAPES_TRAIN = "d2norm_shapes_train"
SHAPES_VAL = "d2norm_shapes_val"
SHAPES_VAL500 = "d2norm_shapes_val500"
SHAPES_DEMO_TRAIN = "d2norm_shapes_demo_train"
SHAPES_DEMO_VAL = "d2norm_shapes_demo_val"
SHAPES_SHIFTED_TRAIN = "d2norm_shapes_shifted_train"
SHAPES_SHIFTED_VAL = "d2norm_shapes_shifted_val"
_CHECKOUT = Path(__file__).resolve().parents[2]


def default_shapes_root() -> Path:
    """``$D2NORM_DATASETS/d2norm_shapes`` if that variable is set, else ``datasets/d2norm_shapes``
    under the repository root (under the working directory when d2norm is not run from a checkout)."""
    if os.environ.get("D2NORM_DATASETS"):
        return Path(os.environ["D2NORM_DATASETS"]) / "d2norm_shapes"
    base = _CHECKOUT if (_CHECKOUT / "setup.py").is_file() else Path.cwd()
    return base / "datasets" / "d2norm_shapes"


def register_shapes_split(
    name: str, split_dir, num_images: int, seed: int = 0, image_size: int = 128, style: SceneStyle = STUDY
) -> None:
    """Register ``name`` as a COCO-format split of ``num_images`` generated images of ``style`` in ``split_dir``.

    Registering a name again replaces its previous registration.
    """
    split_dir = Path(split_dir)
    files = split_files(split_dir)

    def load():
        ensure_shapes_split(split_dir, num_images, seed=seed, image_size=image_size, style=style)
        return load_coco_json(str(files.json_file), str(files.image_root), name)

    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    if name in MetadataCatalog:
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=str(files.json_file),
        image_root=str(files.image_root),
        evaluator_type="coco",
        thing_classes=list(SHAPE_CATEGORIES),
    )


def register_shapes_dataset(
    root=None,
    train_images: int = 512,
    val_images: int = 100,
    image_size: int = 128,
    train_seed: int = 0,
    val_seed: int = 1,
    val500_seed: int = 4,
) -> None:
    """Register ``d2norm_shapes_train``, ``d2norm_shapes_val`` and ``d2norm_shapes_val500`` under
    ``root`` (default :func:`default_shapes_root`), in its ``train/``, ``val/`` and ``val500/`` folders.

    ``d2norm_shapes_val500`` is a second, independent validation split of 500 images: five times the
    objects of ``d2norm_shapes_val``, so that a comparison of two variants is less dominated by which
    images happen to be evaluated.
    """
    root = Path(root) if root is not None else default_shapes_root()
    register_shapes_split(SHAPES_TRAIN, root / "train", train_images, seed=train_seed, image_size=image_size)
    register_shapes_split(SHAPES_VAL, root / "val", val_images, seed=val_seed, image_size=image_size)
    register_shapes_split(SHAPES_VAL500, root / "val500", 500, seed=val500_seed, image_size=image_size)


def register_shapes_demo_dataset(root=None, train_images: int = 1000, val_images: int = 100) -> None:
    """Register the easy splits of the demo, ``d2norm_shapes_demo_train`` and ``d2norm_shapes_demo_val``
    (:data:`~d2norm.data.styles.DEMO`), under ``root`` in its ``demo_train/`` and ``demo_val/`` folders."""
    root = Path(root) if root is not None else default_shapes_root()
    register_shapes_split(SHAPES_DEMO_TRAIN, root / "demo_train", train_images, seed=2, style=DEMO)
    register_shapes_split(SHAPES_DEMO_VAL, root / "demo_val", val_images, seed=3, style=DEMO)


def register_shapes_shifted_dataset(root=None, train_images: int = 256, val_images: int = 500) -> None:
    """Register the target domain of the built-in data, :data:`~d2norm.data.styles.SHIFTED` (the
    study scenes through another camera), under ``root`` in its ``shifted_train/`` and
    ``shifted_val/`` folders: ``d2norm_shapes_shifted_train``, whose images stand in for unlabeled
    target-domain images when recalibrating, and ``d2norm_shapes_shifted_val`` to evaluate on."""
    root = Path(root) if root is not None else default_shapes_root()
    register_shapes_split(SHAPES_SHIFTED_TRAIN, root / "shifted_train", train_images, seed=6, style=SHIFTED)
    register_shapes_split(SHAPES_SHIFTED_VAL, root / "shifted_val", val_images, seed=7, style=SHIFTED)
