"""Procedural indoor scenes: the scene sampler and a batched, tile-culled ray caster.

A scene is an axis-aligned room (floor ``y = 0``, ceiling ``y = height``, four walls) holding
axis-aligned boxes, spheres and vertical cylinders; every primitive carries a semantic class
(NYUv2-13 ids) and a material. The world frame is right-handed with ``y`` up; the camera frame is
the usual one of computer vision (x right, y down, z forward).

Rendering is ray casting (Whitted, "An improved illumination model for shaded display", 1980,
first-hit rays only, no shadows) with the slab test of Kay & Kajiya ("Ray tracing complex
scenes", SIGGRAPH 1986) for boxes and the quadratic ray/quadric tests for spheres and cylinders.
It is vectorised over all pixels of a batch of images: each primitive is projected to a
conservative screen rectangle and only tested against the pixel tiles that rectangle
overlaps (8x8 tiles: the binning of tiled rasterisers, Fuchs et al., "Pixel-Planes 5", 1989); the
closest hit per pixel is merged with a scatter-min. Culling is exact (it never changes a pixel),
which ``render_batch(..., cull=False)`` lets a test check.

Shading is Lambertian (a point light near the ceiling, a directional "sun" and ambient light)
on solid procedural textures (Perlin, "An image synthesizer", SIGGRAPH 1985, in spirit: stripes,
checkers and sums of sinusoids evaluated at the 3-D hit point), plus sensor noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

CLASSES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture",
           "sofa", "table", "tv", "wall", "window")
BED, BOOKS, CEILING, CHAIR, FLOOR, FURNITURE, OBJECTS, PICTURE, SOFA, TABLE, TV, WALL, WINDOW = (
    range(13))
ROOM_TYPES = ("bedroom", "living_room", "office", "dining_room")
HFOV_DEG = 60.0

# primitive kinds
ROOM, BOX, SPHERE, CYL = 0, 1, 2, 3
# textures
PLAIN, STRIPES, CHECKER, NOISE, BANDS, PICTURE_TEX, WINDOW_TEX, SCREEN = range(8)
# columns of a primitive row: kind, class, geometry (6), bounding box (6), material (13), object
KIND, CLS, GEOM, BBOX, C1, C2, TEX, FREQ, DIR, FRAME, EMIT, OBJ = (0, 1, 2, 8, 14, 17, 20, 21, 22,
                                                                  25, 26, 27)
NCOL = 28
N_ROOM = 6  # rows 0..5 of every scene are the room's faces: x=0, x=W, floor, ceiling, z=0, z=D


@dataclass
class Scene:
    """One sampled scene: primitive table, camera and lighting (all float64 NumPy)."""

    prims: np.ndarray  # [6 + K, NCOL]; rows 0..5 are the room faces
    room: np.ndarray  # (3,) width (x), height (y), depth (z)
    cam: np.ndarray  # (3,) camera centre, world frame
    rot: np.ndarray  # (3, 3) camera-to-world rotation
    light: np.ndarray  # (8,) point light xyz, intensity, sun intensity, ambient, gain, noise std
    sun: np.ndarray  # (3,) unit direction the sunlight travels
    tint: np.ndarray  # (3,) colour of the light
    room_type: int
    noise_seed: int


# ----------------------------------------------------------------------------- scene sampling


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _mat(c1, c2=None, tex: int = PLAIN, freq: float = 0.0, d=(1.0, 0.0, 0.0), frame: float = 0.0,
         emit: float = 0.0) -> np.ndarray:
    """Material columns: base and second colour (colours saturate at shading time), texture,
    its frequency (1/m) and direction, frame width (m), emission flag."""
    c1 = np.asarray(c1, float)
    return np.concatenate([c1, c1 * 0.85 if c2 is None else c2, [tex, freq], d, [frame, emit]])


# a quarter turn k about y: where the local +x and +z axes go in the world's (x, z)
_QUARTER = (((1, 0), (0, 1)), ((0, -1), (1, 0)), ((-1, 0), (0, -1)), ((0, 1), (-1, 0)))


class _Builder:
    """Collects primitives of one scene; objects are built in a local frame facing +z."""

    def __init__(self, rng: np.random.Generator, size: np.ndarray) -> None:
        self.rng, self.size = rng, size
        self.rows: list[np.ndarray] = []
        self.objects = 0  # object ids 1, 2, ...; 0 is the room (stuff, not an object)
        self.feet: list[tuple[float, float, float, float]] = []  # occupied floor rectangles
        self.wall_items: list[tuple[int, float, float, float, float]] = []

    def add(self, kind: int, cls: int, geom, bbox, mat: np.ndarray, obj: int | None = None) -> None:
        """Add one primitive; ``obj`` is its object id (None: a new object of its own)."""
        if obj is None:
            obj = self.new_object()
        row = np.zeros(NCOL)
        row[KIND], row[CLS] = kind, cls
        row[GEOM:GEOM + len(geom)] = geom
        row[BBOX:BBOX + 6] = bbox
        row[C1:C1 + len(mat)] = mat
        row[OBJ] = obj
        self.rows.append(row)

    def new_object(self) -> int:
        self.objects += 1
        return self.objects

    # an item is a list of parts in its local frame: ("box", lo, hi, cls, mat),
    # ("sph", centre, r, cls, mat), ("cyl", (x, z), r, y0, y1, cls, mat), each optionally
    # followed by an object tag (see _tag). The untagged parts of one class form one object
    # (a bed's frame, cover and pillow; a table's top and legs); tagged parts form the object
    # of their tag (each cup on a table, each row of books, each chair around a table).
    def place(self, parts: list, x: float, z: float, k: int, check: bool = True,
              clearance: float = 0.08) -> bool:
        """Rotate ``parts`` by ``k`` quarter turns about y, move them to ``(x, z)`` and add them
        unless their footprint leaves the room or overlaps an occupied rectangle."""
        (rx, rz), (fx, fz) = _QUARTER[k]

        def xz(px: float, pz: float) -> tuple[float, float]:
            return x + px * rx + pz * fx, z + px * rz + pz * fz

        def rect(x0: float, x1: float, z0: float, z1: float) -> tuple[float, ...]:
            (ax, az), (bx, bz) = xz(x0, z0), xz(x1, z1)
            return min(ax, bx), max(ax, bx), min(az, bz), max(az, bz)

        if check:  # footprint first: most rejected placements cost no more than this
            ext = [(p[1][0], p[2][0], p[1][2], p[2][2]) if p[0] == "box" else
                   (p[1][0] - p[2], p[1][0] + p[2], p[1][-1] - p[2], p[1][-1] + p[2])
                   for p in parts]
            foot = rect(min(e[0] for e in ext), max(e[1] for e in ext),
                        min(e[2] for e in ext), max(e[3] for e in ext))
            w, _, d = self.size
            if foot[0] < 0.02 or foot[2] < 0.02 or foot[1] > w - 0.02 or foot[3] > d - 0.02:
                return False
            for g in self.feet:
                if (foot[0] < g[1] + clearance and g[0] < foot[1] + clearance
                        and foot[2] < g[3] + clearance and g[2] < foot[3] + clearance):
                    return False
            self.feet.append(foot)
        objects: dict = {}
        for part in parts:
            n = 7 if part[0] == "cyl" else 5
            key = part[n] if len(part) > n else ("class", part[n - 2])
            if key not in objects:
                objects[key] = self.new_object()
            obj = objects[key]
            part = part[:n]
            if part[0] == "box":
                _, lo, hi, cls, mat = part
                x0, x1, z0, z1 = rect(lo[0], hi[0], lo[2], hi[2])
                box = (x0, lo[1], z0, x1, hi[1], z1)
                mat = mat.copy()
                dx, dz = mat[DIR - C1], mat[DIR - C1 + 2]
                mat[DIR - C1], mat[DIR - C1 + 2] = dx * rx + dz * fx, dx * rz + dz * fz
                self.add(BOX, cls, box, box, mat, obj)
            elif part[0] == "sph":
                _, (cx, cy, cz), rad, cls, mat = part
                cx, cz = xz(cx, cz)
                self.add(SPHERE, cls, (cx, cy, cz, rad),
                         (cx - rad, cy - rad, cz - rad, cx + rad, cy + rad, cz + rad), mat, obj)
            else:
                _, (cx, cz), rad, y0, y1, cls, mat = part
                cx, cz = xz(cx, cz)
                self.add(CYL, cls, (cx, cz, rad, y0, y1),
                         (cx - rad, y0, cz - rad, cx + rad, y1, cz + rad), mat, obj)
        return True

    def against_wall(self, parts: list, half_w: float, half_d: float, tries: int = 12) -> bool:
        """Place an object with its back (local -z) against a random wall."""
        w, _, d = self.size
        for _ in range(tries):
            wall = int(self.rng.integers(4))
            length = w if wall % 2 == 0 else d
            if length < 2 * half_w + 0.1:
                continue
            s = self.rng.uniform(half_w + 0.05, length - half_w - 0.05)
            off = half_d + self.rng.uniform(0.03, 0.08)
            x, z = [(s, off), (off, s), (s, d - off), (w - off, s)][wall]
            if self.place(parts, x, z, wall):
                return True
        return False

    def free(self, parts: list, half: float, tries: int = 12) -> bool:
        """Place an object of footprint radius ``half`` anywhere in the room."""
        w, _, d = self.size
        for _ in range(tries):
            if w < 2 * half + 0.2 or d < 2 * half + 0.2:
                return False
            x = self.rng.uniform(half + 0.1, w - half - 0.1)
            z = self.rng.uniform(half + 0.1, d - half - 0.1)
            if self.place(parts, x, z, int(self.rng.integers(4))):
                return True
        return False

    def on_wall(self, cls: int, width: float, height: float, y0: float, thick: float,
                mat: np.ndarray, tries: int = 10) -> bool:
        """A thin box slightly in front of a wall (picture, window, tv)."""
        w, _, d = self.size
        for _ in range(tries):
            wall = int(self.rng.integers(4))
            length = w if wall % 2 == 0 else d
            if length < width + 0.3:
                continue
            s0 = self.rng.uniform(0.15, length - width - 0.15)
            s1, y1 = s0 + width, y0 + height
            if any(g[0] == wall and s0 < g[2] + 0.1 and g[1] < s1 + 0.1 and y0 < g[4] + 0.1
                   and g[3] < y1 + 0.1 for g in self.wall_items):
                continue
            self.wall_items.append((wall, s0, s1, y0, y1))
            a, b = -0.01, thick  # the back face hides inside the wall
            lo, hi = [([s0, y0, a], [s1, y1, b]), ([a, y0, s0], [b, y1, s1]),
                      ([s0, y0, d - b], [s1, y1, d - a]), ([w - b, y0, s0], [w - a, y1, s1])][wall]
            self.add(BOX, cls, [*lo, *hi], [*lo, *hi], mat)
            return True
        return False


class _Tag:
    """Marks parts of one object (identity only; drawing one consumes no random numbers)."""


def _tag(parts: list, tag: _Tag | None = None) -> list:
    """``parts`` as one object: each part followed by the same fresh tag."""
    tag = _Tag() if tag is None else tag
    return [(*p, tag) for p in parts]


def _wood(rng: np.random.Generator) -> np.ndarray:
    base = [(0.55, 0.35, 0.2), (0.68, 0.5, 0.32), (0.38, 0.24, 0.14), (0.8, 0.66, 0.48),
            (0.28, 0.18, 0.12)][rng.integers(5)]
    return np.clip(np.array(base) + rng.normal(0, 0.04, 3), 0, 1)


def _fabric(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(), rng.uniform(0.2, 0.7), rng.uniform(0.3, 0.85))


def _neutral(rng: np.random.Generator) -> np.ndarray:
    v = rng.choice([rng.uniform(0.1, 0.25), rng.uniform(0.75, 0.95), rng.uniform(0.4, 0.6)])
    return np.clip(v + rng.normal(0, 0.02, 3), 0, 1)


def _wood_mat(rng: np.random.Generator, freq=(6.0, 14.0)) -> np.ndarray:
    c = _wood(rng)
    return _mat(c, c * rng.uniform(0.7, 0.85), STRIPES, rng.uniform(*freq), (1.0, 0.0, 0.0))


def _furniture_mat(rng: np.random.Generator) -> np.ndarray:
    return _wood_mat(rng) if rng.uniform() < 0.6 else _mat(_neutral(rng))


def _legs(x: float, z: float, h: float, t: float, cls: int, mat: np.ndarray) -> list:
    return [("box", (sx * x - t / 2, 0.0, sz * z - t / 2), (sx * x + t / 2, h, sz * z + t / 2),
             cls, mat) for sx in (-1, 1) for sz in (-1, 1)]


def _table(rng, w, d, h, mat=None) -> list:
    mat = _wood_mat(rng) if mat is None and rng.uniform() < 0.7 else (
        mat if mat is not None else _mat(_neutral(rng)))
    top = ("box", (-w / 2, h - 0.04, -d / 2), (w / 2, h, d / 2), TABLE, mat)
    return [top, *_legs(w / 2 - 0.05, d / 2 - 0.05, h - 0.04, 0.05, TABLE, mat)]


def _chair(rng, mat=None) -> list:
    if mat is None:
        mat = _wood_mat(rng) if rng.uniform() < 0.5 else _mat(_fabric(rng))
    s, h = rng.uniform(0.4, 0.5), rng.uniform(0.42, 0.48)
    return [("box", (-s / 2, h - 0.05, -s / 2), (s / 2, h, s / 2), CHAIR, mat),
            ("box", (-s / 2, h, -s / 2), (s / 2, h + rng.uniform(0.35, 0.5), -s / 2 + 0.05),
             CHAIR, mat),
            *_legs(s / 2 - 0.03, s / 2 - 0.03, h - 0.05, 0.04, CHAIR, mat)]


def _sofa(rng, w) -> list:
    m = _mat(_fabric(rng), None, NOISE, rng.uniform(3, 8))
    d, seat, back, arm = rng.uniform(0.8, 0.95), rng.uniform(0.4, 0.48), 0.85, 0.62
    return [("box", (-w / 2, 0.0, -d / 2), (w / 2, seat, d / 2), SOFA, m),
            ("box", (-w / 2, 0.0, -d / 2), (w / 2, back, -d / 2 + 0.22), SOFA, m),
            ("box", (-w / 2, 0.0, -d / 2), (-w / 2 + 0.16, arm, d / 2), SOFA, m),
            ("box", (w / 2 - 0.16, 0.0, -d / 2), (w / 2, arm, d / 2), SOFA, m)]


def _bed(rng) -> tuple[list, float, float]:
    w, l = rng.choice([0.9, 1.4, 1.6, 1.8]) + rng.uniform(-0.05, 0.05), rng.uniform(1.95, 2.1)
    frame = _wood_mat(rng)
    sheet = rng.choice([PLAIN, STRIPES, CHECKER])
    cover = _mat(_fabric(rng), _fabric(rng) if sheet else None, sheet, rng.uniform(3, 8),
                 (1.0, 0.0, 0.0))
    pillow = _mat(np.full(3, rng.uniform(0.8, 0.95)))
    parts = [("box", (-w / 2, 0.0, -l / 2), (w / 2, 0.3, l / 2), BED, frame),
             ("box", (-w / 2 - 0.02, 0.3, -l / 2), (w / 2 + 0.02, 0.52, l / 2 + 0.02), BED, cover),
             ("box", (-w / 2, 0.0, -l / 2 - 0.06), (w / 2, rng.uniform(0.8, 1.1), -l / 2), BED,
              frame),
             ("box", (-w / 2 + 0.1, 0.52, -l / 2 + 0.05), (w / 2 - 0.1, 0.64, -l / 2 + 0.4), BED,
              pillow)]
    return parts, w / 2 + 0.02, l / 2 + 0.06


def _small_objects(rng, x0, x1, z0, z1, y, count) -> list:
    """Spheres, cups, boxes and book stacks standing on a surface at height ``y``."""
    parts = []
    for _ in range(count):
        x, z = rng.uniform(x0, x1), rng.uniform(z0, z1)
        m = _mat(_hsv(rng.uniform(), rng.uniform(0.4, 0.9), rng.uniform(0.5, 0.95)))
        kind = rng.integers(4)
        if kind == 0:
            r = rng.uniform(0.05, 0.12)
            parts.append(("sph", (x, y + r, z), r, OBJECTS, m))
        elif kind == 1:
            parts.append(("cyl", (x, z), rng.uniform(0.04, 0.1), y, y + rng.uniform(0.1, 0.35),
                          OBJECTS, m))
        elif kind == 2:
            s = rng.uniform(0.06, 0.15)
            parts.append(("box", (x - s, y, z - s), (x + s, y + rng.uniform(0.05, 0.2), z + s),
                          OBJECTS, m))
        else:
            a, b = rng.uniform(0.1, 0.16), rng.uniform(0.12, 0.2)
            parts.append(("box", (x - a, y, z - b), (x + a, y + rng.uniform(0.04, 0.15), z + b),
                          BOOKS, _mat(_fabric(rng), None, BANDS, rng.uniform(30, 50),
                                      (0.0, 1.0, 0.0))))
    return [q for p in parts for q in _tag([p])]  # every thing is an object of its own


def _bookshelf(rng) -> tuple[list, float, float]:
    w, h, d = rng.uniform(0.6, 1.2), rng.uniform(1.0, 2.0), 0.32
    parts = [("box", (-w / 2, 0.0, -d / 2), (w / 2, h, d / 2), FURNITURE, _furniture_mat(rng))]
    y = 0.12
    while y + 0.3 < h:  # rows of book spines just in front of the shelf's face
        top = y + rng.uniform(0.2, 0.28)
        x0, x1 = -w / 2 + 0.04, rng.uniform(0.0, w / 2 - 0.04)
        parts += _tag([("box", (x0, y, d / 2 - 0.02), (x1, top, d / 2 + 0.015), BOOKS,
                        _mat(_fabric(rng), None, BANDS, rng.uniform(18, 30)))])  # one per row
        y += 0.36
    return parts, w / 2, d / 2 + 0.02


def _cabinet(rng) -> tuple[list, float, float]:
    w, d = rng.uniform(0.5, 1.8), rng.uniform(0.4, 0.6)
    h = rng.choice([rng.uniform(0.45, 1.0), rng.uniform(1.7, 2.2)])
    parts = [("box", (-w / 2, 0.0, -d / 2), (w / 2, h, d / 2), FURNITURE, _furniture_mat(rng))]
    if h < 1.2 and rng.uniform() < 0.7:
        parts += _small_objects(rng, -w / 2 + 0.15, w / 2 - 0.15, -d / 2 + 0.15, d / 2 - 0.15, h,
                                int(rng.integers(1, 3)))
    return parts, w / 2, d / 2


def _tv(rng, w: float) -> np.ndarray:
    return _mat(np.full(3, rng.uniform(0.02, 0.08)), np.full(3, rng.uniform(0.05, 0.3)), SCREEN,
                0.0, frame=0.03 * w)


def _tv_stand(rng) -> tuple[list, float, float]:
    w, h, d = rng.uniform(1.0, 1.8), rng.uniform(0.4, 0.6), 0.45
    tw = rng.uniform(0.7, min(1.3, w))
    parts = [("box", (-w / 2, 0.0, -d / 2), (w / 2, h, d / 2), FURNITURE, _furniture_mat(rng)),
             ("box", (-tw / 2, h + 0.02, -0.04), (tw / 2, h + 0.02 + 0.57 * tw, 0.02), TV,
              _tv(rng, tw)),
             ("box", (-0.1, h, -0.08), (0.1, h + 0.03, 0.06), TV, _tv(rng, 0.3))]
    return parts, w / 2, d / 2


def _plant(rng) -> tuple[list, float, float]:
    r = rng.uniform(0.12, 0.22)
    h = rng.uniform(0.25, 0.5)
    return [("cyl", (0.0, 0.0), r, 0.0, h, OBJECTS, _mat(_hsv(rng.uniform(), 0.5, 0.6))),
            ("sph", (0.0, h + r * 1.3, 0.0), r * 1.5, OBJECTS,
             _mat(_hsv(rng.uniform(0.22, 0.4), 0.6, 0.45), None, NOISE, 25.0))], r * 1.5, r * 1.5


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one room: size, type, furniture, wall items, camera pose and lighting."""
    size = np.array([rng.uniform(3.0, 5.0), rng.uniform(2.4, 3.0), rng.uniform(3.0, 5.5)])
    w, hr, d = size
    room_type = int(rng.integers(4))
    b = _Builder(rng, size)

    # the camera first, so that furniture keeps out of its way
    cam = np.array([rng.uniform(0.6, w - 0.6), rng.uniform(1.25, 1.7), rng.uniform(0.6, d - 0.6)])
    b.feet.append((cam[0] - 0.35, cam[0] + 0.35, cam[2] - 0.35, cam[2] + 0.35))

    # room surfaces
    fk = rng.integers(3)
    if fk == 0:
        c = _wood(rng)
        floor = _mat(c, c * 0.75, STRIPES, rng.uniform(5, 9), (1.0, 0.0, 0.0) if rng.uniform() < .5
                     else (0.0, 0.0, 1.0))
    elif fk == 1:
        c = _neutral(rng) * rng.uniform(0.8, 1.0)
        floor = _mat(c, c * rng.uniform(0.6, 0.9), CHECKER, rng.uniform(1.7, 3.3))
    else:
        floor = _mat(_fabric(rng) * 0.8, None, NOISE, rng.uniform(4, 12))
    wc = _hsv(rng.uniform(), rng.uniform(0.05, 0.35), rng.uniform(0.65, 0.95))
    wk = rng.choice([PLAIN, PLAIN, STRIPES, NOISE])
    wall = _mat(wc, wc * rng.uniform(0.8, 0.95), wk, rng.uniform(3, 8),
                (2 ** -0.5, 0.0, 2 ** -0.5))
    ceiling = _mat(np.clip(rng.uniform(0.8, 0.95) + rng.normal(0, 0.02, 3), 0, 1))
    geom, bbox = np.concatenate([np.zeros(3), size]), np.concatenate([np.zeros(3), size])
    for cls, mat in ((WALL, wall), (WALL, wall), (FLOOR, floor), (CEILING, ceiling), (WALL, wall),
                     (WALL, wall)):
        b.add(ROOM, cls, geom, bbox, mat, obj=0)

    # the furniture that makes the room type
    if room_type == 0:  # bedroom
        parts, hw, hd = _bed(rng)
        b.against_wall(parts, hw, hd, tries=30)
        if rng.uniform() < 0.3:
            tw = rng.uniform(0.7, 1.2)
            b.on_wall(TV, tw, 0.57 * tw, rng.uniform(0.9, 1.3), 0.06, _tv(rng, tw))
        for _ in range(rng.integers(0, 3)):
            s = rng.uniform(0.4, 0.55)
            top = rng.uniform(0.45, 0.6)
            stand = [("box", (-s / 2, 0.0, -s / 2), (s / 2, top, s / 2), FURNITURE,
                      _furniture_mat(rng))]
            stand += _small_objects(rng, -s / 4, s / 4, -s / 4, s / 4, top, 1)
            b.against_wall(stand, s / 2, s / 2)
        if rng.uniform() < 0.7:
            b.against_wall(*_cabinet(rng))
    elif room_type == 1:  # living room
        sw = rng.uniform(1.6, 2.4)
        b.against_wall(_sofa(rng, sw), sw / 2, 0.48, tries=30)
        if rng.uniform() < 0.6:
            b.free(_sofa(rng, rng.uniform(0.8, 1.0)), 0.5)
        tw, td = rng.uniform(0.8, 1.2), rng.uniform(0.5, 0.7)
        table = _table(rng, tw, td, rng.uniform(0.4, 0.5))
        table += _small_objects(rng, -tw / 3, tw / 3, -td / 3, td / 3, table[0][2][1], 2)
        b.free(table, max(tw, td) / 2)
        if rng.uniform() < 0.5:
            b.against_wall(*_tv_stand(rng))
        else:
            tw = rng.uniform(0.8, 1.4)
            b.on_wall(TV, tw, 0.57 * tw, rng.uniform(0.9, 1.3), 0.06, _tv(rng, tw))
        if rng.uniform() < 0.6:
            b.against_wall(*_bookshelf(rng))
    elif room_type == 2:  # office
        tw, td = rng.uniform(1.1, 1.6), rng.uniform(0.6, 0.75)
        desk = _table(rng, tw, td, rng.uniform(0.72, 0.76))
        top = desk[0][2][1]
        desk += _small_objects(rng, -tw / 2 + 0.15, tw / 2 - 0.15, td / 10, td / 2 - 0.12, top,
                               int(rng.integers(1, 3)))
        if rng.uniform() < 0.75:  # a monitor
            mw = rng.uniform(0.45, 0.65)
            desk.append(("box", (-mw / 2, top + 0.12, -td / 2 + 0.12),
                         (mw / 2, top + 0.12 + 0.6 * mw, -td / 2 + 0.15), TV, _tv(rng, mw)))
            desk.append(("box", (-0.04, top, -td / 2 + 0.1), (0.04, top + 0.12, -td / 2 + 0.16),
                         TV, _tv(rng, 0.3)))
        b.against_wall(desk, tw / 2, td / 2)
        for _ in range(rng.integers(1, 3)):
            b.free(_chair(rng), 0.3)
        for _ in range(rng.integers(1, 3)):
            b.against_wall(*_bookshelf(rng))
        if rng.uniform() < 0.5:
            b.against_wall(*_cabinet(rng))
    else:  # dining room
        tw, td, th = rng.uniform(1.1, 1.8), rng.uniform(0.8, 1.0), rng.uniform(0.72, 0.77)
        if rng.uniform() < 0.3:  # a round table on a pedestal
            r = td / 2 + 0.1
            tmat = _wood_mat(rng)
            group = [("cyl", (0.0, 0.0), r, th - 0.04, th, TABLE, tmat),
                     ("cyl", (0.0, 0.0), 0.07, 0.0, th - 0.04, TABLE, tmat)]
            tw = td = 2 * r
        else:
            group = _table(rng, tw, td, th)
        group += _small_objects(rng, -tw / 4, tw / 4, -td / 4, td / 4, th, int(rng.integers(1, 4)))
        cm = _wood_mat(rng) if rng.uniform() < 0.6 else _mat(_fabric(rng))
        chairs = []
        for side in rng.permutation(4)[: rng.integers(2, 5)]:
            gap = (td if side % 2 == 0 else tw) / 2 + rng.uniform(0.05, 0.25)
            # a chair in the table's frame, turned to face the table
            cx, cz = [(0.0, gap), (gap, 0.0), (0.0, -gap), (-gap, 0.0)][side]
            (rx, rz), (fx, fz) = _QUARTER[(side + 2) % 4]
            chair = _Tag()
            for p in _chair(rng, cm):
                (x0, _, z0), (x1, _, z1) = p[1], p[2]
                ax, az = cx + x0 * rx + z0 * fx, cz + x0 * rz + z0 * fz
                bx, bz = cx + x1 * rx + z1 * fx, cz + x1 * rz + z1 * fz
                chairs.append(("box", (min(ax, bx), p[1][1], min(az, bz)),
                               (max(ax, bx), p[2][1], max(az, bz)), p[3], p[4], chair))
        # fewer chairs, then none, where the whole set does not fit
        for keep in (len(chairs), 12, 0):
            if b.free(group + chairs[:keep], max(tw, td) / 2 + 0.6 * (keep > 0), tries=10):
                break
        if rng.uniform() < 0.8:
            b.against_wall(*_cabinet(rng))

    # things any room may hold
    for _ in range(rng.integers(2, 6)):
        u = rng.uniform()
        if u < 0.25:
            b.free(_chair(rng), 0.3)
        elif u < 0.5:
            b.against_wall(*_plant(rng))
        elif u < 0.7:  # boxes, balls and bins on the floor
            b.free(_small_objects(rng, -0.2, 0.2, -0.2, 0.2, 0.0, int(rng.integers(1, 3))), 0.35)
        elif u < 0.85:
            b.against_wall(*_bookshelf(rng))
        else:
            b.against_wall(*_cabinet(rng))
    for _ in range(rng.integers(1, 3)):
        ww, wh = rng.uniform(0.7, 1.6), rng.uniform(0.9, 1.4)
        sky = _hsv(rng.uniform(0.52, 0.62), rng.uniform(0.05, 0.45), rng.uniform(0.85, 1.0))
        b.on_wall(WINDOW, ww, wh, rng.uniform(0.8, min(1.1, hr - wh - 0.1)), 0.03,
                  _mat(sky, np.full(3, rng.uniform(0.75, 0.95)), WINDOW_TEX, 0.0,
                       frame=rng.uniform(0.04, 0.07), emit=1.0))
    for _ in range(rng.integers(1, 5)):
        pw, ph = rng.uniform(0.4, 1.2), rng.uniform(0.3, 0.9)
        frame = _wood(rng) if rng.uniform() < 0.5 else _neutral(rng)
        b.on_wall(PICTURE, pw, ph, rng.uniform(0.9, min(1.6, hr - ph - 0.1)), 0.025,
                  _mat(rng.uniform(0, 1, 3), frame, PICTURE_TEX, rng.uniform(1.0, 4.0),
                       (rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), 0.0),
                       frame=rng.uniform(0.02, 0.06)))
    # a ceiling lamp: a flat glowing cylinder
    lx, lz = rng.uniform(0.8, w - 0.8), rng.uniform(0.8, d - 0.8)
    b.place([("cyl", (0.0, 0.0), rng.uniform(0.15, 0.3), hr - rng.uniform(0.05, 0.12), hr + 0.01,
              OBJECTS, _mat(np.full(3, 0.97), emit=1.0))], lx, lz, 0, check=False)

    # camera pose: mostly look at a piece of furniture (as people photograph rooms), else at a
    # random point of the room, at least 1 m away
    for _ in range(20):
        if len(b.feet) > 1 and rng.uniform() < 0.85:
            g = b.feet[1 + rng.integers(len(b.feet) - 1)]
            tx, tz, ty = (g[0] + g[1]) / 2, (g[2] + g[3]) / 2, rng.uniform(0.1, 0.8)
        else:
            tx, tz, ty = rng.uniform(0.3, w - 0.3), rng.uniform(0.3, d - 0.3), rng.uniform(0.3, 2.2)
        dist = math.hypot(tx - cam[0], tz - cam[2])
        if dist > 1.0:
            break
    yaw = math.atan2(tx - cam[0], tz - cam[2]) + rng.normal(0, 0.25)
    pitch = float(np.clip(math.atan2(cam[1] - ty, dist) + rng.normal(0, 0.1), -0.25, 0.7))
    rot = _camera_rotation(yaw, pitch, float(np.clip(rng.normal(0, 0.035), -0.08, 0.08)))

    light = np.array([lx, hr - 0.2, lz, rng.uniform(0.6, 1.1), rng.uniform(0.0, 0.35),
                      rng.uniform(0.25, 0.45), rng.uniform(0.85, 1.15), rng.uniform(0.004, 0.02)])
    sun = np.array([rng.normal(), -rng.uniform(0.5, 1.5), rng.normal()])
    tint = np.clip(1.0 + rng.normal(0, 0.05, 3), 0.85, 1.1)
    return Scene(np.stack(b.rows), size, cam, rot, light, sun / np.linalg.norm(sun), tint,
                 room_type, int(rng.integers(2**31)))


def _camera_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-to-world rotation: yaw about world up, then pitch down and roll in the camera."""
    cy, sy, cp, sp, cr, sr = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                              math.cos(roll), math.sin(roll))
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_0 = np.diag([-1.0, -1.0, 1.0])  # camera (x right, y down, z fwd) -> world (y up) at yaw 0
    r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])  # +pitch tilts z towards +y (down)
    r_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return r_yaw @ r_0 @ r_pitch @ r_roll


def focal(width: int) -> float:
    """Focal length in pixels of the pinhole camera (horizontal field of view ``HFOV_DEG``)."""
    return width / 2 / math.tan(math.radians(HFOV_DEG) / 2)


# ----------------------------------------------------------------------------- ray casting


def _hit_box(o, inv, lo, hi):
    """Slab test (Kay & Kajiya 1986): ``o, lo, hi`` [M,3,1], ``inv`` = 1/d [M,3,S] -> entry t
    [M,S] (inf: missed). Axis-major layout keeps every operation on contiguous rows."""
    t0 = (lo - o) * inv
    t1 = (hi - o) * inv
    near = torch.minimum(t0, t1)
    far = torch.maximum(t0, t1, out=t1)
    tn = torch.maximum(torch.maximum(near[:, 0], near[:, 1]), near[:, 2])
    tf = torch.minimum(torch.minimum(far[:, 0], far[:, 1]), far[:, 2])
    return tn.masked_fill_((tn > tf) | (tn <= 0), torch.inf)


def _hit_sphere(o, d, c, r):
    """Nearest root of |o + t d - c|^2 = r^2 for rays from outside; ``d`` [M,3,S]."""
    oc = o - c
    b = (oc * d).sum(1)
    dd = (d * d).sum(1)
    disc = b * b - dd * ((oc * oc).sum(1) - r * r)
    t = (-b - disc.clamp_min(0).sqrt()) / dd
    return torch.where((disc > 0) & (t > 0), t, torch.inf)


def _hit_cylinder(o, d, g):
    """Vertical capped cylinder ``g = (cx, cz, r, y0, y1)`` [M,5]: side quadratic and caps."""
    cx, cz, r, y0, y1 = g[:, :5, None].unbind(1)
    ox, oy, oz = o.unbind(1)
    dx, dy, dz = d.unbind(1)
    px, pz = ox - cx, oz - cz
    a = dx * dx + dz * dz
    b = px * dx + pz * dz
    disc = b * b - a * (px * px + pz * pz - r * r)
    ts = (-b - disc.clamp_min(0).sqrt()) / a
    ys = oy + ts * dy
    side = torch.where((disc > 0) & (ts > 0) & (ys >= y0) & (ys <= y1), ts, torch.inf)
    # a cap is visible only from beyond its plane
    plane = torch.where(oy > y1, y1, y0)
    tc = (plane - oy) / dy
    qx, qz = px + tc * dx, pz + tc * dz
    ok = ((oy > y1) | (oy < y0)) & (tc > 0) & (qx * qx + qz * qz <= r * r)
    return torch.minimum(side, torch.where(ok, tc, torch.inf))


def _key(t: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    key = t.view(torch.int32).to(torch.int64)
    key <<= 16
    key |= low
    return key


def _tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """[B, Hp, Wp, ...] -> [B, T, tile*tile, ...] (row-major tiles of row-major pixels)."""
    b, hp, wp = x.shape[:3]
    x = x.reshape(b, hp // tile, tile, wp // tile, tile, *x.shape[3:]).transpose(2, 3)
    return x.reshape(b, (hp // tile) * (wp // tile), tile * tile, *x.shape[5:])


def _untile(x: torch.Tensor, hp: int, wp: int, tile: int) -> torch.Tensor:
    b = x.shape[0]
    x = x.reshape(b, hp // tile, wp // tile, tile, tile, *x.shape[3:]).transpose(2, 3)
    return x.reshape(b, hp, wp, *x.shape[5:])


_CORNERS = torch.tensor([[i >> a & 1 for a in range(3)] for i in range(8)], dtype=torch.bool)
_EDGES = torch.tensor([(i, i | 1 << a) for i in range(8) for a in range(3) if not i >> a & 1])
_NEAR = 1e-3  # clipping plane (m); the sampler keeps every primitive 0.35 m from the camera


def _screen_tiles(bbox, cam, rot, f, h, w, tile, nty, ntx):
    """Which tiles each primitive's bounding box can cover: bool [B, K, T], conservative.

    The box is clipped by the plane z = _NEAR (its corners in front plus the points where its
    edges cross the plane), so a box reaching behind the camera covers only the screen region
    that its front part projects to.
    """
    corners = torch.where(_CORNERS, bbox[:, :, None, 3:], bbox[:, :, None, :3])  # [B,K,8,3]
    pc = ((corners - cam[:, None, None, :])[..., :, None] * rot[:, None, None]).sum(-2)  # R^T
    pa, pb = pc[..., _EDGES[:, 0], :], pc[..., _EDGES[:, 1], :]  # [B,K,12,3]
    za, zb = pa[..., 2:], pb[..., 2:]
    cross = pa + (pb - pa) * ((_NEAR - za) / (zb - za))
    pts = torch.cat([pc, cross], -2)  # [B,K,20,3]
    ok = torch.cat([pc[..., 2] >= _NEAR, ((za - _NEAR) * (zb - _NEAR) < 0)[..., 0]], -1)
    z = pts[..., 2].clamp_min(_NEAR)
    u = f * pts[..., 0] / z + w / 2  # pixel coordinates (pixel centres at +0.5)
    v = f * pts[..., 1] / z + h / 2
    inf = torch.tensor(torch.inf)
    u0, u1 = torch.where(ok, u, inf).amin(-1) - 2, torch.where(ok, u, -inf).amax(-1) + 2
    v0, v1 = torch.where(ok, v, inf).amin(-1) - 2, torch.where(ok, v, -inf).amax(-1) + 2
    ty = torch.arange(nty).repeat_interleave(ntx) * tile
    tx = torch.arange(ntx).repeat(nty) * tile
    return ((tx <= u1[..., None]) & (tx + tile >= u0[..., None]) & (ty <= v1[..., None])
            & (ty + tile >= v0[..., None]) & ok.any(-1)[..., None])


def render_batch(scenes: list[Scene], height: int, width: int, cull: bool = True,
                 tile: int = 8, meta: bool = False) -> dict[str, torch.Tensor]:
    """Ray-cast a batch of scenes: ``image`` uint8 [B,3,H,W], ``semseg`` (float class ids)
    [B,H,W], ``depth`` [B,H,W], ``normals`` [B,3,H,W], ``instance`` [B,H,W] (the primitive
    hit), ``objects`` [B,H,W] (float object ids, 0 = the room) and, with ``meta``,
    ``surface`` and ``planar`` (see :func:`mtlcv.data.scenes.render`).

    Every operation is elementwise per image or an exact min, so an image does not depend on
    the batch it is rendered in.
    """
    bsz = len(scenes)
    h, w = height, width
    hp, wp = -(-h // tile) * tile, -(-w // tile) * tile
    f = focal(w)
    kmax = max(len(s.prims) for s in scenes)
    table = torch.zeros(bsz, kmax, NCOL, dtype=torch.float32)
    for i, s in enumerate(scenes):
        table[i, : len(s.prims)] = torch.from_numpy(s.prims)
        table[i, len(s.prims):, KIND] = -1
    cam = torch.tensor(np.stack([s.cam for s in scenes]), dtype=torch.float32)
    rot = torch.tensor(np.stack([s.rot for s in scenes]), dtype=torch.float32)
    size = torch.tensor(np.stack([s.room for s in scenes]), dtype=torch.float32)

    # rays through pixel centres; unnormalised with camera-z = 1, so that t is the depth
    xs = (torch.arange(wp, dtype=torch.float32) + 0.5 - w / 2) / f
    ys = (torch.arange(hp, dtype=torch.float32) + 0.5 - h / 2) / f
    dc = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None], torch.ones(1, 1)), -1)
    rr = rot[:, None, None]  # [B,1,1,3,3]
    d = (rr[..., 0] * dc[..., 0, None] + rr[..., 1] * dc[..., 1, None] + rr[..., 2])  # [B,Hp,Wp,3]
    d = torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)  # keep 1/d finite
    inv = 1.0 / d
    o = cam[:, None, None, :]

    # the room, seen from inside: the nearest exit through one of its six faces
    t_exit = torch.maximum(-o * inv, (size[:, None, None, :] - o) * inv)
    t_room, axis = t_exit.min(-1)
    face = 2 * axis + (d.gather(-1, axis[..., None])[..., 0] > 0).long()

    nty, ntx = hp // tile, wp // tile
    nt, ns = nty * ntx, tile * tile
    # the closest hit per pixel by one scatter-min over 64-bit keys (depth bits, then 65535 -
    # primitive): positive floats order like their bit patterns, and ties go to the last primitive
    key = _key(_tiles(t_room, tile), 65535 - _tiles(face, tile)).reshape(-1)

    kind = table[..., KIND]
    prim = kind > ROOM
    mask = (_screen_tiles(table[..., BBOX:BBOX + 6], cam, rot, f, h, w, tile, nty, ntx) if cull
            else torch.ones(bsz, kmax, nt, dtype=torch.bool)) & prim[..., None]
    pb, pk, pt = mask.nonzero(as_tuple=True)
    if len(pb):
        dt = _tiles(d, tile).reshape(bsz * nt, ns, 3).transpose(1, 2).contiguous()
        it = _tiles(inv, tile).reshape(bsz * nt, ns, 3).transpose(1, 2).contiguous()
        ray = pb * nt + pt
        pkind = kind[pb, pk]
        ts, gs, rs = [], [], []
        for kd in (BOX, SPHERE, CYL):
            m = pkind == kd
            if not m.any():
                continue
            b_, k_, r_ = pb[m], pk[m], ray[m]
            g = table[b_, k_, GEOM:GEOM + 6]
            oo = cam.index_select(0, b_)[:, :, None]
            if kd == BOX:
                t = _hit_box(oo, it.index_select(0, r_), g[:, :3, None], g[:, 3:, None])
            elif kd == SPHERE:
                t = _hit_sphere(oo, dt.index_select(0, r_), g[:, :3, None], g[:, 3:4])
            else:
                t = _hit_cylinder(oo, dt.index_select(0, r_), g)
            ts.append(t)
            gs.append(k_)
            rs.append(r_)
        idx = (torch.cat(rs) * ns)[:, None] + torch.arange(ns)
        key.scatter_reduce_(0, idx.reshape(-1),
                            _key(torch.cat(ts), 65535 - torch.cat(gs)[:, None]).reshape(-1), "amin")
    key = _untile(key.view(bsz, nt, ns), hp, wp, tile)[:, :h, :w]
    depth = (key >> 16).to(torch.int32).view(torch.float32)
    inst = 65535 - (key & 65535)
    d = d[:, :h, :w]
    return _shade(table, inst, depth, d, cam, rot, scenes, meta)


_ROOM_N = torch.tensor([[1.0, -1, 0, 0, 0, 0], [0, 0, 1, -1, 0, 0], [0, 0, 0, 0, 1, -1]])


def _shade(table, inst, depth, d, cam, rot, scenes, meta):
    """Normals, classes and colours of the visible surface at every pixel.

    Per-pixel quantities are kept as rows of x, y, z (or r, g, b) components, [3, N], so that
    every operation runs on contiguous memory; rules for few pixels (curved primitives, each
    texture) run on those pixels only.
    """
    bsz, h, w = inst.shape
    npx, kmax = h * w, table.shape[1]
    ins = inst.reshape(-1)
    prim = (inst + torch.arange(bsz)[:, None, None] * kmax).reshape(-1)  # table row per pixel
    cols = table.view(-1, NCOL).t().contiguous()  # one row per attribute
    dd = d.permute(3, 0, 1, 2).reshape(3, -1).contiguous()
    p = (cam.t().contiguous()[:, :, None] + depth.reshape(1, bsz, npx) * dd.view(3, bsz, npx))
    p = p.view(3, -1)
    g = cols[GEOM:GEOM + 6].index_select(1, prim)

    # a room's face is its instance id (normal inwards); a box's face is its plane nearest to
    # the hit point (normal outwards)
    dlo, dhi = (p - g[:3]).abs(), (p - g[3:]).abs()
    near = torch.minimum(dlo, dhi)
    ax0 = (near[0] <= near[1]) & (near[0] <= near[2])
    ax1 = ~ax0 & (near[1] <= near[2])
    axes = torch.stack([ax0, ax1, ~(ax0 | ax1)])
    room = ins < N_ROOM
    n = torch.where(room, _ROOM_N.index_select(1, ins.clamp_max(N_ROOM - 1)),
                    axes * torch.where(dhi < dlo, 1.0, -1.0))
    kind = cols[KIND].index_select(0, prim)
    curved = (kind >= SPHERE).nonzero()[:, 0]  # spheres and cylinders: few pixels
    if len(curved):
        pi, gi, sph = p.index_select(1, curved), g.index_select(1, curved), kind[curved] == SPHERE
        v = pi - gi[:3]
        rx, rz = pi[0] - gi[0], pi[2] - gi[1]
        rho = torch.sqrt(rx * rx + rz * rz)
        dtop, dbot = (pi[1] - gi[4]).abs(), (pi[1] - gi[3]).abs()
        cap = torch.minimum(dtop, dbot) < (rho - gi[2]).abs()
        zero = torch.zeros_like(rho)
        ncyl = torch.where(cap, torch.stack([zero, torch.where(dtop < dbot, 1.0, -1.0), zero]),
                           torch.stack([rx / rho, zero, rz / rho]))
        n.index_copy_(1, curved, torch.where(sph, v / v.norm(dim=0), ncyl))
    n = torch.where((n * dd).sum(0) > 0, -n, n)  # face the camera

    rr = rot.permute(1, 2, 0)[..., None]  # [3, 3, B, 1]
    nv = n.view(3, bsz, npx)
    n_cam = nv[0] * rr[0] + nv[1] * rr[1] + nv[2] * rr[2]  # R^T n: [3, B, npx]
    albedo, emit = _texture(cols, prim, p, n)
    image = _light(albedo.view(3, bsz, npx), emit.view(bsz, npx), p.view(3, bsz, npx), nv,
                   scenes)
    out = {"image": image.view(3, bsz, h, w).transpose(0, 1),
           "semseg": cols[CLS].index_select(0, prim).view(bsz, h, w), "depth": depth,
           "normals": n_cam.view(3, bsz, h, w).transpose(0, 1), "instance": inst,
           "objects": cols[OBJ].index_select(0, prim).view(bsz, h, w)}
    if meta:  # faces 0..5: -x, +x, -y, +y, -z, +z; 6 cylinder side, 7 sphere, 8 cylinder cap
        face = torch.where(room, ins, 2 * (ax1 + 2 * axes[2]) + (axes & (dhi < dlo)).any(0))
        if len(curved):
            face[curved] = torch.where(sph, 7, torch.where(cap, 8, 6))
        out["surface"] = (ins * 16 + face).view(bsz, h, w)
        out["planar"] = ((face < 6) | (face == 8)).view(bsz, h, w)
    return out


def _frac(x: torch.Tensor) -> torch.Tensor:
    return x - torch.floor(x)


def _texture(cols, prim, p, n):
    """Albedo [3,N] and emission mask [N] from the solid texture of each pixel's material
    (``cols``: primitive attributes as rows, ``prim``: the primitive of every pixel)."""
    two_pi = 2 * math.pi
    tex = cols[TEX].index_select(0, prim).long()
    albedo = cols[C1:C1 + 3].index_select(1, prim)  # PLAIN
    emit = cols[EMIT].index_select(0, prim) > 0
    for kind in (torch.bincount(tex, minlength=8)[1:] > 0).nonzero()[:, 0].add(1).tolist():
        i = (tex == kind).nonzero()[:, 0]
        pk = prim.index_select(0, i)

        def attr(a: int, b: int, pk=pk) -> torch.Tensor:  # gathering few rows is much cheaper
            return cols[a:b].index_select(1, pk)

        c = attr(C1, FREQ + 1)
        c1, c2, freq = c[:3], c[3:6], c[7]
        pi = p.index_select(1, i)
        an = n.index_select(1, i).abs().round()
        q = pi * (1 - an)  # in-plane coordinates on axis-aligned faces
        if kind in (STRIPES, CHECKER, NOISE):
            if kind == STRIPES:
                s = 0.5 + 0.5 * torch.sin(two_pi * freq * (q * attr(DIR, DIR + 3)).sum(0))
            elif kind == CHECKER:
                s = torch.floor(freq * q).sum(0) * 0.5
                s = 2 * (s - torch.floor(s))
            else:
                x, y, z = freq * q
                s = (0.5 + 0.25 * torch.sin(two_pi * (0.8 * x + 0.6 * y + 0.3 * z))
                     * torch.sin(two_pi * (0.3 * x - 0.7 * y + 0.9 * z))
                     + 0.25 * torch.sin(two_pi * 2.7 * (x - z)))
            albedo.index_copy_(1, i, c1 + (c2 - c1) * s)
            continue
        if kind == BANDS:  # book spines: one random colour per band, dark gaps between books
            ph = freq * (q * attr(DIR, DIR + 3)).sum(0)
            band = torch.floor(ph) + torch.tensor([[0.0], [17.0], [41.0]])
            spine = 0.15 + 0.7 * _frac(torch.sin(band * 12.9898 + c1 * 78.233) * 43758.5453)
            albedo.index_copy_(1, i, spine * (_frac(ph) > 0.08))
            continue
        # framed things (pictures, windows, screens): distance to the border of the face
        g, fw = attr(GEOM, GEOM + 6), attr(FRAME, FRAME + 1)[0]
        lo, hi = g[:3], g[3:]
        big = an * 1e6
        framed = (torch.minimum(pi - lo, hi - pi) + big).amin(0) < fw
        if kind == PICTURE_TEX:
            u, v = q[0] + q[2], q[1]
            art = 0.5 + 0.45 * torch.sin(two_pi * freq * u * torch.tensor([[1.0], [1.7], [2.3]])
                                         + 6.283 * c1) * torch.cos(
                two_pi * freq * v * attr(DIR, DIR + 3) + 3.1 * c1.flip(0))
            albedo.index_copy_(1, i, torch.where(framed, c2, art))
        elif kind == WINDOW_TEX:
            mullion = framed | (((pi - (lo + hi) / 2).abs() + big).amin(0) < fw / 2)
            sky = c1 * (0.85 + 0.15 * torch.sin(3.0 * q[1]))
            albedo.index_copy_(1, i, torch.where(mullion, c2, sky))
            emit.index_copy_(0, i, ~mullion)
        else:  # SCREEN: a dark glossy panel in a bezel
            glare = 0.06 * _frac(0.3 * (q[0] + q[2]) + 0.2 * q[1])
            albedo.index_copy_(1, i, torch.where(framed, c2, c1 + glare))
    return albedo, emit


def _light(albedo, emit, p, n, scenes):
    """Lambert (1760) shading: ambient + point light with distance falloff + directional sun,
    then exposure gain, uniform sensor noise and 8-bit quantisation. Inputs are [3, B, HW]."""
    def per_image(name: str) -> torch.Tensor:  # [C, B, 1]
        return torch.tensor(np.stack([getattr(s, name) for s in scenes]).T,
                            dtype=torch.float32)[..., None]

    lt, sun, tint = per_image("light"), per_image("sun"), per_image("tint")
    to_l = lt[:3] - p
    d2 = (to_l * to_l).sum(0)
    lam = (n * to_l).sum(0).clamp_min(0) / d2.sqrt()
    shade = lt[5] + lt[3] * lam / (1 + 0.06 * d2) - lt[4] * (n * sun).sum(0).clamp_max(0)
    rgb = torch.where(emit, albedo, albedo * shade * tint)
    # zero-mean noise of standard deviation lt[7], drawn per image from its own seed so that a
    # batch does not change an image (uniform: 5x cheaper to draw than Gaussian)
    noise = np.stack([np.random.default_rng(s.noise_seed).random((3, p.shape[2]), np.float32)
                      for s in scenes], 1)
    rgb = rgb * lt[6] + (torch.from_numpy(noise) - 0.5) * (lt[7] * 12**0.5)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8)
