"""The normal scenes of each family: one renderer per object or texture, drawn from a generator and a size."""

from __future__ import annotations

import numpy as np

from dualanodiff.synthetic.draw import (
    _coords,
    _coverage,
    _lambert,
    _light,
    _object_scene,
    _rotate,
    _Scene,
    _segment_distance,
    _sensor_noise,
    _shade,
    _smooth_noise,
)


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
