"""One image of the built-in dataset: random layout, occlusion, painting.

Shapes are painted in order, so later shapes cover earlier ones. An instance is annotated with
its *visible* pixels only (inside the image and not covered by a later shape); an instance whose
visible part is less than ``min_visible_fraction`` of its whole shape (border truncation counts)
or smaller than ``min_visible_area`` pixels is dropped.
"""
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .appearance import background, contrasting_colour, instance_fill
from .shapes import ASPECT_RANGES, SHAPE_CATEGORIES, ShapeSpec, area_per_squared_radius, rasterize
from .styles import STUDY, SceneStyle

__all__ = ["VisibleInstance", "sample_layout", "visible_instances", "paint", "random_scene"]

# Sizes, counts, textures and occlusion limits come from a SceneStyle (d2norm.data.styles).
MAX_RADIUS_FRACTION = 0.62  # circumradius cap relative to the image side
BORDER_OVERHANG = 0.25  # at most this fraction of the circumradius may leave the image
MIN_VISIBLE_AREA = 16


@dataclass
class VisibleInstance:
    """An annotated instance: its shape, its visible mask and its whole-shape area."""

    spec: ShapeSpec
    mask: np.ndarray  # bool (H, W): pixels of this instance visible in the image
    full_area: int


def _random_shape(rng, image_size, area_range):
    category = SHAPE_CATEGORIES[rng.integers(len(SHAPE_CATEGORIES))]
    aspect = rng.uniform(*ASPECT_RANGES[category])
    low, high = area_range
    area = np.exp(rng.uniform(np.log(low), np.log(high)))
    radius = min(np.sqrt(area / area_per_squared_radius(category, aspect)), MAX_RADIUS_FRACTION * image_size)
    margin = min((1.0 - BORDER_OVERHANG) * radius, image_size / 2)
    x, y = rng.uniform(margin, image_size - margin, size=2)
    angle = rng.uniform(0.0, 2 * np.pi)
    return ShapeSpec(category, (float(x), float(y)), float(radius), float(angle), float(aspect))


def sample_layout(rng, image_size: int, style: SceneStyle = STUDY) -> list[ShapeSpec]:
    """Shapes of one image in painting order: either one large shape with small shapes on top
    (so that it stays mostly visible), or a mix of small and medium shapes."""
    count = int(rng.integers(1, style.max_shapes + 1))
    if rng.random() < style.large_shape_probability:
        classes = ["large"] + ["small"] * (count - 1)
    else:
        classes = ["small" if rng.random() < style.small_shape_probability else "medium" for _ in range(count)]
    return [_random_shape(rng, image_size, style.size_class_areas[size_class]) for size_class in classes]


def visible_instances(
    specs: Sequence[ShapeSpec],
    image_size: int,
    min_visible_fraction: float = STUDY.min_visible_fraction,
    min_visible_area: int = MIN_VISIBLE_AREA,
) -> tuple[list[np.ndarray], list[VisibleInstance]]:
    """Whole masks of ``specs`` (painting order) and the instances that stay annotated."""
    rendered = [rasterize(spec, image_size) for spec in specs]
    covered = np.zeros((image_size, image_size), dtype=bool)
    kept = []
    for spec, (mask, full_area) in reversed(list(zip(specs, rendered))):
        visible = mask & ~covered
        covered |= mask
        area = int(visible.sum())
        if area >= min_visible_area and area >= min_visible_fraction * full_area:
            kept.append(VisibleInstance(spec, visible, full_area))
    return [mask for mask, _ in rendered], kept[::-1]


def paint(rng, masks: Sequence[np.ndarray], image_size: int, style: SceneStyle = STUDY) -> np.ndarray:
    """A uint8 (H, W, 3) image: textured background, then each mask filled in order, then noise."""
    canvas = background(rng, image_size, style.background_patterns)
    for mask in masks:
        if mask.any():
            colour = contrasting_colour(rng, canvas, mask)
            canvas[mask] = instance_fill(rng, image_size, colour, style.textured_fill_probability)[mask]
    canvas = _camera(rng, canvas, style)
    canvas += rng.normal(0.0, rng.uniform(*style.noise_std), size=canvas.shape).astype(np.float32)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def _camera(rng, canvas, style):
    """Blur, then per-channel gain and offset (:class:`SceneStyle`); draws nothing for the defaults."""
    if style.blur_sigma != (0.0, 0.0):
        canvas = cv2.GaussianBlur(canvas, (0, 0), float(rng.uniform(*style.blur_sigma)))
    if style.channel_gain != (1.0, 1.0) or style.channel_offset != (0.0, 0.0):
        gain = rng.uniform(*style.channel_gain, size=3).astype(np.float32)
        canvas = canvas * gain + rng.uniform(*style.channel_offset, size=3).astype(np.float32)
    return canvas


def random_scene(rng, image_size: int, style: SceneStyle = STUDY) -> tuple[np.ndarray, list[VisibleInstance]]:
    """One image of ``style`` and its annotated instances."""
    specs = sample_layout(rng, image_size, style)
    masks, instances = visible_instances(specs, image_size, style.min_visible_fraction)
    return paint(rng, masks, image_size, style), instances
