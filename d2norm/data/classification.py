"""Procedural classification images: the ImageNet analogue on which the study's trunk is pretrained.

A class is a pair *(shape, fill pattern)*: the five shapes of the detection set times four fills
(solid, gradient, stripes, checkerboard), 20 classes, so that the trunk must learn outlines and
textures, the two cues the detection scenes are made of. Each image is a textured background of
the detection set's hard style, up to two small solid distractor shapes, and one large shape of
the image's class on top, then pixel noise. Image ``i`` is drawn from
``numpy.random.default_rng([seed, i])``: any worker count or order gives the same images.
"""
import numpy as np

from .appearance import PATTERNS, background, contrasting_colour
from .shapes import ASPECT_RANGES, SHAPE_CATEGORIES, ShapeSpec, rasterize
from .styles import STUDY

__all__ = ["FILL_PATTERNS", "CLASSES", "classification_image"]

FILL_PATTERNS = ("solid", "gradient", "stripes", "checkerboard")
CLASSES = tuple((shape, fill) for shape in SHAPE_CATEGORIES for fill in FILL_PATTERNS)
_FILL_CONTRAST = 90.0  # std of a textured fill's second colour around the first
_MAX_DISTRACTORS = 2


def _shape(rng, category, size, radius_range, centre_range):
    """A shape whose circumradius and centre are the given fractions of the image side."""
    radius = rng.uniform(*radius_range) * size
    x, y = rng.uniform(*centre_range, size=2) * size
    return ShapeSpec(category, (float(x), float(y)), float(radius), float(rng.uniform(0, 2 * np.pi)),
                     float(rng.uniform(*ASPECT_RANGES[category])))


def _fill(rng, size, colour, pattern):
    if pattern == "solid":
        return np.broadcast_to(colour, (size, size, 3))
    second = np.clip(colour + rng.normal(0.0, _FILL_CONTRAST, size=3), 0.0, 255.0).astype(np.float32)
    t = PATTERNS[pattern](rng, size)
    return colour + t[..., None] * (second - colour)


def classification_image(seed: int, index: int, size: int = 64):
    """Image ``index`` of the set drawn with ``seed``: a uint8 (size, size, 3) array (BGR, as the
    detection images) and its class index into :data:`CLASSES`."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))
    category, pattern = CLASSES[label]
    canvas = background(rng, size, STUDY.background_patterns)
    for _ in range(int(rng.integers(_MAX_DISTRACTORS + 1))):
        distractor = _shape(rng, SHAPE_CATEGORIES[rng.integers(len(SHAPE_CATEGORIES))], size, (0.08, 0.18), (0, 1))
        mask, _ = rasterize(distractor, size)
        if mask.any():
            canvas[mask] = contrasting_colour(rng, canvas, mask)
    mask, _ = rasterize(_shape(rng, category, size, (0.28, 0.45), (0.35, 0.65)), size)
    colour = contrasting_colour(rng, canvas, mask)
    canvas[mask] = _fill(rng, size, colour, pattern)[mask]
    canvas += rng.normal(0.0, rng.uniform(*STUDY.noise_std), size=canvas.shape).astype(np.float32)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), label
