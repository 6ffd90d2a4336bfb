"""Procedural scenes with exact ground truth: the world the bundled VLM is trained on.

A scene is 1..4 objects (shape, colour, size, position) over a textured, noisy background,
rendered at camera resolution. Everything is a pure function of the seed, so any frame can be
regenerated and any answer checked exactly.

Layout rules keep every question unambiguous: (colour, shape) pairs are distinct, objects do
not overlap, object centres fall in distinct columns and distinct rows of the model's patch
grid, and any two centres differ by a clear margin in x and in y (so "left of" and "above"
always have an answer, and left-to-right order is the order of grid columns).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..images import resize_for_model

CAMERA_SIZE = 512
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 50, 190),
    "cyan": (30, 205, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# object radius (half the bounding-box side) in camera pixels, per size class
RADIUS_RANGE = {"small": (26, 34), "large": (54, 70)}
MAX_OBJECTS = 4
GRID = 8  # cells per side of the supervision grid (matches the model's visual token grid)
MIN_AXIS_GAP = 48  # camera pixels between any two centres, along x and along y
_EDGE_MARGIN = 6


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, camera pixels
    y: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    seed: int
    objects: list[SceneObject]
    background: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "objects": [asdict(o) for o in self.objects],
                "background": self.background}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(seed=d["seed"], objects=[SceneObject(**o) for o in d["objects"]],
                   background=d.get("background", {}))

    def left_to_right(self) -> list[SceneObject]:
        return sorted(self.objects, key=lambda o: o.x)


def _cell(v: float) -> int:
    return min(GRID - 1, int(v * GRID / CAMERA_SIZE))


def inside(o: SceneObject) -> bool:
    """Whether the object lies inside the frame with generate_scene's margin (its centre where
    generate_scene may sample it for its radius)."""
    lo, hi = o.radius + _EDGE_MARGIN, CAMERA_SIZE - o.radius - _EDGE_MARGIN
    return lo <= o.x <= hi and lo <= o.y <= hi


def fits(o: SceneObject, others) -> bool:
    """Whether `o` may stand beside `others` under the layout rules (the spacing part):
    centres at least MIN_AXIS_GAP apart in x and in y, in distinct grid columns and rows, and
    no overlap (with a margin). The one place these rules live: generate_scene places each new
    object with it, and the clips (toyworld.clips) check each move or new object with it."""
    return all(
        abs(o.x - p.x) >= MIN_AXIS_GAP and abs(o.y - p.y) >= MIN_AXIS_GAP
        and np.hypot(o.x - p.x, o.y - p.y) >= (o.radius + p.radius) * 1.15 + 6
        and _cell(o.x) != _cell(p.x) and _cell(o.y) != _cell(p.y)
        for p in others)


def layout_ok(objects) -> bool:
    """Whether a whole layout obeys every rule of generate_scene: 1..MAX_OBJECTS objects,
    distinct (colour, shape) pairs, each inside the frame, and every pair spaced by `fits`."""
    objects = list(objects)
    if not 1 <= len(objects) <= MAX_OBJECTS:
        return False
    if len({(o.colour, o.shape) for o in objects}) != len(objects):
        return False
    return all(inside(o) and fits(o, objects[:i]) for i, o in enumerate(objects))


def generate_scene(seed: int) -> Scene:
    """The scene of this seed (layout and background parameters; no pixels)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    while True:  # rejection sampling of a layout; a few tries on average
        pairs = set()
        objs: list[SceneObject] = []
        for _ in range(200):
            if len(objs) == n:
                break
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            if (colour, shape) in pairs:
                continue
            size = SIZES[rng.integers(2)]
            r = float(rng.uniform(*RADIUS_RANGE[size]))
            lo, hi = r + _EDGE_MARGIN, CAMERA_SIZE - r - _EDGE_MARGIN
            x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            candidate = SceneObject(shape, colour, size, x, y, r)
            if fits(candidate, objs):
                objs.append(candidate)
                pairs.add((colour, shape))
        if len(objs) == n:
            break
    background = {
        "tint": [float(v) for v in rng.uniform(95, 165) + rng.uniform(-18, 18, 3)],
        "blob_amp": float(rng.uniform(10, 30)),
        "texture": ["stripes", "checker", "speckle"][rng.integers(3)],
        "tex_amp": float(rng.uniform(8, 22)),
        "tex_freq": float(rng.uniform(0.02, 0.12)),
        "tex_angle": float(rng.uniform(0, np.pi)),
        "noise_sigma": float(rng.uniform(3, 9)),
        "pixel_seed": int(rng.integers(2**31)),
    }
    return Scene(seed=seed, objects=objs, background=background)


def _shape_polygon(o: SceneObject) -> list[tuple[float, float]] | None:
    x, y, r = o.x, o.y, o.radius
    if o.shape == "square":
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if o.shape == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if o.shape == "cross":
        t = r * 0.38
        return [(x - t, y - r), (x + t, y - r), (x + t, y - t), (x + r, y - t), (x + r, y + t),
                (x + t, y + t), (x + t, y + r), (x - t, y + r), (x - t, y + t), (x - r, y + t),
                (x - r, y - t), (x - t, y - t)]
    return None  # circle


def render_scene(scene: Scene, size: int = CAMERA_SIZE, noise_seed: int | None = None) -> Image.Image:
    """The camera frame of a scene, as an RGB image of size×size pixels.

    The content (background texture, lighting blobs, each object's colour jitter) comes from
    the scene's pixel_seed. The sensor noise does too, unless `noise_seed` is given: then the
    noise alone comes from that seed, so the frames of a clip (toyworld.clips) share the
    scene's content but never repeat pixels. noise_seed=None renders exactly what it always
    did (the bundled model's training data and the examples depend on it)."""
    bg = scene.background
    rng = np.random.default_rng(bg["pixel_seed"])
    s = CAMERA_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img = np.empty((s, s, 3), np.float32)
    img[:] = np.asarray(bg["tint"], np.float32)
    # low-frequency blotches (lighting), upsampled from a coarse random grid
    blobs = rng.normal(0, 1, (6, 6)).astype(np.float32)
    blobs = np.asarray(Image.fromarray(blobs, mode="F").resize((s, s), Image.BICUBIC))
    img += (bg["blob_amp"] * blobs)[..., None]
    u = np.cos(bg["tex_angle"]) * xx + np.sin(bg["tex_angle"]) * yy
    v = -np.sin(bg["tex_angle"]) * xx + np.cos(bg["tex_angle"]) * yy
    if bg["texture"] == "stripes":
        tex = np.sin(u * bg["tex_freq"] * 2 * np.pi / 4)
    elif bg["texture"] == "checker":
        f = bg["tex_freq"] * 2 * np.pi / 6
        tex = np.sign(np.sin(u * f) * np.sin(v * f))
    else:
        tex = np.asarray(Image.fromarray(rng.normal(0, 1, (64, 64)).astype(np.float32), mode="F")
                         .resize((s, s), Image.BILINEAR))
    img += (bg["tex_amp"] * tex)[..., None]
    frame = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(frame)
    for o in scene.objects:
        base = np.asarray(COLOURS[o.colour], np.float32)
        jitter = rng.uniform(-18, 18, 3)
        fill = tuple(int(c) for c in np.clip(base + jitter, 0, 255))
        edge = tuple(int(c * 0.6) for c in fill)
        poly = _shape_polygon(o)
        if poly is None:
            box = [o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius]
            draw.ellipse(box, fill=fill, outline=edge, width=3)
        else:
            draw.polygon(poly, fill=fill, outline=edge, width=3)
    arr = np.asarray(frame, np.float32)
    noise_rng = rng if noise_seed is None else np.random.default_rng(noise_seed)
    arr += bg["noise_sigma"] * noise_rng.standard_normal((s, s, 3), dtype=np.float32)
    frame = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return frame if size == CAMERA_SIZE else resize_for_model(frame, size)


def cell_index(o: SceneObject) -> int:
    """The visual token (row-major grid cell) that holds the object's centre."""
    return _cell(o.y) * GRID + _cell(o.x)


def cell_targets(scene: Scene) -> dict[str, np.ndarray]:
    """Per-cell ground truth on the GRID×GRID grid, for dense supervision of the vision half.

    Each cell holds the object whose centre lies in it (index + 1; 0 = none)."""
    colour = np.zeros((GRID, GRID), np.int64)
    shape = np.zeros((GRID, GRID), np.int64)
    size = np.zeros((GRID, GRID), np.int64)
    for o in scene.objects:
        cy, cx = _cell(o.y), _cell(o.x)
        colour[cy, cx] = list(COLOURS).index(o.colour) + 1
        shape[cy, cx] = SHAPES.index(o.shape) + 1
        size[cy, cx] = SIZES.index(o.size) + 1
    return {"colour": colour.reshape(-1), "shape": shape.reshape(-1), "size": size.reshape(-1)}
