"""Clips of the bundled world: seeded sequences of scenes with exact ground truth per frame.

A clip is what the camera of issue 18 watches: one scene (background texture, lighting, each
object's colour jitter) seen over `frames` frames, each with fresh sensor noise, so no two
frames share their pixels exactly. Three kinds:

- "static": nothing changes but the noise.
- "moving": exactly one object moves per frame, by 4..10 camera pixels, keeping every layout
  rule of scenes.generate_scene (checked by scenes.layout_ok, the one place the rules live).
- "events": the scene holds still, and every 6..12 frames something happens: an object
  appears, one disappears (at least one always stays) or one changes colour (pairs stay
  distinct). With moving=True one object also moves on the frames between events.

Everything is a pure function of (seed, frames, kind): a clip can be rebuilt anywhere and its
every frame re-rendered. `truth` answers any question of the templated forms of
questions.make_question exactly, from the scene, so every frame of a clip has a ground truth
for every standing question, and `changes` gives the frames where it changes (the events a
watcher must report). assets/examples/clips.json names the clips the page and the CLI offer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .. import ASSETS
from .questions import NUMBER_WORDS, RELATIONS, describe, normalise
from .scenes import (CAMERA_SIZE, COLOURS, MAX_OBJECTS, RADIUS_RANGE, SHAPES, SIZES, Scene,
                     SceneObject, fits, generate_scene, inside, layout_ok, render_scene)

CLIP_KINDS = ("static", "moving", "events")
CLIP_STREAM = 3  # seed stream of clip scenes (data.py's training and eval streams are 1 and 2)
STEP_RANGE = (4.0, 10.0)  # camera pixels an object moves per frame in a moving clip
RUN_RANGE = (3, 9)  # frames one object keeps moving before another may take over
EVENT_GAP = (6, 12)  # frames between two events of an events clip (inclusive)
EVENT_KINDS = ("appear", "disappear", "colour")
CLIPS_JSON = ASSETS / "examples" / "clips.json"


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass
class Clip:
    """A clip: its seed and kind, the scene of every frame (same background, same pixel_seed)
    and the events that happened, as (frame index, "appear" | "disappear" | "colour"); moves
    are not events (a moving clip moves on every frame) and are not listed."""
    seed: int
    kind: str
    scenes: list[Scene]
    events: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scenes)

    def noise_seed(self, t: int) -> int:
        """The sensor-noise seed of frame t: a function of (clip seed, kind, t) only."""
        return _seed(CLIP_STREAM, self.seed, CLIP_KINDS.index(self.kind), t, 0x5E75)

    def frame(self, t: int, size: int = CAMERA_SIZE) -> Image.Image:
        """Frame t as an RGB size×size image: scene t's content with frame t's own noise."""
        if not 0 <= t < len(self.scenes):
            raise IndexError(f"frame {t} of a clip of {len(self.scenes)} frames")
        return render_scene(self.scenes[t], size, noise_seed=self.noise_seed(t))

    def frames(self, size: int = CAMERA_SIZE):
        """Every frame in order (a generator: frames are rendered as they are asked for)."""
        return (self.frame(t, size) for t in range(len(self.scenes)))


def _copy(scene: Scene, objects: list[SceneObject]) -> Scene:
    return Scene(seed=scene.seed, objects=[replace(o) for o in objects], background=scene.background)


class _Mover:
    """The moving-object walk: one object at a time with a velocity; a step that would break a
    layout rule is retried reversed, then with another object and direction."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.index: int | None = None
        self.velocity = (0.0, 0.0)
        self.left = 0  # frames the current object keeps moving

    def _pick(self, objects: list[SceneObject], avoid: int | None = None) -> None:
        choices = [i for i in range(len(objects)) if i != avoid] or list(range(len(objects)))
        self.index = int(choices[self.rng.integers(len(choices))])
        angle = float(self.rng.uniform(0, 2 * np.pi))
        step = float(self.rng.uniform(*STEP_RANGE))
        self.velocity = (step * np.cos(angle), step * np.sin(angle))
        self.left = int(self.rng.integers(RUN_RANGE[0], RUN_RANGE[1] + 1))

    def _moved(self, objects: list[SceneObject], velocity) -> list[SceneObject] | None:
        o = objects[self.index]
        new = replace(o, x=o.x + velocity[0], y=o.y + velocity[1])
        out = objects[:self.index] + [new] + objects[self.index + 1:]
        return out if layout_ok(out) else None

    def step(self, objects: list[SceneObject]) -> list[SceneObject]:
        """The objects after one frame: exactly one of them moved by 4..10 px."""
        if self.index is None or self.index >= len(objects) or self.left <= 0:
            self._pick(objects, avoid=self.index if len(objects) > 1 else None)
        for attempt in range(64):
            out = self._moved(objects, self.velocity)
            if out is None:
                self.velocity = (-self.velocity[0], -self.velocity[1])  # bounce back
                out = self._moved(objects, self.velocity)
            if out is not None:
                self.left -= 1
                return out
            self._pick(objects, avoid=self.index if attempt % 2 == 0 else None)
        raise RuntimeError("no object of this scene can move without breaking the layout rules")


def _new_object(objects: list[SceneObject], rng: np.random.Generator) -> SceneObject | None:
    """A new object that fits beside `objects` (sampled as generate_scene samples), or None."""
    pairs = {(o.colour, o.shape) for o in objects}
    for _ in range(200):
        shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        if (colour, shape) in pairs:
            continue
        size = SIZES[rng.integers(2)]
        r = float(rng.uniform(*RADIUS_RANGE[size]))
        x, y = (float(v) for v in rng.uniform(r + 6, CAMERA_SIZE - r - 6, 2))
        o = SceneObject(shape, colour, size, x, y, r)
        if inside(o) and fits(o, objects):
            return o
    return None


def _event(objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, list[SceneObject]]:
    """One event on the objects: appear, disappear or colour change, as the layout allows.

    A disappearing object is always the last of the list: render_scene draws each object's
    colour jitter in list order, so removing the last (and appending on appear) leaves every
    other object's pixels as they were."""
    for kind in rng.permutation(EVENT_KINDS):
        if kind == "appear" and len(objects) < MAX_OBJECTS:
            new = _new_object(objects, rng)
            if new is not None:
                return "appear", objects + [new]
        if kind == "disappear" and len(objects) > 1:
            return "disappear", objects[:-1]
        if kind == "colour":
            i = int(rng.integers(len(objects)))
            o = objects[i]
            taken = {(p.colour, p.shape) for p in objects}
            free = [c for c in COLOURS if (c, o.shape) not in taken]
            if free:
                out = list(objects)
                out[i] = replace(o, colour=free[rng.integers(len(free))])
                return "colour", out
    raise RuntimeError("no event possible")  # unreachable: a colour change is always possible


def make_clip(seed: int, frames: int, kind: str, *, moving: bool = False) -> Clip:
    """The clip of this seed: `frames` frames of `kind` (see CLIP_KINDS and the module's text).

    The first scene is generate_scene of a seed derived from `seed` (a stream of its own, so
    never a training scene); every later scene follows from a generator seeded by (seed, kind).
    `moving` (events clips only) also moves one object on the frames between events."""
    if kind not in CLIP_KINDS:
        raise ValueError(f"unknown clip kind {kind!r}; known: {', '.join(CLIP_KINDS)}")
    if frames < 1:
        raise ValueError(f"a clip has at least one frame, not {frames}")
    first = generate_scene(_seed(CLIP_STREAM, seed, 0))
    rng = np.random.default_rng(_seed(CLIP_STREAM, seed, 1 + CLIP_KINDS.index(kind)))
    scenes, events = [first], []
    objects = [replace(o) for o in first.objects]
    mover = _Mover(rng)
    next_event = int(rng.integers(EVENT_GAP[0], EVENT_GAP[1] + 1))
    for t in range(1, frames):
        if kind == "moving":
            objects = mover.step(objects)
        elif kind == "events":
            if t == next_event:
                name, objects = _event(objects, rng)
                events.append((t, name))
                next_event = t + int(rng.integers(EVENT_GAP[0], EVENT_GAP[1] + 1))
            elif moving:
                objects = mover.step(objects)
        scenes.append(_copy(first, objects))
    return Clip(seed=seed, kind=kind, scenes=scenes, events=events)


# ---- ground truth of a question, parsed from its text -------------------------------------------
_PLURALS = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}


def _resolve(words: list[str], scene: Scene, unique: bool = True):
    """The objects a referring expression picks out: [size] [colour] (shape | "object").
    With `unique`, the one object (None unless exactly one matches); else the list of
    matches (None if the words are no such expression)."""
    if not words or not (words[-1] in SHAPES or words[-1] == "object"):
        return None
    head, attrs = words[-1], words[:-1]
    if len(attrs) > 2 or len(set(attrs)) != len(attrs):
        return None
    sizes = [w for w in attrs if w in SIZES]
    colours = [w for w in attrs if w in COLOURS]
    if len(sizes) + len(colours) != len(attrs) or len(sizes) > 1 or len(colours) > 1:
        return None
    if attrs and sizes and attrs[0] != sizes[0]:  # size comes first: "large red object"
        return None
    hits = [o for o in scene.objects
            if (head == "object" or o.shape == head)
            and all(w in (o.colour, o.size) for w in attrs)]
    if not unique:
        return hits
    return hits[0] if len(hits) == 1 else None


def truth(scene: Scene, question: str) -> str | None:
    """The exact answer to `question` about `scene`, for every templated form of
    questions.make_question (read from the text, not looked up):

    - "what colour is the REF ?" → colour;  "what shape is the REF ?" → shape;
      "is the REF small or large ?" → size
    - "how many objects are there ?", "how many COLOUR objects are there ?",
      "how many SHAPEs are there ?" → a number word ("zero".."four")
    - "is there a COLOUR SHAPE ?" → "yes" | "no"
    - "is the REF left of | right of | above | below the REF ?" → "yes" | "no"
    - "describe the scene ." → "colour shape , colour shape" left to right

    REF is a referring expression [size] [colour] (shape | "object"). None for text of no
    such form, and for a REF that picks out no object or more than one (a standing question
    about an object that has left the scene has no answer on that frame)."""
    words = normalise(question)
    while words and words[-1] in ("?", "."):
        words = words[:-1]
    if words == ["describe", "the", "scene"]:
        return describe(scene)
    if words[:4] == ["what", "colour", "is", "the"] or words[:4] == ["what", "shape", "is", "the"]:
        o = _resolve(words[4:], scene)
        return None if o is None else (o.colour if words[1] == "colour" else o.shape)
    if words[:2] == ["how", "many"] and words[-2:] == ["are", "there"]:
        what = words[2:-2]
        if what and what[-1] in _PLURALS:
            hits = _resolve(what[:-1] + [_PLURALS[what[-1]]], scene, unique=False)
        elif what and what[-1] == "objects":
            hits = _resolve(what[:-1] + ["object"], scene, unique=False)
        else:
            return None
        return None if hits is None or len(hits) >= len(NUMBER_WORDS) else NUMBER_WORDS[len(hits)]
    if words[:3] == ["is", "there", "a"]:
        hits = _resolve(words[3:], scene, unique=False)
        return None if hits is None else ("yes" if hits else "no")
    if words[:2] == ["is", "the"] and words[-3:] == ["small", "or", "large"]:
        o = _resolve(words[2:-3], scene)
        return None if o is None else o.size
    if words[:2] == ["is", "the"]:
        rest = " ".join(words[2:])
        for rel, (axis, sign) in RELATIONS.items():
            left, sep, right = rest.partition(f" {rel} the ")
            if not sep:
                continue
            a, b = _resolve(left.split(), scene), _resolve(right.split(), scene)
            if a is None or b is None:
                return None
            return "yes" if (getattr(a, axis) - getattr(b, axis)) * sign > 0 else "no"
    return None


def truths(clip: Clip, question: str) -> list[str | None]:
    """The ground truth of `question` on every frame of the clip."""
    return [truth(scene, question) for scene in clip.scenes]


def changes(clip: Clip, question: str) -> list[int]:
    """The frames (≥ 1) whose truth differs from the previous frame's: the events a standing
    question must report (frame 0 has no previous frame, so it is never listed)."""
    values = truths(clip, question)
    return [t for t in range(1, len(values)) if values[t] != values[t - 1]]


# ---- the named example clips (assets/examples/clips.json) ---------------------------------------
def load_example_clips(path: Path = CLIPS_JSON) -> list[dict]:
    """The example clips' entries: name, seed, kind, frames, moving, fps, questions, text."""
    return json.loads(Path(path).read_text())


def example_clip(name: str, path: Path = CLIPS_JSON) -> Clip:
    """The example clip of this name, rebuilt from its entry (rendered on demand, no files)."""
    entries = load_example_clips(path)
    for e in entries:
        if e["name"] == name:
            return make_clip(e["seed"], e["frames"], e["kind"], moving=e.get("moving", False))
    raise KeyError(f"no example clip {name!r}; known: {', '.join(e['name'] for e in entries)}")
