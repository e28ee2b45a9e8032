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

Beyond these three benchmark categories (``CATEGORIES``, what ``write_dataset`` writes by default), the
*pretraining world* (``FAMILIES``) holds further objects (``screw``, ``washer``, ``gear``, ``chip``,
``tablet``, ``bottle``) and textures (``grid``, ``wood``, ``tile``, ``leather``, ``carpet``), and a larger
defect vocabulary (``contamination``, ``bent``, ``misprint``, ``fold``, ``color``, ``glue`` besides the
above), each with varied size, contrast and placement. ``HELD_OUT`` (``bottle``) is never shown to the
embedded base in pretraining; ``write_dataset(root, categories=[HELD_OUT])`` writes it for a demo on a
category the base has not seen. ``world_item`` draws the base's training images: normal, defective,
defect-only part images and backgrounds (``WORLD_KINDS``), captioned as the few-shot prompts read.

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
    framed: bool = False  # defects keep their distance from the image border (the world's textures)


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


# ------------------------------------------------------------------------- normals: the pretraining world
# Families beyond the three benchmark categories. They only add code: the renderers above and their random
# streams are untouched, so the benchmark files stay byte-identical for a seed.


def _metal(rng) -> np.ndarray:
    """A metal tone: steel, brass or dark anodised, slightly tinted."""
    palette = np.array([[0.62, 0.63, 0.66], [0.72, 0.6, 0.32], [0.35, 0.37, 0.42], [0.78, 0.78, 0.76]])
    return np.clip(palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.1) + rng.normal(0, 0.02, 3), 0, 1)


def _radial_bevel(r_norm: np.ndarray, u: np.ndarray, v: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Surface normals of a flat disc whose last `width` (share of the radius) curves down to the rim."""
    tilt = np.clip((r_norm - (1 - width)) / width, 0, 1) ** 1.5 * 0.9
    r_safe = np.maximum(r_norm, 1e-6)
    return u / r_safe * tilt, v / r_safe * tilt


def _render_screw(rng: np.random.Generator, size: int) -> _Scene:
    """A machine screw lying on its side: a threaded shaft with a pointed tip and a wider head."""
    yy, xx = _coords(size)
    angle = rng.uniform(0, 2 * np.pi)
    cy, cx = size * (0.5 + rng.uniform(-0.06, 0.06, 2))
    half = size * rng.uniform(0.24, 0.32)
    radius = size * rng.uniform(0.04, 0.055)
    along, across = _rotate(yy, xx, cy, cx, angle)
    taper = np.clip((along - 0.55 * half) / (0.45 * half), 0, 1)
    shaft_radius = radius * (1 - 0.85 * taper)
    shaft = np.maximum(np.abs(across) - shaft_radius, np.maximum(along - half, -half - along))
    head_radius = radius * rng.uniform(1.9, 2.5)
    head_length = radius * rng.uniform(1.1, 1.6)
    head = np.maximum(np.abs(across) - head_radius, np.abs(along + half + head_length / 2) - head_length / 2)
    alpha = _coverage(np.minimum(shaft, head))
    on_head = head < shaft
    ny = np.clip(across / np.where(on_head, head_radius, np.maximum(shaft_radius, 1e-3)), -1, 1)
    diffuse, specular = _lambert(np.zeros_like(ny), ny * 0.95, _light(rng))
    pitch = radius * rng.uniform(0.7, 1.1)
    thread = np.where(on_head, 1.0, 0.8 + 0.2 * np.sin(2 * np.pi * along / pitch) ** 2)
    colour = _metal(rng)
    body = _shade(colour, diffuse * thread * (1 + 0.03 * _smooth_noise(rng, size, 0.8))) + 0.45 * specular[..., None]
    return _object_scene(rng, size, alpha, np.clip(body, 0, 1), colour, rng.uniform(0.01, 0.025, 2))


def _render_washer(rng: np.random.Generator, size: int) -> _Scene:
    """A flat metal ring with a brushed, concentric finish; the background shows through its hole."""
    yy, xx = _coords(size)
    outer = size * rng.uniform(0.24, 0.33)
    inner = outer * rng.uniform(0.35, 0.55)
    cy, cx = size * (0.5 + rng.uniform(-0.07, 0.07, 2))
    r = np.hypot(yy - cy, xx - cx)
    alpha = _coverage(np.maximum(r - outer, inner - r))
    middle = (outer + inner) / 2
    tilt = np.clip((r - middle) / (outer - middle), -1, 1) * 0.6
    nx, ny = (xx - cx) / np.maximum(r, 1e-6) * tilt, (yy - cy) / np.maximum(r, 1e-6) * tilt
    diffuse, specular = _lambert(nx, ny, _light(rng))
    brushed = 1 + 0.05 * np.sin(r * rng.uniform(1.5, 3.0)) + 0.03 * _smooth_noise(rng, size, 0.7)
    colour = _metal(rng)
    body = _shade(colour, diffuse * brushed) + 0.35 * specular[..., None]
    return _object_scene(rng, size, alpha, np.clip(body, 0, 1), colour, rng.uniform(0.01, 0.03, 2))


def _render_gear(rng: np.random.Generator, size: int) -> _Scene:
    """A spur gear (metal or plastic) with a bore: teeth around a bevelled disc."""
    yy, xx = _coords(size)
    radius = size * rng.uniform(0.22, 0.3)
    cy, cx = size * (0.5 + rng.uniform(-0.06, 0.06, 2))
    teeth = int(rng.integers(10, 20))
    depth = radius * rng.uniform(0.1, 0.16)
    theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi)
    r = np.hypot(yy - cy, xx - cx)
    wave = np.clip(np.sin(teeth * theta) * 2.5, -1, 1)  # flat-topped teeth
    rim = radius + depth * wave
    bore = radius * rng.uniform(0.18, 0.3)
    alpha = _coverage(np.maximum(r - rim, bore - r))
    r_norm = np.clip(r / radius, 0, 1)
    nx, ny = _radial_bevel(r_norm, (xx - cx) / radius, (yy - cy) / radius, 0.25)
    diffuse, specular = _lambert(nx, ny, _light(rng))
    if rng.random() < 0.5:
        colour = _metal(rng)
    else:
        colour = np.clip(rng.uniform(0.15, 0.85, 3), 0, 1)
    hub = 1 - 0.12 * np.exp(-((r - bore * 1.6) ** 2) / (2 * (0.08 * radius) ** 2))
    body = _shade(colour, diffuse * hub * (1 + 0.02 * _smooth_noise(rng, size, 1.0))) + 0.3 * specular[..., None]
    return _object_scene(rng, size, alpha, np.clip(body, 0, 1), colour, rng.uniform(0.01, 0.03, 2))


def _glyphs(rng, yy, xx, cy, cx, angle, height, count, width) -> np.ndarray:
    """Coverage of `count` made-up characters in a row (strokes on a 3x5 grid), centred on (cy, cx)."""
    cell = height / 4
    spacing = cell * 3
    distance = np.full(yy.shape, np.inf, dtype=np.float32)
    c, s = np.cos(angle), np.sin(angle)
    for k in range(count):
        offset = (k - (count - 1) / 2) * spacing
        for _ in range(int(rng.integers(2, 4))):
            (ay, ax), (by, bx) = rng.integers(0, [5, 3], (2, 2))
            points = []
            for gy, gx in ((ay, ax), (by, bx)):
                along, across = offset + (gx - 1) * cell, (gy - 2) * cell
                points.append([cy + along * s + across * c, cx + along * c - across * s])
            distance = np.minimum(distance, _segment_distance(yy, xx, np.array(points)))
    return _coverage(distance - width / 2)


def _render_chip(rng: np.random.Generator, size: int) -> _Scene:
    """An integrated circuit: a dark moulded body with metal legs on two sides and a printed marking."""
    yy, xx = _coords(size)
    angle = rng.uniform(0, np.pi) if rng.random() < 0.5 else rng.integers(4) * np.pi / 2 + rng.normal(0, 0.05)
    cy, cx = size * (0.5 + rng.uniform(-0.05, 0.05, 2))
    half_w, half_h = size * rng.uniform(0.16, 0.24), size * rng.uniform(0.1, 0.15)
    along, across = _rotate(yy, xx, cy, cx, angle)
    body = np.maximum(np.abs(along) - half_w, np.abs(across) - half_h)
    legs_n = int(rng.integers(3, 7))
    pitch = 2 * half_w / legs_n
    leg_len = size * rng.uniform(0.04, 0.07)
    leg_phase = (along + half_w) / pitch - np.floor((along + half_w) / pitch) - 0.5
    leg = np.maximum(np.abs(leg_phase) * pitch - pitch * 0.22, np.abs(np.abs(across) - half_h - leg_len / 2) - leg_len / 2)
    leg = np.maximum(leg, np.abs(along) - half_w)
    alpha = _coverage(np.minimum(body, leg))
    on_leg = leg < body
    diffuse, specular = _lambert(np.zeros_like(yy), np.clip(leg_phase * 1.6, -0.9, 0.9) * on_leg, _light(rng))
    dark = np.clip(rng.uniform(0.08, 0.2) + rng.normal(0, 0.01, 3), 0, 1)
    metal = _metal(rng)
    print_colour = np.clip(rng.uniform(0.6, 0.9) + rng.normal(0, 0.03, 3), 0, 1)
    marking = _glyphs(rng, yy, xx, cy, cx, angle, half_h * rng.uniform(0.5, 0.8), int(rng.integers(3, 6)),
                      max(0.8, size * 0.008)) * (body < 0)
    colour = np.where(on_leg[..., None], _shade(metal, diffuse) + 0.3 * specular[..., None],
                      _shade(dark, 0.9 + 0.1 * diffuse + 0.02 * _smooth_noise(rng, size, 1.0)))
    colour = colour * (1 - marking[..., None]) + print_colour * marking[..., None]
    return _object_scene(rng, size, alpha, np.clip(colour, 0, 1), np.stack([dark, metal]), rng.uniform(0.008, 0.02, 2))


def _render_tablet(rng: np.random.Generator, size: int) -> _Scene:
    """A round pressed tablet with a bevelled edge and a score line."""
    yy, xx = _coords(size)
    radius = size * rng.uniform(0.18, 0.27)
    cy, cx = size * (0.5 + rng.uniform(-0.08, 0.08, 2))
    along, across = _rotate(yy, xx, cy, cx, rng.uniform(0, np.pi))
    squash = rng.uniform(0.85, 1.0)
    r_norm = np.hypot(along, across / squash) / radius
    alpha = _coverage((r_norm - 1) * radius * squash)
    nx, ny = _radial_bevel(np.clip(r_norm, 0, 1), along / radius, across / radius, 0.3)
    diffuse, specular = _lambert(nx, ny, _light(rng))
    colour = np.clip(np.array([0.93, 0.92, 0.88]) * rng.uniform(0.85, 1.05) + rng.normal(0, 0.04, 3), 0, 1)
    if rng.random() < 0.4:
        colour = np.clip(_PILL_COLOURS[rng.integers(len(_PILL_COLOURS))] * rng.uniform(0.9, 1.1), 0, 1)
    score = 1 - 0.3 * np.exp(-(across / max(0.7, size * 0.008)) ** 2) * (r_norm < 0.8) * (rng.random() < 0.7)
    body = _shade(colour, diffuse * score * (1 + 0.02 * _smooth_noise(rng, size, 0.8))) + 0.2 * specular[..., None]
    return _object_scene(rng, size, alpha, np.clip(body, 0, 1), colour, rng.uniform(0.01, 0.025, 2))


def _render_bottle(rng: np.random.Generator, size: int) -> _Scene:
    """A glass bottle seen from above: a thick bright lip, the shoulder ring and the dark opening."""
    yy, xx = _coords(size)
    outer = size * rng.uniform(0.3, 0.38)
    cy, cx = size * (0.5 + rng.uniform(-0.04, 0.04, 2))
    r = np.hypot(yy - cy, xx - cx) / outer
    alpha = _coverage((r - 1) * outer)
    glass = np.array([[0.35, 0.22, 0.1], [0.2, 0.4, 0.22], [0.55, 0.6, 0.6]])[rng.integers(3)]
    glass = np.clip(glass * rng.uniform(0.8, 1.2) + rng.normal(0, 0.02, 3), 0, 1)
    lip, opening = rng.uniform(0.5, 0.6), rng.uniform(0.3, 0.4)
    light = _light(rng)
    highlight = np.exp(-((r - rng.uniform(0.7, 0.9)) ** 2) / 0.004) * (0.6 + 0.4 * np.cos(np.arctan2(yy - cy, xx - cx) - np.arctan2(light[1], light[0])))
    ring = np.where(r > lip, 0.75 + 0.25 * (1 - r), 0.45 + 0.3 * (r - opening) / (lip - opening))
    shade = np.where(r < opening, 0.12 + 0.2 * r / opening, ring)
    body = _shade(glass, shade * (1 + 0.02 * _smooth_noise(rng, size, 1.2))) + 0.5 * highlight[..., None]
    return _object_scene(rng, size, alpha, np.clip(body, 0, 1), glass, rng.uniform(0.005, 0.02, 2))


def _texture_scene(rng, size, base, backing, axis=(1.0, 0.0)) -> _Scene:
    scene = _Scene(np.clip(base, 0, 1), np.clip(backing, 0, 1), np.ones((size, size), np.float32), _sensor_noise(rng, size))
    scene.axis, scene.framed = axis, True
    return scene


def _render_grid(rng: np.random.Generator, size: int) -> _Scene:
    """A woven wire mesh: round metal wires in two directions over a dark gap."""
    yy, xx = _coords(size)
    period = size / rng.uniform(7, 12)
    angle = rng.uniform(-0.3, 0.3)
    along, across = _rotate(yy, xx, size / 2, size / 2, angle)
    fa = (along / period + rng.uniform(0, 1)) % 1 - 0.5
    fc = (across / period + rng.uniform(0, 1)) % 1 - 0.5
    width = rng.uniform(0.18, 0.3)
    wire_a = np.sqrt(np.clip(1 - (fc / width) ** 2, 0, 1))  # wires running along
    wire_c = np.sqrt(np.clip(1 - (fa / width) ** 2, 0, 1))
    over = (np.floor(along / period) + np.floor(across / period)) % 2 == 0
    height = np.where(over, np.maximum(wire_a * 1.0, wire_c * 0.8), np.maximum(wire_a * 0.8, wire_c * 1.0))
    metal = _metal(rng)
    backing = _shade(metal * rng.uniform(0.1, 0.25), np.ones_like(fa))
    lit = height ** 0.7 * (0.85 + 0.15 * _smooth_noise(rng, size, size / 12))
    base = np.where((height > 0)[..., None], _shade(metal, 0.35 + 0.75 * lit), backing)
    return _texture_scene(rng, size, base, backing, (float(np.sin(angle)), float(np.cos(angle))))


def _render_wood(rng: np.random.Generator, size: int) -> _Scene:
    """Planed wood: wavy growth rings along the grain, fine pores and a warm tone."""
    yy, xx = _coords(size)
    angle = rng.uniform(0, np.pi)
    along, across = _rotate(yy, xx, size / 2, size / 2, angle)
    period = size / rng.uniform(6, 14)
    wave = 0.35 * np.sin(2 * np.pi * along / (size * rng.uniform(0.6, 1.6)) + rng.uniform(0, 2 * np.pi))
    warp = wave + 0.5 * _smooth_noise(rng, size, size / 5) + 0.08 * _smooth_noise(rng, size, size / 30)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (across / period + warp))
    pores = np.clip(_smooth_noise(rng, size, 0.6), 1.2, None) - 1.2
    tone = np.array([[0.62, 0.42, 0.24], [0.8, 0.64, 0.42], [0.45, 0.28, 0.16], [0.72, 0.55, 0.38]])[rng.integers(4)]
    tone = np.clip(tone * rng.uniform(0.85, 1.1) + rng.normal(0, 0.02, 3), 0, 1)
    shade = 0.78 + 0.22 * rings ** 3 - 0.25 * pores + 0.04 * _smooth_noise(rng, size, size / 10)
    base = _shade(tone, shade)
    return _texture_scene(rng, size, base, tone * 0.25, (float(np.sin(angle)), float(np.cos(angle))))


def _render_tile(rng: np.random.Generator, size: int) -> _Scene:
    """A glazed ceramic or terrazzo tile: a pale ground with scattered speckles of two colours."""
    ground = np.clip(rng.uniform(0.55, 0.92) + rng.normal(0, 0.04, 3), 0, 1)
    base = _shade(ground, 1 + 0.03 * _smooth_noise(rng, size, size / 8) + 0.015 * _smooth_noise(rng, size, 0.7))
    for _ in range(2):
        speck_colour = np.clip(rng.uniform(0.1, 0.8, 3), 0, 1)
        field = _smooth_noise(rng, size, rng.uniform(0.6, 1.4))
        cover = np.clip((field - rng.uniform(1.6, 2.2)) * 3, 0, 1)[..., None]
        base = base * (1 - cover) + speck_colour * cover
    return _texture_scene(rng, size, base, ground * 0.35)


def _render_leather(rng: np.random.Generator, size: int) -> _Scene:
    """Grained leather: soft bumps separated by a network of fine dark creases."""
    field = _smooth_noise(rng, size, size / rng.uniform(25, 45))
    creases = np.exp(-(field / 0.12) ** 2)
    bumps = _smooth_noise(rng, size, 1.5)
    tone = np.array([[0.45, 0.28, 0.16], [0.12, 0.11, 0.1], [0.7, 0.52, 0.33], [0.5, 0.12, 0.1], [0.3, 0.3, 0.33]])
    tone = np.clip(tone[rng.integers(len(tone))] * rng.uniform(0.85, 1.15) + rng.normal(0, 0.02, 3), 0, 1)
    base = _shade(tone, 1 - 0.35 * creases + 0.05 * bumps + 0.04 * _smooth_noise(rng, size, size / 8))
    return _texture_scene(rng, size, base, tone * 0.4)


def _render_carpet(rng: np.random.Generator, size: int) -> _Scene:
    """A cut-pile carpet: dense fibre tips with tufts and a slight colour mottle."""
    yy, xx = _coords(size)
    tone = np.clip(rng.uniform(0.2, 0.8, 3), 0, 1)
    second = np.clip(tone + rng.normal(0, 0.08, 3), 0, 1)
    mottle = np.clip(0.5 + 0.5 * _smooth_noise(rng, size, size / 12), 0, 1)[..., None]
    tufts = _smooth_noise(rng, size, rng.uniform(1.5, 2.5))
    fibres = _smooth_noise(rng, size, 0.5)
    colour = tone * mottle + second * (1 - mottle)
    base = colour * (1 + 0.12 * tufts + 0.12 * fibres)[..., None]
    return _texture_scene(rng, size, base, tone * 0.3)


# ---------------------------------------------------------------------------------------------- defects


def _object_region(scene: _Scene) -> np.ndarray:
    region = scene.foreground > 0.999
    if scene.framed:  # a distance transform needs a border to measure from; weave keeps its old behaviour
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
"""The benchmark categories: what ``write_dataset`` (and ``dualanodiff synth``) writes by default."""

FAMILIES: dict[str, SyntheticCategory] = {
    **CATEGORIES,
    "screw": SyntheticCategory(
        "object", _render_screw,
        {"scratch": _scratch, "bent": _bent, "contamination": _contamination, "missing_piece": _missing_piece},
    ),
    "washer": SyntheticCategory(
        "object", _render_washer,
        {"scratch": _scratch, "crack": _crack, "missing_piece": _missing_piece, "bent": _bent, "stain": _stain},
    ),
    "gear": SyntheticCategory(
        "object", _render_gear,
        {"missing_piece": _missing_piece, "scratch": _scratch, "contamination": _contamination, "crack": _crack},
    ),
    "chip": SyntheticCategory(
        "object", _render_chip,
        {"misprint": _misprint, "bent": _bent, "scratch": _scratch, "contamination": _contamination, "crack": _crack},
    ),
    "tablet": SyntheticCategory(
        "object", _render_tablet,
        {"crack": _crack, "stain": _stain, "missing_piece": _missing_piece, "color": _color,
         "contamination": _contamination},
    ),
    "bottle": SyntheticCategory(
        "object", _render_bottle,
        {"missing_piece": _missing_piece, "contamination": _contamination, "crack": _crack, "scratch": _scratch},
    ),
    "grid": SyntheticCategory(
        "texture", _render_grid, {"bent": _bent, "hole": _texture_hole, "contamination": _contamination, "cut": _cut}
    ),
    "wood": SyntheticCategory(
        "texture", _render_wood,
        {"scratch": _scratch, "hole": _texture_hole, "crack": _crack, "stain": _stain, "color": _color},
    ),
    "tile": SyntheticCategory(
        "texture", _render_tile, {"crack": _crack, "stain": _stain, "glue": _glue, "contamination": _contamination}
    ),
    "leather": SyntheticCategory(
        "texture", _render_leather,
        {"cut": _cut, "fold": _fold, "color": _color, "glue": _glue, "hole": _texture_hole},
    ),
    "carpet": SyntheticCategory(
        "texture", _render_carpet,
        {"hole": _texture_hole, "cut": _cut, "color": _color, "contamination": _contamination, "thread": _loose_thread},
    ),
}
"""Every renderable category: the benchmark three and the further families of the pretraining world."""

HELD_OUT = "bottle"
"""Never shown to the embedded base in pretraining (normal or defective): a category it has not seen, for the
demo's held-out row. ``write_dataset(root, categories=[HELD_OUT])`` writes it like any other."""

PRETRAIN_FAMILIES: tuple[str, ...] = tuple(name for name in FAMILIES if name != HELD_OUT)


# ---------------------------------------------------------------------------------------------- rendering


def _category(name: str) -> SyntheticCategory:
    if name not in FAMILIES:
        raise UserError(f"{name}: unknown synthetic category; choose from {sorted(FAMILIES)}")
    return FAMILIES[name]


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


# ---------------------------------------------------------------------------------------------- pretraining world

WORLD_KINDS = ("normal", "defective", "part", "background")
"""The four kinds of image the embedded base is pretrained on, as DualAnoDiff's branches and BCM see them:
a normal image, a defective image I, the defect-only part image I*M and the background (1 - M_f) * I, both
products taken in [-1, 1] pixel space, so what is multiplied away is mid-grey (128), not black."""

WORLD_MIX = {"normal": 0.35, "defective": 0.35, "part": 0.18, "background": 0.12}
CAPTION_WORDS = ("a", "photo", "of", "with", "texture", "background")
GREY = np.uint8(128)  # 0 in [-1, 1], rounded as the training code rounds it


@dataclass
class WorldItem:
    """One pretraining image (uint8 HxWx3), its caption and what it shows."""

    image: np.ndarray
    caption: str
    kind: str  # one of WORLD_KINDS
    category: str
    defect: str | None


def thing_name(category: str) -> str:
    """How captions name a category: "nut", "metal nut", "weave texture" (as ``training.fill_prompt`` does)."""
    return category.replace("_", " ") + (" texture" if _category(category).kind == "texture" else "")


def world_caption(category: str, defect: str | None, kind: str, rng: np.random.Generator) -> str:
    """A caption in the exact forms the few-shot prompts take: "a {object} with {defect}" for a defective
    image, "{defect}" for a part image; "a {object}" or "a photo of a {object}" for a normal one and
    "a {object} background" for a background."""
    thing = thing_name(category)
    if kind == "defective":
        return f"a {thing} with {defect.replace('_', ' ')}"
    if kind == "part":
        return defect.replace("_", " ")
    if kind == "background":
        return f"a {thing} background"
    return f"a photo of a {thing}" if rng.random() < 0.3 else f"a {thing}"


def world_words(families: tuple[str, ...] | list[str] = PRETRAIN_FAMILIES) -> list[str]:
    """The words of every caption over `families` except the category names: a tokenizer that keeps
    these whole and spells the names in characters can name a category it never saw."""
    words = set(CAPTION_WORDS)
    for name in families:
        for defect in _category(name).defects:
            words.update(defect.split("_"))
    return sorted(words)


def part_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """I*M in [-1, 1] space: the image inside the defect mask, mid-grey elsewhere."""
    return np.where(mask[..., None], image, GREY)


def background_image(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """(1 - M_f) * I in [-1, 1] space: the image with the object's region mid-grey."""
    return np.where(foreground[..., None], GREY, image)


def colour_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saturation, hue rotation about the grey axis, contrast and brightness: new looks, same shapes."""
    x = image.astype(np.float32) / 255.0
    grey = x.mean(-1, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        x = _recolour(x, rng.uniform(-np.pi, np.pi))
    x = (x - x.mean()) * rng.uniform(0.75, 1.25) + x.mean() * rng.uniform(0.75, 1.25)
    return _to_uint8(x)


def world_item(
    seed: int, stream: int, index: int, size: int, families: tuple[str, ...] | list[str] = PRETRAIN_FAMILIES,
    jitter: float = 0.3,
) -> WorldItem:
    """Pretraining image number `index` of `stream` (fixed by these coordinates alone).

    A family drawn uniformly from `families`, a kind drawn by ``WORLD_MIX`` (a texture has no background
    image: it draws a normal one instead), a defect type uniformly from the family's; colour jitter on a
    share `jitter` of the images (before the grey is laid in, so the grey stays exact), then a random
    flip / quarter turn.
    """
    rng = np.random.default_rng([seed, stream, index])
    category = str(families[rng.integers(len(families))])
    spec = _category(category)
    kind = str(rng.choice(list(WORLD_MIX), p=list(WORLD_MIX.values())))
    if kind == "background" and spec.kind == "texture":
        kind = "normal"
    defect = str(rng.choice(list(spec.defects))) if kind in ("defective", "part") else None
    sample = render_sample(category, defect, rng, size)
    image = colour_jitter(sample.image, rng) if rng.random() < jitter else sample.image
    if kind == "part":
        image = part_image(image, sample.mask)
    elif kind == "background":
        image = background_image(image, sample.foreground)
    turn = int(rng.integers(8))
    image = np.rot90(image, turn % 4)
    if turn >= 4:
        image = image[:, ::-1]
    caption = world_caption(category, defect, kind, rng)
    return WorldItem(np.ascontiguousarray(image), caption, kind, category, defect)
