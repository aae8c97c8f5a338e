"""Difficulty presets of the built-in dataset: which sizes, how many shapes, which textures.

``STUDY`` is the hard default of ``d2norm_shapes_train/val`` (all three COCO size ranges, up to six
shapes, textured backgrounds and fills, heavy occlusion): small-batch normalization is studied on
it. ``DEMO`` is the easy preset of ``d2norm_shapes_demo_train/val``, on which the from-scratch
demo detector learns faster: one to four shapes of 16²-64² pixels (none tiny, none large), less
occluded, with solid fills on smooth backgrounds and less pixel noise. ``SHIFTED`` is ``STUDY``'s
scenes (the same shapes, sizes and layouts) seen through another camera: washed-out, colour-cast,
blurred and noisier images, the target domain of ``d2norm_shapes_shifted_*`` for recalibrating
population statistics without labels ("Rethinking 'Batch' in BatchNorm", Sec. 5.1).
"""
from dataclasses import dataclass, field

__all__ = ["SceneStyle", "STUDY", "DEMO", "SHIFTED"]


@dataclass(frozen=True)
class SceneStyle:
    """Parameters of :func:`d2norm.data.scene.random_scene`."""

    name: str
    # Whole-shape areas (pixels) per size class, drawn log-uniformly within the range.
    size_class_areas: dict[str, tuple[float, float]] = field(default_factory=dict)
    large_shape_probability: float = 0.0  # chance that an image starts with one large shape
    small_shape_probability: float = 0.0  # otherwise, each shape is small with this chance, else medium
    max_shapes: int = 6
    min_visible_fraction: float = 0.5  # an instance less visible than this is dropped
    background_patterns: tuple[str, ...] = ("gradient",)  # names in d2norm.data.appearance.PATTERNS
    textured_fill_probability: float = 0.0  # else the fill is one solid colour
    noise_std: tuple[float, float] = (2.0, 8.0)  # range of the per-image Gaussian pixel noise
    # Camera of the finished image, drawn per image (the defaults change nothing and draw nothing):
    # pixel' = gain[c] * blur(pixel) + offset[c], gain and offset per channel from these ranges.
    blur_sigma: tuple[float, float] = (0.0, 0.0)  # Gaussian blur, pixels
    channel_gain: tuple[float, float] = (1.0, 1.0)
    channel_offset: tuple[float, float] = (0.0, 0.0)


# The class limits are COCO's absolute small/medium/large thresholds (32², 96²) so that AP_s, AP_m
# and AP_l are all populated; large shapes are capped by the image (scene.MAX_RADIUS_FRACTION).
STUDY = SceneStyle(
    name="study",
    size_class_areas={"small": (40.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (110.0**2, 160.0**2)},
    large_shape_probability=0.25,
    small_shape_probability=0.5,
    max_shapes=6,
    min_visible_fraction=0.5,
    background_patterns=("gradient", "stripes", "checkerboard", "smooth_noise"),
    textured_fill_probability=0.5,
    noise_std=(2.0, 8.0),
)

DEMO = SceneStyle(
    name="demo",
    size_class_areas={"small": (16.0**2, 32.0**2), "medium": (32.0**2, 64.0**2)},
    large_shape_probability=0.0,
    small_shape_probability=0.3,
    max_shapes=4,
    min_visible_fraction=0.7,
    background_patterns=("gradient", "smooth_noise"),
    textured_fill_probability=0.0,
    noise_std=(1.0, 4.0),
)

SHIFTED = SceneStyle(
    name="shifted",
    size_class_areas=STUDY.size_class_areas,
    large_shape_probability=STUDY.large_shape_probability,
    small_shape_probability=STUDY.small_shape_probability,
    max_shapes=STUDY.max_shapes,
    min_visible_fraction=STUDY.min_visible_fraction,
    background_patterns=STUDY.background_patterns,
    textured_fill_probability=STUDY.textured_fill_probability,
    noise_std=(8.0, 16.0),
    blur_sigma=(0.6, 1.2),
    channel_gain=(0.35, 0.7),
    channel_offset=(40.0, 110.0),
)
