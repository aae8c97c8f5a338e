"""Shape categories of the built-in dataset and their rasterisation.

Every shape is a unit outline (vertices on or inside the unit circle) squashed along its own
y axis by ``aspect``, rotated by ``angle`` and scaled by its circumradius ``radius``. Shapes are
drawn without anti-aliasing, so a shape's mask is exactly the set of pixels it paints.
"""
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "SHAPE_CATEGORIES", "ASPECT_RANGES", "ShapeSpec", "area_per_squared_radius", "outline", "rasterize",
]

SHAPE_CATEGORIES = ("circle", "ellipse", "square", "triangle", "star")
# (min, max) minor/major axis ratio per category: circles stay round, ellipses are clearly elongated.
ASPECT_RANGES = {
    "circle": (1.0, 1.0),
    "ellipse": (0.35, 0.6),
    "square": (1.0, 1.0),
    "triangle": (0.75, 1.0),
    "star": (0.8, 1.0),
}
_CIRCLE_VERTICES = 96
_STAR_INNER_RADIUS = 0.45
_SUBPIXEL_BITS = 4  # cv2.fillPoly ``shift``: vertices at 1/16 pixel precision


def _unit_outline(category: str) -> np.ndarray:
    if category in ("circle", "ellipse"):
        angles = np.arange(_CIRCLE_VERTICES) * (2 * np.pi / _CIRCLE_VERTICES)
        radii = np.ones_like(angles)
    elif category == "square":
        angles = np.pi / 4 + np.arange(4) * (np.pi / 2)
        radii = np.ones_like(angles)
    elif category == "triangle":
        angles = np.pi / 2 + np.arange(3) * (2 * np.pi / 3)
        radii = np.ones_like(angles)
    elif category == "star":
        angles = np.pi / 2 + np.arange(10) * (np.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER_RADIUS)
    else:
        raise ValueError(f"unknown shape category {category!r}; known: {', '.join(SHAPE_CATEGORIES)}")
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


@dataclass(frozen=True)
class ShapeSpec:
    """One shape instance: geometry only (appearance is chosen when the scene is painted)."""

    category: str
    center: tuple[float, float]  # (x, y) in pixels, continuous coordinates (pixel i spans [i, i+1])
    radius: float  # circumradius in pixels
    angle: float = 0.0  # rotation in radians
    aspect: float = 1.0  # y-axis squash of the unit outline, see ASPECT_RANGES


def area_per_squared_radius(category: str, aspect: float = 1.0) -> float:
    """Area of the shape with circumradius 1 (shoelace formula on its outline)."""
    x, y = _unit_outline(category).T
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) * aspect


def outline(spec: ShapeSpec) -> np.ndarray:
    """The shape's polygon, an (N, 2) array of (x, y) vertices in pixels."""
    unit = _unit_outline(spec.category) * np.array([1.0, spec.aspect])
    cos, sin = np.cos(spec.angle), np.sin(spec.angle)
    rotated = unit @ np.array([[cos, sin], [-sin, cos]])
    return rotated * spec.radius + np.asarray(spec.center, dtype=np.float64)


def rasterize(spec: ShapeSpec, image_size: int) -> tuple[np.ndarray, int]:
    """The shape's mask inside the ``image_size`` square image, and its area in pixels when the
    image border does not cut it (the shape is drawn on a canvas large enough to hold all of it)."""
    vertices = outline(spec) - 0.5  # fillPoly places integer coordinates at pixel centres
    low = np.minimum(np.floor(vertices.min(axis=0)).astype(int), 0)
    high = np.maximum(np.ceil(vertices.max(axis=0)).astype(int) + 1, image_size)
    canvas = np.zeros((high[1] - low[1], high[0] - low[0]), dtype=np.uint8)
    points = np.round((vertices - low) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(canvas, [points], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    inside = canvas[-low[1]: image_size - low[1], -low[0]: image_size - low[0]]
    return inside.astype(bool), int(canvas.sum(dtype=np.int64))
