"""Colours and textures of the built-in dataset: textured backgrounds and per-instance fills.

Every texture blends two colours with a pattern field ``t`` in [0, 1] (gradient, stripes,
checkerboard or smooth noise), so backgrounds and instances share one small vocabulary.
"""
import cv2
import numpy as np

__all__ = ["PATTERNS", "background", "instance_fill", "contrasting_colour"]

_COLOUR_CANDIDATES = 8  # random colours tried per instance; the most contrasting one wins
_FILL_VARIATION = 40.0  # std of the second colour of a textured fill around the first


def _rotated_coordinates(rng, size):
    """Pixel coordinates (u, v) in a frame rotated by a random angle."""
    angle = rng.uniform(0, np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x * cos + y * sin, y * cos - x * sin


def _gradient(rng, size):
    u, _ = _rotated_coordinates(rng, size)
    return (u - u.min()) / max(float(u.max() - u.min()), 1.0)


def _stripes(rng, size):
    period = rng.uniform(4.0, 16.0)
    u, _ = _rotated_coordinates(rng, size)
    return ((u / period) % 1.0 < 0.5).astype(np.float32)


def _checkerboard(rng, size):
    cell = rng.uniform(5.0, 20.0)
    u, v = _rotated_coordinates(rng, size)
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)


def _smooth_noise(rng, size):
    grid = rng.random((int(rng.integers(3, 9)),) * 2).astype(np.float32)
    return np.clip(cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


PATTERNS = {"gradient": _gradient, "stripes": _stripes, "checkerboard": _checkerboard, "smooth_noise": _smooth_noise}
_FILL_PATTERNS = (_gradient, _stripes)


def _blend(t, colour0, colour1):
    return colour0 + t[..., None] * (colour1 - colour0)


def _random_colour(rng):
    return rng.uniform(0.0, 255.0, size=3).astype(np.float32)


def background(rng, size, patterns):
    """A float32 (size, size, 3) background in [0, 255], textured by one of ``patterns`` (names)."""
    pattern = PATTERNS[patterns[rng.integers(len(patterns))]]
    return _blend(pattern(rng, size), _random_colour(rng), _random_colour(rng))


def contrasting_colour(rng, canvas, mask):
    """Of a few random colours, the one farthest on average from the canvas pixels under ``mask``."""
    candidates = rng.uniform(0.0, 255.0, size=(_COLOUR_CANDIDATES, 3)).astype(np.float32)
    under = canvas[mask]
    distance = np.linalg.norm(under[None, :, :] - candidates[:, None, :], axis=2).mean(axis=1)
    return candidates[int(np.argmax(distance))]


def instance_fill(rng, size, colour, textured_probability):
    """A float32 (size, size, 3) fill around ``colour``: textured with ``textured_probability``, else solid."""
    if rng.random() < 1.0 - textured_probability:
        return np.broadcast_to(colour, (size, size, 3))
    pattern = _FILL_PATTERNS[rng.integers(len(_FILL_PATTERNS))]
    second = np.clip(colour + rng.normal(0.0, _FILL_VARIATION, size=3), 0.0, 255.0).astype(np.float32)
    return _blend(pattern(rng, size), colour, second)
