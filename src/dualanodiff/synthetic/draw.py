"""The drawing primitives every scene and defect is made of: coordinates, smooth noise, soft coverage,
curves and blobs, shading and lighting, sensor noise, and the `_Scene` they fill in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class _Scene:
    """A noiseless render plus what a defect needs to know about it (all float in [0, 1])."""

    base: np.ndarray  # HxWx3, the normal image before noise
    background: np.ndarray  # HxWx3, what shows where the object (or the fabric) is missing
    foreground: np.ndarray  # HxW alpha of the object; all ones for textures
    noise: np.ndarray  # HxWx3 sensor noise, identical for the clean and the defective render
    axis: tuple[float, float] = (1.0, 0.0)  # texture: unit vector along the weft threads
    framed: bool = False  # defects keep their distance from the image border (the world's textures)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise blurred by `sigma` pixels (periodic), HxW float32."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance in pixels (negative inside)."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _segment_distance(yy, xx, points: np.ndarray) -> np.ndarray:
    """Distance in pixels from every pixel to a polyline given as K x 2 (y, x) points."""
    best = np.full(yy.shape, np.inf, dtype=np.float32)
    for (ay, ax), (by, bx) in zip(points[:-1], points[1:]):
        dy, dx = by - ay, bx - ax
        length2 = max(dy * dy + dx * dx, 1e-9)
        t = np.clip(((yy - ay) * dy + (xx - ax) * dx) / length2, 0.0, 1.0)
        best = np.minimum(best, np.hypot(yy - (ay + t * dy), xx - (ax + t * dx)))
    return best


def _rotate(yy, xx, cy, cx, angle):
    """Coordinates relative to (cy, cx) in a frame rotated by `angle` (radians): (along, across)."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    return dx * c + dy * s, -dx * s + dy * c


def _point_on(rng: np.random.Generator, region: np.ndarray, margin: float) -> tuple[float, float]:
    """A random pixel centre (y, x) at least `margin` pixels inside `region` (falls back to its core)."""
    depth = ndimage.distance_transform_edt(region)
    candidates = np.flatnonzero(region & (depth >= min(margin, depth.max())))
    index = candidates[rng.integers(len(candidates))]
    y, x = np.unravel_index(index, region.shape)
    return float(y) + 0.5, float(x) + 0.5


def _blob(rng, size, cy, cx, radius, roughness=0.35) -> np.ndarray:
    """Coverage of an irregular blob (an ellipse whose rim is pushed by smooth noise)."""
    yy, xx = _coords(size)
    along, across = _rotate(yy, xx, cy, cx, rng.uniform(0, np.pi))
    aspect = rng.uniform(0.6, 1.0)
    radial = np.hypot(along, across / aspect)
    wobble = np.clip(_smooth_noise(rng, size, max(1.0, radius / 2)), -1.5, 1.5) * roughness * radius
    return _coverage(radial - radius - wobble)


def _curve(rng, start, length, bend, steps=12, jitter=0.0) -> np.ndarray:
    """A polyline of `steps` segments from `start`, turning by `bend` radians in total."""
    angle = rng.uniform(0, 2 * np.pi)
    step = length / steps
    points = [np.array(start, dtype=np.float64)]
    for _ in range(steps):
        angle += bend / steps + rng.normal(0.0, jitter)
        points.append(points[-1] + step * np.array([np.sin(angle), np.cos(angle)]))
    return np.array(points)


def _shade(colour, amount) -> np.ndarray:
    """`colour` (3,) scaled by a HxW shading field -> HxWx3."""
    return np.asarray(colour, dtype=np.float32)[None, None, :] * amount[..., None]


def _plain_background(rng, size, avoid: np.ndarray) -> np.ndarray:
    """Paper-like plain background: one colour that stands apart from the object's colours `avoid`
    (K x 3), a gentle lighting gradient and faint fibres."""
    yy, xx = _coords(size)
    candidates = np.clip(rng.uniform(0.3, 0.9, (6, 1)) + rng.normal(0.0, 0.03, (6, 3)), 0, 1)
    separation = np.linalg.norm(candidates[:, None] - avoid[None], axis=-1).min(1)
    colour = candidates[separation.argmax()]
    gy, gx = rng.normal(0.0, 0.06, 2)
    light = 1.0 + gy * (yy / size - 0.5) + gx * (xx / size - 0.5) + 0.008 * _smooth_noise(rng, size, size / 24)
    return _shade(colour, light)


def _object_scene(rng, size, alpha, body, colours, shadow_shift) -> _Scene:
    """Compose an object (coverage `alpha`, render `body`, main `colours`) with a soft shadow over a
    plain background."""
    background = _plain_background(rng, size, np.atleast_2d(colours))
    sy, sx = shadow_shift
    shadow = ndimage.shift(alpha, (sy * size, sx * size), order=1, mode="constant")
    shadow = ndimage.gaussian_filter(shadow, size / 40)
    background = background * (1.0 - 0.18 * shadow)[..., None]
    base = background * (1.0 - alpha[..., None]) + body * alpha[..., None]
    return _Scene(base, background, alpha, _sensor_noise(rng, size))


def _sensor_noise(rng, size) -> np.ndarray:
    sigma = rng.uniform(0.004, 0.012)
    return rng.normal(0.0, sigma, (size, size, 3)).astype(np.float32)


def _lambert(nx, ny, light) -> np.ndarray:
    """Diffuse + a small specular term for surface normals (nx, ny, nz) under a light from `light`."""
    nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))
    lx, ly, lz = light
    diffuse = np.clip(nx * lx + ny * ly + nz * lz, 0.0, 1.0)
    return 0.5 + 0.5 * diffuse, diffuse**24


def _light(rng) -> tuple[float, float, float]:
    azimuth = rng.uniform(0, 2 * np.pi)
    elevation = rng.uniform(0.9, 1.3)
    return (np.cos(azimuth) * np.cos(elevation), np.sin(azimuth) * np.cos(elevation), np.sin(elevation))


# ---------------------------------------------------------------------------------------------- normals
