"""The defect types: each paints a target over a scene with an opacity whose support is its mask."""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from dualanodiff.synthetic.draw import (
    _blob,
    _coords,
    _coverage,
    _curve,
    _point_on,
    _rotate,
    _Scene,
    _segment_distance,
    _smooth_noise,
)
from dualanodiff.synthetic.scenes import _glyphs

# A defect paints `target` over the base with opacity `alpha` (HxW); where alpha > 0.02 (and, for
# objects, on the object) is its mask.
_Defect = Callable[[_Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]
def _object_region(scene: _Scene) -> np.ndarray:
    region = scene.foreground > 0.999
    if scene.framed:  # a distance transform needs a border to measure from (the world's textures, not weave)
        region[[0, -1], :] = region[:, [0, -1]] = False
    return region


def _contrast(rng) -> float:
    """Defect strength: often clear, sometimes faint."""
    return rng.uniform(0.25, 0.5) if rng.random() < 0.3 else rng.uniform(0.5, 1.0)


def _scratch(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    size = scene.base.shape[0]
    yy, xx = _coords(size)
    start = _point_on(rng, _object_region(scene), size * 0.05)
    line = _curve(rng, start, size * rng.uniform(0.12, 0.35), rng.uniform(-1.0, 1.0))
    width = max(0.8, size * rng.uniform(0.006, 0.018))
    alpha = _coverage(_segment_distance(yy, xx, line) - width / 2) * scene.foreground
    strength = 0.45 * _contrast(rng)
    target = scene.base + (strength if rng.random() < 0.5 else -strength)
    return alpha, np.clip(target, 0, 1)


def _crack(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    size = scene.base.shape[0]
    yy, xx = _coords(size)
    start = _point_on(rng, _object_region(scene), size * 0.08)
    trunk = _curve(rng, start, size * rng.uniform(0.15, 0.35), rng.uniform(-0.6, 0.6), steps=14, jitter=0.5)
    distance = _segment_distance(yy, xx, trunk)
    for _ in range(rng.integers(0, 3)):
        fork = trunk[rng.integers(2, len(trunk) - 2)]
        branch = _curve(rng, fork, size * rng.uniform(0.05, 0.12), 0.0, steps=6, jitter=0.5)
        distance = np.minimum(distance, _segment_distance(yy, xx, branch))
    width = max(1.0, size * rng.uniform(0.01, 0.025))
    alpha = _coverage(distance - width / 2) * scene.foreground
    darkness = 1.0 - 0.7 * _contrast(rng)
    return alpha, scene.base * darkness


def _hole(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    size = scene.base.shape[0]
    yy, xx = _coords(size)
    radius = size * rng.uniform(0.025, 0.07)
    cy, cx = _point_on(rng, _object_region(scene), radius * 1.5)
    along, across = _rotate(yy, xx, cy, cx, rng.uniform(0, np.pi))
    radial = np.hypot(along, across / rng.uniform(0.7, 1.0))
    rim = radius * rng.uniform(1.2, 1.45)
    alpha = _coverage(radial - rim) * scene.foreground
    pit = np.clip(radial / radius, 0, 1)[..., None]
    depth = 0.15 + 0.5 * (1 - _contrast(rng))
    inner = scene.base * (depth + (1 - depth) * 0.4 * pit**3)
    outer = np.clip(scene.base * 1.15 + 0.03, 0, 1)
    target = np.where((radial <= radius)[..., None], inner, outer)
    return alpha, target


def _stain(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    size = scene.base.shape[0]
    radius = size * rng.uniform(0.04, 0.11)
    cy, cx = _point_on(rng, _object_region(scene), radius)
    alpha = _blob(rng, size, cy, cx, radius) * scene.foreground
    colour = rng.choice(np.array([[0.25, 0.15, 0.05], [0.1, 0.1, 0.1], [0.5, 0.45, 0.15], [0.3, 0.4, 0.55]]))
    opacity = 0.2 + 0.45 * _contrast(rng)
    target = scene.base * (1 - opacity) + colour[None, None] * opacity * (scene.base.mean(-1, keepdims=True) + 0.5)
    return alpha, np.clip(target, 0, 1)


def _missing_piece(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    """A bite out of the rim: a blob centred on the object's outline, background showing through."""
    size = scene.base.shape[0]
    region = _object_region(scene)
    rim = region & ~ndimage.binary_erosion(region, iterations=2)
    radius = size * rng.uniform(0.05, 0.1)
    cy, cx = _point_on(rng, rim, 0)
    bite = _blob(rng, size, cy, cx, radius, roughness=0.5)
    return bite * scene.foreground, scene.background


def _cut(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    size = scene.base.shape[0]
    yy, xx = _coords(size)
    start = _point_on(rng, _object_region(scene), size * 0.1)
    line = _curve(rng, start, size * rng.uniform(0.15, 0.4), rng.uniform(-0.2, 0.2), steps=4)
    width = max(0.9, size * rng.uniform(0.008, 0.02))
    alpha = _coverage(_segment_distance(yy, xx, line) - width / 2)
    shade = 0.3 + 0.5 * (1 - _contrast(rng))
    return alpha, scene.base * shade + scene.background * (1 - shade)


def _texture_hole(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    size = scene.base.shape[0]
    radius = size * rng.uniform(0.03, 0.08)
    cy, cx = _point_on(rng, _object_region(scene), radius)
    alpha = _blob(rng, size, cy, cx, radius, roughness=0.5)
    frayed = 0.15 * np.clip(_smooth_noise(rng, size, 0.8), 0, None)[..., None]
    return alpha, np.clip(scene.background + frayed * scene.base, 0, 1)


def _loose_thread(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    """A stretch of thread lying loose across the weave, in a slightly wrong colour."""
    size = scene.base.shape[0]
    yy, xx = _coords(size)
    cy, cx = _point_on(rng, _object_region(scene), size * 0.15)
    ay, ax = scene.axis if rng.random() < 0.5 else (scene.axis[1], -scene.axis[0])
    half = size * rng.uniform(0.05, 0.22)
    bend = rng.normal(0, size * 0.03)
    points = np.array([[cy - ay * half, cx - ax * half], [cy + ax * bend, cx - ay * bend], [cy + ay * half, cx + ax * half]])
    width = max(1.2, size * rng.uniform(0.02, 0.04))
    distance = _segment_distance(yy, xx, points)
    alpha = _coverage(distance - width / 2)
    profile = np.sqrt(np.clip(1 - (distance / (width / 2 + 0.5)) ** 2, 0, 1))[..., None]
    colour = np.clip(scene.base.mean((0, 1)) * rng.uniform(0.7, 1.4) + rng.normal(0, 0.12 * _contrast(rng), 3), 0, 1)
    return alpha, np.clip(colour[None, None] * (0.6 + 0.5 * profile), 0, 1)


# ------------------------------------------------------------------------- defects: the larger vocabulary


def _contamination(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    """Foreign matter: a cluster of specks, or a hair-like fibre, dark or pale."""
    size = scene.base.shape[0]
    yy, xx = _coords(size)
    cy, cx = _point_on(rng, _object_region(scene), size * 0.04)
    if rng.random() < 0.5:
        alpha = np.zeros((size, size), np.float32)
        spread = size * rng.uniform(0.02, 0.06)
        for _ in range(int(rng.integers(1, 5))):
            py, px = cy + rng.normal(0, spread), cx + rng.normal(0, spread)
            alpha = np.maximum(alpha, _blob(rng, size, py, px, size * rng.uniform(0.012, 0.035), 0.5))
    else:
        fibre = _curve(rng, (cy, cx), size * rng.uniform(0.1, 0.3), rng.uniform(-2.5, 2.5), steps=10, jitter=0.3)
        alpha = _coverage(_segment_distance(yy, xx, fibre) - max(0.6, size * rng.uniform(0.005, 0.012)))
    colour = np.array([[0.08, 0.06, 0.05], [0.3, 0.2, 0.1], [0.85, 0.85, 0.8], [0.5, 0.5, 0.55]])[rng.integers(4)]
    strength = 0.4 + 0.6 * _contrast(rng)
    target = scene.base * (1 - strength) + colour[None, None] * strength
    return alpha * scene.foreground, np.clip(target, 0, 1)


def _warp(base: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """`base` sampled at (y + dy, x + dx) for every pixel (bilinear, edges repeated)."""
    size = base.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coords = np.stack([yy + dy, xx + dx])
    return np.stack([ndimage.map_coordinates(base[..., c], coords, order=1, mode="nearest") for c in range(3)], -1)


def _bent(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    """A bend or dent: the shape pushed in locally (objects: at the outline; textures: threads/wires kinked)."""
    size = scene.base.shape[0]
    yy, xx = _coords(size)
    region = _object_region(scene)
    sigma = size * rng.uniform(0.03, 0.07)
    if (scene.foreground < 1).any():
        rim = region & ~ndimage.binary_erosion(region, iterations=2)
        cy, cx = _point_on(rng, rim if rim.any() else region, 0)
        centre = np.argwhere(region).mean(0) + 0.5
        direction = np.array([cy, cx]) - centre  # outwards: sampling from outside moves the outline in
    else:
        cy, cx = _point_on(rng, region, sigma)
        direction = np.array(scene.axis) if rng.random() < 0.5 else np.array([scene.axis[1], -scene.axis[0]])
    direction = direction / max(float(np.linalg.norm(direction)), 1e-6)
    falloff = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    shift = sigma * rng.uniform(0.5, 1.2) * (0.4 + 0.6 * _contrast(rng))
    target = _warp(scene.base, direction[0] * shift * falloff, direction[1] * shift * falloff)
    alpha = np.clip((falloff - 0.15) / 0.2, 0, 1) * scene.foreground
    return alpha, target


def _misprint(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    """A faulty imprint: stray made-up characters where no print belongs, dark on light or light on dark."""
    size = scene.base.shape[0]
    yy, xx = _coords(size)
    height = size * rng.uniform(0.04, 0.09)
    count = int(rng.integers(1, 4))
    cy, cx = _point_on(rng, _object_region(scene), height)
    angle = rng.uniform(0, 2 * np.pi)
    alpha = _glyphs(rng, yy, xx, cy, cx, angle, height, count, max(0.8, size * rng.uniform(0.008, 0.016)))
    light = scene.base[int(cy), int(cx)].mean() < 0.5
    ink = np.array([0.9, 0.9, 0.85]) if light else np.array([0.1, 0.1, 0.12])
    strength = 0.5 + 0.5 * _contrast(rng)
    return alpha * scene.foreground, np.clip(scene.base * (1 - strength) + ink * strength, 0, 1)


def _fold(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    """A crease: a nearly straight line, shadowed on one side and lit on the other."""
    size = scene.base.shape[0]
    yy, xx = _coords(size)
    start = _point_on(rng, _object_region(scene), size * 0.1)
    line = _curve(rng, start, size * rng.uniform(0.2, 0.5), rng.uniform(-0.4, 0.4), steps=6)
    width = size * rng.uniform(0.01, 0.025)
    distance = _segment_distance(yy, xx, line)
    (ay, ax), (by, bx) = line[0], line[-1]
    side = np.sign((yy - ay) * (bx - ax) - (xx - ax) * (by - ay))
    profile = np.exp(-((distance / width) ** 2))
    strength = 0.45 * _contrast(rng)
    target = scene.base * (1 + strength * profile * side)[..., None]
    return _coverage(distance - 1.5 * width) * scene.foreground, np.clip(target, 0, 1)


def hue_rotation(angle: float) -> np.ndarray:
    """The 3x3 matrix that turns RGB colours by `angle` radians about the grey axis (a hue shift; Rodrigues)."""
    k = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _recolour(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotate colours about the grey axis by `angle` radians (a hue shift)."""
    return image @ hue_rotation(angle).T.astype(np.float32)


def _color(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    """A discoloured patch: hue shifted and saturated, brightness kept."""
    size = scene.base.shape[0]
    radius = size * rng.uniform(0.04, 0.1)
    cy, cx = _point_on(rng, _object_region(scene), radius)
    alpha = _blob(rng, size, cy, cx, radius, 0.4) * scene.foreground
    grey = scene.base.mean(-1, keepdims=True)
    vivid = grey + (scene.base - grey) * 1.6 + rng.normal(0, 0.08, 3)
    target = _recolour(vivid, rng.uniform(1.0, 2.5) * rng.choice([-1, 1]))
    strength = 0.5 + 0.5 * _contrast(rng)
    return alpha, np.clip(scene.base * (1 - strength) + target * strength, 0, 1)


def _glue(scene: _Scene, rng) -> tuple[np.ndarray, np.ndarray]:
    """A dried glue or liquid drop: a translucent, slightly yellow film with glossy streaks."""
    size = scene.base.shape[0]
    radius = size * rng.uniform(0.04, 0.1)
    cy, cx = _point_on(rng, _object_region(scene), radius)
    alpha = _blob(rng, size, cy, cx, radius, 0.5) * scene.foreground
    gloss = np.clip(_smooth_noise(rng, size, max(1.0, radius / 4)) - 1.0, 0, None)[..., None]
    tint = np.array([0.95, 0.85, 0.55]) if rng.random() < 0.6 else np.array([0.85, 0.85, 0.85])
    strength = 0.25 + 0.35 * _contrast(rng)
    return alpha, np.clip(scene.base * (1 - strength) + tint * strength + 0.25 * gloss, 0, 1)
