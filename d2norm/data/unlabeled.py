"""Unlabeled images as detectron2 inference inputs: a folder of image files or a registered dataset's
images (annotations ignored), resized as at test time."""
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image

__all__ = ["IMAGE_SUFFIXES", "image_files", "unlabeled_image_paths", "unlabeled_batches"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def image_files(entries):
    """Image files of ``entries`` (files, or folders whose image files are taken in name order).

    Raises:
        FileNotFoundError: an entry is neither a file nor a folder.
    """
    paths = []
    for entry in map(Path, entries):
        if entry.is_dir():
            paths += sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif entry.is_file():
            paths.append(entry)
        else:
            raise FileNotFoundError(f"{entry}: no such file or folder")
    return paths


def unlabeled_image_paths(source):
    """The image files of ``source``: a folder of images, or the name of a registered dataset.

    Raises:
        ValueError: ``source`` is neither, or holds no image.
    """
    if Path(source).is_dir():
        paths = image_files([source])
        if not paths:
            raise ValueError(f"{source}: the folder has no image file ({', '.join(IMAGE_SUFFIXES)})")
        return paths
    if source in DatasetCatalog:
        paths = [Path(record["file_name"]) for record in DatasetCatalog.get(source)]
        if not paths:
            raise ValueError(f"dataset {source!r} has no image")
        return paths
    raise ValueError(f"{source!r} is neither a folder of images nor a registered dataset; "
                     f"registered datasets: {', '.join(sorted(DatasetCatalog.list()))}")


def unlabeled_batches(paths, batch_size, image_format="BGR", min_size=800, max_size=1333):
    """Batches of ``batch_size`` images (the last one may be smaller) as detectron2 inference inputs:
    ``[{"image": (C, H, W) float tensor, "height", "width", "file_name"}, ...]``, each image resized
    like ``INPUT.MIN_SIZE_TEST`` / ``INPUT.MAX_SIZE_TEST`` (``min_size`` 0: not resized)."""
    resize = T.ResizeShortestEdge([min_size, min_size], max_size) if min_size else None
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            image = read_image(str(path), format=image_format)
            resized = resize.get_transform(image).apply_image(image) if resize else image
            batch.append({"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)),
                          "height": image.shape[0], "width": image.shape[1], "file_name": str(path)})
        yield batch
