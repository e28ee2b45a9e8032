"""A procedural MVTec-format dataset: the stand-in for MVTec AD in the tests and the demo.

No downloads exist here, so the project renders its own benchmark. Every image is drawn from a seed,
with smooth shading, a soft shadow, slight lighting drift and sensor noise; defects vary in size,
contrast and placement (some are faint), so three examples do not make detection trivial.

Categories (``dualanodiff synth OUT`` writes all of them):

=========  =======  ==========================================================================  ==========================================
category   kind     normal images                                                               defect types
=========  =======  ==========================================================================  ==========================================
``nut``    object   a round, nut-like body with radial grain and a lit top, on plain paper;     ``scratch`` (thin curved line, light or
                    random size, aspect, rotation, position and brown tone                      dark), ``hole`` (dark pit with a rim),
                                                                                                ``crack`` (jagged branching dark line),
                                                                                                ``stain`` (soft irregular colour blot)
``pill``   object   an elongated two-colour capsule at any rotation on a plain background;      ``scratch``, ``missing_piece`` (a chunk
                    random length, width, colours and position                                  bitten out of the rim: background shows),
                                                                                                ``stain``
``weave``  texture  a woven fabric (plain weave) filling the frame; random thread period,       ``hole`` (threads gone, dark backing
                    angle, phase and yarn colours                                               shows), ``cut`` (thin straight slit),
                                                                                                ``stain``, ``thread`` (one loose thread
                                                                                                in a wrong colour)
=========  =======  ==========================================================================  ==========================================

Masks mark exactly the altered pixels: a defect is rendered only inside its mask, and every pixel
inside the mask differs from the defect-free render of the same scene (``Sample.clean``). Object
defects lie on the object. The files are byte-identical for a seed; each image has its own seed
derived from (seed, category, split, defect, index), so changing ``--per-defect`` does not change
the images that were already there.

Layout written (MVTec AD)::

    OUT/<category>/train/good/000.png
    OUT/<category>/test/good/000.png
    OUT/<category>/test/<defect>/000.png
    OUT/<category>/ground_truth/<defect>/000_mask.png     (L, 0/255)

Example::

    rng = np.random.default_rng(0)
    sample = render_sample("nut", "crack", rng, 128)
    assert (sample.mask == (sample.image != sample.clean).any(-1)).all()
"""

from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
from scipy import ndimage

from dualanodiff.errors import UserError
from dualanodiff.io import save_png


@dataclass
class _Scene:
    """A noiseless render plus what a defect needs to know about it (all float in [0, 1])."""

    base: np.ndarray  # HxWx3, the normal image before noise
    background: np.ndarray  # HxWx3, what shows where the object (or the fabric) is missing
    foreground: np.ndarray  # HxW alpha of the object; all ones for textures
    noise: np.ndarray  # HxWx3 sensor noise, identical for the clean and the defective render
    axis: tuple[float, float] = (1.0, 0.0)  # texture: unit vector along the weft threads


# A defect paints `target` over the base with opacity `alpha` (HxW); where alpha > 0.02 (and, for
# objects, on the object) is its mask.
_Defect = Callable[[_Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class SyntheticCategory:
    kind: Literal["object", "texture"]
    render: Callable[[np.random.Generator, int], _Scene]
    defects: dict[str, _Defect]


@dataclass
class Sample:
    """One render: ``image`` (uint8 HxWx3), its defect-free twin ``clean``, the exact ``mask``
    (bool HxW, all False for a normal image) and the true object ``foreground`` (bool HxW)."""

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray
    foreground: np.ndarray


# ---------------------------------------------------------------------------------------------- helpers


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


def _render_nut(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = _coords(size)
    radius = size * rng.uniform(0.22, 0.32)
    cy, cx = size * (0.5 + rng.uniform(-0.08, 0.08, 2))
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.8, 1.0)
    along, across = _rotate(yy, xx, cy, cx, angle)
    u, v = along / radius, across / (radius * aspect)
    # A slightly lumpy outline: the radius wobbles with the polar angle.
    theta = np.arctan2(v, u)
    lumps = sum(rng.normal(0, 0.025) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    r = np.hypot(u, v) / (1.0 + lumps)
    alpha = _coverage((r - 1.0) * radius * aspect)
    inside = np.clip(r, 0, 0.999)
    nx, ny = (u / np.maximum(r, 1e-6)) * inside, (v / np.maximum(r, 1e-6)) * inside
    diffuse, specular = _lambert(nx * 0.9, ny * 0.9, _light(rng))
    grain = 0.06 * np.sin(rng.integers(18, 30) * theta + 2.5 * _smooth_noise(rng, size, size / 16))
    speckle = 0.03 * _smooth_noise(rng, size, 0.8)
    tip = np.exp(-((u - 0.0) ** 2 + (v + 0.75) ** 2) / 0.04)  # a lighter cap like a nut's attachment scar
    colour = np.array([0.55, 0.36, 0.2]) * rng.uniform(0.75, 1.15) + rng.normal(0, 0.03, 3)
    shading = diffuse * (1.0 + grain + speckle)
    body = _shade(np.clip(colour, 0, 1), shading) + 0.25 * tip[..., None] + 0.3 * specular[..., None]
    return _object_scene(rng, size, alpha, np.clip(body, 0, 1), colour, rng.uniform(0.01, 0.03, 2))


_PILL_COLOURS = np.array(
    [[0.85, 0.2, 0.18], [0.95, 0.93, 0.88], [0.2, 0.35, 0.75], [0.95, 0.75, 0.15], [0.25, 0.6, 0.3], [0.5, 0.25, 0.55]]
)


def _render_pill(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = _coords(size)
    half_length = size * rng.uniform(0.2, 0.3)
    radius = size * rng.uniform(0.09, 0.13)
    angle = rng.uniform(0, np.pi)
    cy, cx = size * (0.5 + rng.uniform(-0.06, 0.06, 2))
    along, across = _rotate(yy, xx, cy, cx, angle)
    clamped = np.clip(along, -half_length, half_length)
    distance = np.hypot(along - clamped, across)
    alpha = _coverage(distance - radius)
    # Normals of a capsule: across the cylinder, plus the rounded caps.
    ny = across / radius
    nx = (along - clamped) / radius
    diffuse, specular = _lambert(np.clip(nx, -1, 1) * 0.95, np.clip(ny, -1, 1) * 0.95, _light(rng))
    halves = _PILL_COLOURS[rng.choice(len(_PILL_COLOURS), 2, replace=False)] * rng.uniform(0.85, 1.05)
    seam = _coverage(-along * (1 if rng.random() < 0.5 else -1))[..., None]
    colour = halves[0][None, None] * seam + halves[1][None, None] * (1 - seam)
    body = colour * (diffuse * (1 + 0.015 * _smooth_noise(rng, size, 1.0)))[..., None] + 0.4 * specular[..., None]
    return _object_scene(rng, size, alpha, np.clip(body, 0, 1), halves, rng.uniform(0.01, 0.025, 2))


def _render_weave(rng: np.random.Generator, size: int) -> _Scene:
    yy, xx = _coords(size)
    period = size / rng.uniform(9, 14)
    angle = rng.uniform(-0.25, 0.25)
    along, across = _rotate(yy, xx, size / 2, size / 2, angle)
    along = along / period + rng.uniform(0, 1)
    across = across / period + rng.uniform(0, 1)
    cell_a, cell_c = np.floor(along), np.floor(across)
    fa, fc = along - cell_a, across - cell_c
    weft_on_top = (cell_a + cell_c) % 2 == 0
    weft = np.sin(np.pi * fc) ** 0.6 * (0.8 + 0.2 * np.sin(np.pi * fa))  # threads running along
    warp = np.sin(np.pi * fa) ** 0.6 * (0.8 + 0.2 * np.sin(np.pi * fc))  # threads running across
    hue = rng.uniform(0.3, 0.8, 3)
    weft_colour = np.clip(hue + rng.normal(0, 0.05, 3), 0, 1)
    warp_colour = np.clip(hue * rng.uniform(0.8, 1.0) + rng.normal(0, 0.05, 3), 0, 1)
    fibre = 1.0 + 0.05 * _smooth_noise(rng, size, 0.7) + 0.03 * _smooth_noise(rng, size, size / 10)
    base = np.where(weft_on_top[..., None], _shade(weft_colour, weft), _shade(warp_colour, warp)) * fibre[..., None]
    backing = _shade(hue * 0.18, np.ones_like(fa))
    base = np.maximum(base, backing * 0.9)
    scene = _Scene(np.clip(base, 0, 1), backing, np.ones((size, size), np.float32), _sensor_noise(rng, size))
    scene.axis = (float(np.sin(angle)), float(np.cos(angle)))
    return scene


# ---------------------------------------------------------------------------------------------- defects


def _object_region(scene: _Scene) -> np.ndarray:
    return scene.foreground > 0.999


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


CATEGORIES: dict[str, SyntheticCategory] = {
    "nut": SyntheticCategory(
        "object", _render_nut, {"scratch": _scratch, "hole": _hole, "crack": _crack, "stain": _stain}
    ),
    "pill": SyntheticCategory(
        "object", _render_pill, {"scratch": _scratch, "missing_piece": _missing_piece, "stain": _stain}
    ),
    "weave": SyntheticCategory(
        "texture", _render_weave, {"hole": _texture_hole, "cut": _cut, "stain": _stain, "thread": _loose_thread}
    ),
}


# ---------------------------------------------------------------------------------------------- rendering


def _category(name: str) -> SyntheticCategory:
    if name not in CATEGORIES:
        raise UserError(f"{name}: unknown synthetic category; choose from {sorted(CATEGORIES)}")
    return CATEGORIES[name]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def render_sample(category: str, defect: str | None, rng: np.random.Generator, size: int) -> Sample:
    """Render one scene of `category`, with `defect` painted on it (or none), at `size` x `size`."""
    spec = _category(category)
    if defect is not None and defect not in spec.defects:
        raise UserError(f"{defect}: unknown defect for '{category}'; choose from {sorted(spec.defects)}")
    scene = spec.render(rng, size)
    clean = _to_uint8(scene.base + scene.noise)
    foreground = scene.foreground >= 0.5
    if defect is None:
        return Sample(clean, clean.copy(), np.zeros((size, size), bool), foreground)
    alpha, target = spec.defects[defect](scene, rng)
    mask = (alpha > 0.02) & foreground  # object defects stay on the object
    painted = scene.base * (1 - alpha[..., None]) + target * alpha[..., None]
    image = np.where(mask[..., None], _to_uint8(painted + scene.noise), clean)
    _nudge_unchanged(image, clean, target, scene.base, mask)
    return Sample(image, clean, mask, foreground)


def _nudge_unchanged(image, clean, target, base, mask) -> None:
    """Inside the mask, move pixels that rounded back to their clean value one level towards the
    defect's colour, so that the mask is exactly the set of altered pixels (an invisible change)."""
    same = mask & (image == clean).all(-1)
    if not same.any():
        return
    delta = (target - base)[same]
    channel = np.abs(delta).argmax(-1)
    rows = np.flatnonzero(same.ravel())
    values = image.reshape(-1, 3)[rows, channel].astype(np.int16)
    step = np.where(delta[np.arange(len(rows)), channel] >= 0, 1, -1)
    step = np.where((values + step < 0) | (values + step > 255), -step, step)
    image.reshape(-1, 3)[rows, channel] = (values + step).astype(np.uint8)


def render_normal(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect-free image of `category` (HxWx3 uint8)."""
    return render_sample(category, None, rng, size).image


def render_defect(category: str, defect: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of `category` with `defect` (HxWx3 uint8) and its exact mask (HxW bool)."""
    sample = render_sample(category, defect, rng, size)
    return sample.image, sample.mask


def _seed(seed: int, *parts: str | int) -> np.random.Generator:
    """A generator for one file, independent of how many other files are written."""
    words = [int(p) if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return np.random.default_rng([seed, *words])


def dataset_jobs(categories: list[str], per_defect: int, good: int) -> Iterator[tuple[str, str, str | None, int]]:
    """Every file `write_dataset` writes, as (category, split, defect or None, index)."""
    for name in categories:
        for split in ("train", "test"):
            for index in range(good):
                yield name, split, None, index
        for defect in _category(name).defects:
            for index in range(per_defect):
                yield name, "test", defect, index


def write_dataset(
    root: Path,
    seed: int = 0,
    size: int = 128,
    per_defect: int = 9,
    good: int = 12,
    categories: list[str] | None = None,
    progress: Callable[[], None] | None = None,
) -> list[Path]:
    """Write the synthetic dataset in the MVTec AD layout under `root`; returns the category dirs.

    `good` normal images go to train/good and as many to test/good; `per_defect` images per defect type.
    Existing folders of the categories written are replaced. `progress` is called once per image.
    """
    root = Path(root)
    names = list(CATEGORIES) if categories is None else list(categories)
    for name in names:
        _category(name)
    if size < 32:
        raise UserError(f"--size {size}: images must be at least 32 pixels; pick 64, 128 or 256")
    if per_defect < 1 or good < 1:
        raise UserError("--per-defect/--good: need at least one image of each; pass a positive number")
    for name in names:
        if (root / name).exists():
            shutil.rmtree(root / name)
    for name, split, defect, index in dataset_jobs(names, per_defect, good):
        rng = _seed(seed, name, split, defect or "good", index)
        sample = render_sample(name, defect, rng, size)
        stem = f"{index:03d}"
        save_png(root / name / split / (defect or "good") / f"{stem}.png", sample.image)
        if defect is not None:
            save_png(root / name / "ground_truth" / defect / f"{stem}_mask.png", sample.mask.astype(np.uint8) * 255)
        if progress is not None:
            progress()
    return [root / name for name in names]
