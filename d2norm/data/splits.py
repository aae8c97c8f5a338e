"""A split of the built-in dataset on disk: PNG images, a COCO json and a manifest.

Layout of a split directory::

    <split_dir>/images/000000.png ...
    <split_dir>/instances.json       COCO instances, polygon masks
    <split_dir>/manifest.json        generation parameters + sha256 of every file above

Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so the same parameters give
byte-identical files. :func:`ensure_shapes_split` regenerates a split whose manifest is missing,
whose parameters differ or whose files do not match their recorded digests (a truncated image,
an edited json); it holds a file lock so that concurrent processes generate it once.
"""
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from iopath.common.file_io import file_lock

from .coco_format import instance_annotation
from .scene import random_scene
from .shapes import SHAPE_CATEGORIES
from .styles import STUDY, SceneStyle

__all__ = ["GENERATOR_VERSION", "SplitFiles", "split_files", "generate_shapes_split", "ensure_shapes_split"]

GENERATOR_VERSION = 1  # bump whenever the drawing or annotation code changes its output
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitFiles:
    """Where a split's COCO json and images live (what ``load_coco_json`` needs)."""

    json_file: Path
    image_root: Path
    manifest: Path


def split_files(split_dir) -> SplitFiles:
    split_dir = Path(split_dir)
    return SplitFiles(split_dir / "instances.json", split_dir / "images", split_dir / "manifest.json")


def _params(num_images, seed, image_size, style):
    params = {"version": GENERATOR_VERSION, "num_images": num_images, "seed": seed, "image_size": image_size}
    if style != STUDY:  # study splits keep the manifest (and json) they had before styles existed
        params["style"] = style.name
    return params


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def generate_shapes_split(
    split_dir, num_images: int, seed: int = 0, image_size: int = 128, style: SceneStyle = STUDY
) -> SplitFiles:
    """Draw ``num_images`` images of ``image_size`` pixels and ``style`` into ``split_dir`` (replacing its content)."""
    num_images, seed, image_size = int(num_images), int(seed), int(image_size)
    files = split_files(split_dir)
    files.manifest.unlink(missing_ok=True)
    shutil.rmtree(files.image_root, ignore_errors=True)
    files.image_root.mkdir(parents=True)
    digests, images, annotations = {}, [], []
    for index in range(num_images):
        image, instances = random_scene(np.random.default_rng([seed, index]), image_size, style)
        file_name = f"{index:06d}.png"
        encoded = cv2.imencode(".png", image)[1].tobytes()
        (files.image_root / file_name).write_bytes(encoded)
        digests[f"images/{file_name}"] = _sha256(encoded)
        images.append({"id": index + 1, "file_name": file_name, "width": image_size, "height": image_size})
        for instance in instances:
            category_id = SHAPE_CATEGORIES.index(instance.spec.category) + 1
            annotation = instance_annotation(instance.mask, category_id)
            if annotation is not None:
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **annotation})
    params = _params(num_images, seed, image_size, style)
    coco = {
        "info": {"description": "d2norm built-in shapes dataset", **params},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CATEGORIES)
        ],
    }
    encoded = json.dumps(coco, separators=(",", ":")).encode()
    _write_atomically(files.json_file, encoded)
    digests[files.json_file.name] = _sha256(encoded)
    manifest = {"params": params, "sha256": digests}
    _write_atomically(files.manifest, json.dumps(manifest, indent=1, sort_keys=True).encode())
    logger.info("Generated %d shapes images (%d instances) in %s", num_images, len(annotations), split_dir)
    return files


def _cache_problem(split_dir, params):
    """Why the split on disk cannot be used for ``params``, or None if it can."""
    files = split_files(split_dir)
    try:
        manifest = json.loads(files.manifest.read_bytes())
        recorded_params, digests = manifest["params"], dict(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest"
    if recorded_params != params:
        return f"parameters changed: {recorded_params} -> {params}"
    for relative, digest in digests.items():
        path = Path(split_dir) / relative
        if not path.is_file():
            return f"{path} is missing"
        if _sha256(path.read_bytes()) != digest:
            return f"{path} does not match its manifest digest"
    return None


def ensure_shapes_split(
    split_dir, num_images: int, seed: int = 0, image_size: int = 128, style: SceneStyle = STUDY
) -> SplitFiles:
    """The split in ``split_dir``, generated first if missing, corrupt or made with other parameters."""
    with file_lock(str(Path(split_dir))):
        problem = _cache_problem(split_dir, _params(int(num_images), int(seed), int(image_size), style))
        if problem is None:
            return split_files(split_dir)
        first_use = not split_files(split_dir).manifest.exists()
        level = logging.INFO if first_use else logging.WARNING
        logger.log(level, "Generating shapes split %s: %s", split_dir, problem)
        return generate_shapes_split(split_dir, num_images, seed=seed, image_size=image_size, style=style)
