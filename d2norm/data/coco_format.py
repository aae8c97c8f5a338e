"""Visible masks -> COCO instance annotations (polygons, detectron2's default mask format).

Polygons trace the mask at half-pixel resolution, so their vertices lie a quarter pixel inside
the pixel edges; COCO rasterises a polygon by pixel centres, which recovers the mask exactly.
COCO polygons cannot have holes (a later shape lying inside an earlier one), so each hole is
joined to its outer contour by a zero-width cut ("keyhole"), which even-odd filling leaves empty.
``area`` and ``bbox`` are those of the rasterised polygons, i.e. of what ``annToMask`` returns.
"""

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = ["mask_to_polygons", "instance_annotation"]

_UPSAMPLE = 2  # trace contours on a 2x nearest-neighbour upsampled mask
_SIMPLIFY_EPSILON = 0.25  # Douglas-Peucker tolerance in pixels; exact reconstruction up to ~0.4


def _join_hole(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One polygon: ``outer``, a cut to the nearest vertex of ``hole``, around ``hole``, back."""
    distance = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(axis=2)
    i, j = np.unravel_index(np.argmin(distance), distance.shape)
    return np.concatenate([outer[: i + 1], np.roll(hole, -j, axis=0), hole[j: j + 1], outer[i:]])


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` whose union is ``mask`` (bool H x W)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    x0, y0 = xs.min(), ys.min()
    crop = np.pad(mask[y0: ys.max() + 1, x0: xs.max() + 1].astype(np.uint8), 1)
    upsampled = np.kron(crop, np.ones((_UPSAMPLE, _UPSAMPLE), dtype=np.uint8))
    contours, hierarchy = cv2.findContours(upsampled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    contours = [cv2.approxPolyDP(c, _SIMPLIFY_EPSILON * _UPSAMPLE, True).reshape(-1, 2) for c in contours]
    parents = hierarchy[0, :, 3]  # RETR_CCOMP: outer contours have no parent, holes have one
    outers = {k: contours[k] for k in range(len(contours)) if parents[k] < 0}
    for k in range(len(contours)):
        if parents[k] >= 0:
            outers[parents[k]] = _join_hole(outers[parents[k]], contours[k])
    offset = np.array([x0 - 1, y0 - 1], dtype=np.float64)  # undo the crop and its 1-pixel pad
    return [
        ((polygon + 0.5) / _UPSAMPLE + offset).ravel().tolist()
        for polygon in outers.values()
        if len(polygon) >= 3 and cv2.contourArea(polygon) > 0  # degenerate: a line or a point
    ]


def instance_annotation(mask: np.ndarray, category_id: int) -> dict | None:
    """A COCO annotation (without ids) for the visible ``mask``, or None if nothing is left."""
    polygons = mask_to_polygons(mask)
    if not polygons:
        return None
    height, width = mask.shape
    rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    area = int(mask_util.area(rle))
    if area == 0:
        return None
    return {
        "category_id": category_id,
        "segmentation": polygons,
        "area": area,
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "iscrowd": 0,
    }
